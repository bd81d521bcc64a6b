"""The config one RPC sees: a frozen snapshot built from one config file, swapped whole on reload.

The servicer asks `Snapshots.current` once at the start of each RPC and
hands that one snapshot to everything the RPC does (who is calling, policy,
signing), so an RPC sees all of the old config or all of the new, never
half of each. Building a snapshot does the work a config allows to be done
once (the caller certificate rules, the policy index, the minter with its key), so
the hot path does none of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from synctoken_server.audit.privacy import plain
from synctoken_server.authn.callercert import CallerCertRules
from synctoken_server.authn.svid import TrustAnchors
from synctoken_server.config.schema import Config
from synctoken_server.policy.limits import CallerLimits, identity_digest
from synctoken_server.policy.rules import Policy
from synctoken_server.tokens.minting import Minter, TokenMinter


@dataclass(frozen=True)
class Snapshot:
    """Everything an RPC reads, from one config."""

    config: Config
    caller_rules: CallerCertRules
    policy: Policy
    minter: TokenMinter
    limits: Mapping[str, CallerLimits]
    """Each limited policy entry's limits (by its id), this process's share of them."""
    global_limits: Mapping[str, CallerLimits]
    """The same limits as configured, undivided: what the global buckets (Redis) enforce for all processes."""
    audit_identity: Callable[[str], str]
    """An identity as the audit log writes it: keyed hash (private audit) or as it is."""
    identity_digest: Callable[[str], str]
    """An identity as a rate limit's QuotaFailure names it: the keyed hash if there is a key, else a SHA-256 digest."""

    @classmethod
    def of(cls, config: Config, anchors: Callable[[], TrustAnchors] | None = None, workers: int = 1) -> Snapshot:
        """The snapshot of a loaded config; `anchors` gives the client CAs in force (they rotate with the TLS files).

        With `workers` processes each enforces 1/workers of every rate limit in
        its own buckets, so that together they allow what is configured; the
        global buckets (Redis) enforce the limits as configured.
        """
        return cls(
            config=config,
            caller_rules=CallerCertRules(config.caller_id_source, config.trust_domains, anchors),
            policy=config.policy,
            minter=Minter(config.credentials),
            limits={rule.caller: rule.limits.share(workers) for rule in config.policy if rule.limits is not None},
            global_limits={rule.caller: rule.limits for rule in config.policy if rule.limits is not None},
            audit_identity=config.audit_identity or plain,
            identity_digest=config.audit_identity or identity_digest,
        )

    def limits_for(self, caller_id: str) -> CallerLimits | None:
        """The limits this snapshot applies to `caller_id`'s requests, if any: its policy entry's."""
        rule = self.policy.rule_for(caller_id)
        return None if rule is None else self.limits.get(rule.caller)


class Snapshots:
    """Holds the current snapshot; a reload replaces it whole, and nothing ever changes one in place.

    No lock: RPCs read it and reloads replace it on the one event loop
    thread, and rebinding one attribute is atomic in any case.
    """

    def __init__(self, first: Snapshot) -> None:
        self._current = first

    @property
    def current(self) -> Snapshot:
        """The snapshot new RPCs use."""
        return self._current

    def replace(self, new: Snapshot) -> Snapshot:
        """Make `new` current; return the one it replaces."""
        old, self._current = self._current, new
        return old
