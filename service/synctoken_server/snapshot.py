"""The config one RPC sees: a frozen snapshot built from one config file, swapped whole on reload.

The servicer asks `Snapshots.current` once at the start of each RPC and
hands that one snapshot to everything the RPC does (identity, policy,
signing), so an RPC sees all of the old config or all of the new, never
half of each. Building a snapshot does the work a config allows to be done
once (the identity rules, the policy index, the minter with its key), so
the hot path does none of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from synctoken_server.config import Config
from synctoken_server.identity import CallerIdentityRules
from synctoken_server.minting import Minter
from synctoken_server.policy import Policy
from synctoken_server.svid import TrustAnchors


@dataclass(frozen=True)
class Snapshot:
    """Everything an RPC reads, from one config."""

    config: Config
    identity_rules: CallerIdentityRules
    policy: Policy
    minter: Minter

    @classmethod
    def of(cls, config: Config, anchors: Callable[[], TrustAnchors] | None = None) -> Snapshot:
        """The snapshot of a loaded config; `anchors` gives the client CAs in force (they rotate with the TLS files)."""
        return cls(
            config=config,
            identity_rules=CallerIdentityRules(config.identity_source, config.trust_domains, anchors),
            policy=config.policy,
            minter=Minter(config.credentials),
        )


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
