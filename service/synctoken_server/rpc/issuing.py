"""Issuing: decide and mint for one request from an authenticated caller, with no transport and no log in sight."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from synctoken.v1 import token_service_pb2
from synctoken_server.audit import record
from synctoken_server.errors import RateLimited
from synctoken_server.policy.limits import RateLimiter
from synctoken_server.policy.rules import decide
from synctoken_server.rpc.snapshot import Snapshot
from synctoken_server.tokens.keyledger import SignedExpiries
from synctoken_server.tokens.minting import plan_times, token_id


# Not frozen: a frozen dataclass's __init__ costs a call per field, on every token.
@dataclass(slots=True)
class Issued:
    """The issuer's yes: the response to send, and what the RPC's one audit record and metrics say of it.

    Nothing is written or counted yet: the servicer does both, for this and
    for every refusal alike, and sends the response only once the record is written.
    """

    response: token_service_pb2.IssueTokenResponse
    record: dict[str, object]
    """The record's outcome fields: outcome, the granted service_sid and ttl; for a token, token_id and expires_at."""
    rule: str
    """The policy entry that granted it (its id), the metrics' label."""
    service_sid: str
    """The Sync service granted, the issued counter's other label."""
    minted: bool
    """Whether the response carries a token (not validate_only): only then is it counted as issued."""
    shadow: RateLimited | None = None
    """What a shadow limit would have refused: logged and counted, not enforced."""


class TokenIssuer:
    """Turns an IssueTokenRequest from a known caller into an `Issued`, or raises why not.

    The policy and the signing key come with each call, in the RPC's snapshot.
    """

    def __init__(
        self,
        *,
        signed: SignedExpiries,
        limiter: RateLimiter,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._signed = signed
        self._limiter = limiter
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret

    def issue(self, snapshot: Snapshot, caller_id: str, request: token_service_pb2.IssueTokenRequest) -> Issued:
        """Decide, then mint unless the request only asks whether it would be granted.

        Raises the SynctokenError that refuses the request; its `audit` holds
        what the record adds about the refusal.
        """
        grant = decide(snapshot.policy, caller_id, request)
        # After the decision: only requests that would get a token use up the
        # limit (validate_only included), and the identity is known to be valid.
        shadow = None
        limits = snapshot.limits.get(grant.rule)
        if limits is not None:
            refusal = self._limiter.check(limits, caller_id, grant.identity, snapshot.identity_digest)
            if refusal is not None:
                error = RateLimited(caller_id, refusal.subject, refusal.description, refusal.retry_after)
                if not refusal.shadow:
                    raise error
                shadow = error
        times = plan_times(int(self._clock()), grant.ttl, self._rng)
        response = token_service_pb2.IssueTokenResponse(identity=grant.identity)
        # Setting fields in place skips building and copying three Timestamp messages.
        response.issued_at.seconds = times.issued_at
        response.expires_at.seconds = times.expires_at
        response.refresh_after.seconds = times.refresh_after
        if request.validate_only:
            validated = {"outcome": record.OUTCOME_VALIDATED, "service_sid": grant.service_sid, "ttl": grant.ttl}
            return Issued(response, validated, grant.rule, grant.service_sid, minted=False, shadow=shadow)
        response.token = snapshot.minter.mint(grant, times)
        response.token_id = token_id(response.token)
        # Counted before the record is written: if that fails the token is never
        # sent, and counting it anyway errs only towards waiting longer.
        self._signed.record(snapshot.minter.key_sid, times.expires_at)
        issued = {
            "outcome": record.OUTCOME_ISSUED,
            "service_sid": grant.service_sid,
            "ttl": grant.ttl,
            "token_id": response.token_id,
            "expires_at": times.expires_at,
        }
        return Issued(response, issued, grant.rule, grant.service_sid, minted=True, shadow=shadow)
