"""Issuing: decide, mint and audit one request from an authenticated caller, with no transport in sight."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import structlog

from synctoken.v1 import token_service_pb2
from synctoken_server.audit import record
from synctoken_server.errors import RateLimited
from synctoken_server.metrics import Metrics
from synctoken_server.policy.limits import RateLimiter
from synctoken_server.policy.rules import decide
from synctoken_server.rpc.snapshot import Snapshot
from synctoken_server.tokens.keyledger import SignedExpiries
from synctoken_server.tokens.minting import plan_times, token_id

_log = structlog.get_logger("synctoken.limits")


class TokenIssuer:
    """Turns an IssueTokenRequest from a known caller into a response, or raises why not.

    The policy and the signing key come with each call, in the RPC's snapshot.
    """

    def __init__(
        self,
        *,
        audit_log: record.AuditLog,
        signed: SignedExpiries,
        limiter: RateLimiter,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._audit = audit_log
        self._signed = signed
        self._limiter = limiter
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret

    def issue(
        self,
        snapshot: Snapshot,
        caller_id: str,
        request: token_service_pb2.IssueTokenRequest,
        started: float,
        context: dict[str, object],
    ) -> token_service_pb2.IssueTokenResponse:
        """Decide; then mint and write the audit record before returning the token.

        `started` is the RPC's perf_counter start, for the record's duration;
        `context` its log context, to which this adds what the request asks for.
        """
        # Added before deciding, so that a denial's record says what was asked for.
        context["identity"] = snapshot.audit_identity(request.identity)
        context["service_sid"] = request.sync.service_sid
        context["region"] = request.region
        grant = decide(snapshot.policy, caller_id, request)
        # After the decision: only requests that would get a token use up the
        # limit (validate_only included), and the identity is known to be valid.
        limits = snapshot.limits.get(grant.rule)
        if limits is not None:
            refusal = self._limiter.check(limits, caller_id, grant.identity, snapshot.identity_digest)
            if refusal is not None:
                self._metrics.rate_limited.labels(grant.rule, "true" if refusal.shadow else "false").inc()
                error = RateLimited(caller_id, refusal.subject, refusal.description, refusal.retry_after)
                if not refusal.shadow:
                    raise error
                _log.warning(
                    "rate_limit.shadow",
                    **context,
                    policy_rule=grant.rule,
                    limit=refusal.subject,
                    message=error.message,
                )
        granted = {"service_sid": grant.service_sid, "ttl": grant.ttl}
        times = plan_times(int(self._clock()), grant.ttl, self._rng)
        response = token_service_pb2.IssueTokenResponse(identity=grant.identity)
        # Setting fields in place skips building and copying three Timestamp messages.
        response.issued_at.seconds = times.issued_at
        response.expires_at.seconds = times.expires_at
        response.refresh_after.seconds = times.refresh_after
        if request.validate_only:
            self._audit.record(
                record.EVENT_TOKEN_DECISION,
                context,
                outcome=record.OUTCOME_VALIDATED,
                **granted,
                duration_ms=record.ms_since(started),
            )
            return response
        response.token = snapshot.minter.mint(grant, times)
        response.token_id = token_id(response.token)
        # Counted before the record is written: if that fails the token is never
        # sent, and counting it anyway errs only towards waiting longer.
        self._signed.record(snapshot.minter.key_sid, times.expires_at)
        # Fail closed: if this raises, the token never leaves the process.
        self._audit.record(
            record.EVENT_TOKEN_DECISION,
            context,
            outcome=record.OUTCOME_ISSUED,
            **granted,
            token_id=response.token_id,
            expires_at=times.expires_at,
            duration_ms=record.ms_since(started),
        )
        # After the record: a token whose record failed is never sent, and is counted as refused.
        self._metrics.issued.labels(grant.rule, grant.service_sid).inc()
        return response
