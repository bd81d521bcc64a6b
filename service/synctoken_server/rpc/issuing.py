"""Issuing: decide and mint for one request from an authenticated caller, with no transport and no log in sight."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from synctoken.v1 import token_service_pb2
from synctoken_server.audit import record
from synctoken_server.errors import RateLimited, RateLimitUnavailable
from synctoken_server.policy.limitbackend import BackendUnavailable, GlobalLimiter
from synctoken_server.policy.limits import CallerLimits, RateLimiter
from synctoken_server.policy.rules import Grant, decide
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
        return self._answer(snapshot, grant, request, shadow)

    def _answer(
        self,
        snapshot: Snapshot,
        grant: Grant,
        request: token_service_pb2.IssueTokenRequest,
        shadow: RateLimited | None,
    ) -> Issued:
        """The answer to a request the policy grants and its limits let through: validated, or a token."""
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


class Pending(Exception):
    """The answer needs an await first (a global limit asked of Redis): raised by an issuer, awaited by the servicer.

    An exception rather than a return value so that the servicer's seam
    costs the local path nothing: a try block is free until something is
    raised (zero-cost exceptions), where checking every answer would not be.
    """

    def __init__(self, answer: Coroutine[Any, Any, Issued]) -> None:
        super().__init__("pending")
        self.answer = answer


class GlobalTokenIssuer(TokenIssuer):
    """A TokenIssuer whose limits are global: they are checked in Redis (or its fallback) before minting."""

    def __init__(
        self,
        *,
        signed: SignedExpiries,
        limiter: RateLimiter,
        global_limiter: GlobalLimiter,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(signed=signed, limiter=limiter, clock=clock, rng=rng)
        self._global = global_limiter

    def issue(self, snapshot: Snapshot, caller_id: str, request: token_service_pb2.IssueTokenRequest) -> Issued:
        """Decide; with a limit, raise Pending with the rest (the limit check, then minting) to await."""
        grant = decide(snapshot.policy, caller_id, request)
        limits = snapshot.global_limits.get(grant.rule)
        if limits is None:
            return self._answer(snapshot, grant, request, None)
        raise Pending(self._limited(snapshot, caller_id, request, grant, limits))

    async def _limited(
        self,
        snapshot: Snapshot,
        caller_id: str,
        request: token_service_pb2.IssueTokenRequest,
        grant: Grant,
        limits: CallerLimits,
    ) -> Issued:
        local = snapshot.limits[grant.rule]
        verdict = await self._global.check(limits, local, caller_id, grant.identity, snapshot.identity_digest)
        shadow = None
        if isinstance(verdict, BackendUnavailable):
            # A shadow limit refuses nothing, and so neither does its missing backend.
            if not limits.shadow:
                raise RateLimitUnavailable(caller_id, verdict.retry_after)
        elif verdict is not None:
            error = RateLimited(caller_id, verdict.subject, verdict.description, verdict.retry_after)
            if not verdict.shadow:
                raise error
            shadow = error
        return self._answer(snapshot, grant, request, shadow)
