"""TokenService RPCs: thin methods that take the current config snapshot, authenticate, parse, and hand over.

`_serve` is the one seam every RPC passes through: it turns errors into
statuses (methods raise, they never abort), and it is the one writer of each
RPC's audit record and counter of its metrics, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Never, Protocol, TypeVar, cast

import grpc
import structlog
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError, Message

from synctoken.v1 import token_service_pb2
from synctoken_server.audit import record
from synctoken_server.authn import mesh, xfcc
from synctoken_server.errors import InternalError, MalformedRequest, RateLimited, SynctokenError, to_status
from synctoken_server.metrics import NO_POLICY, Metrics
from synctoken_server.policy.rules import CallerRule
from synctoken_server.rpc.issuing import Issued, Pending, TokenIssuer
from synctoken_server.rpc.snapshot import Snapshot, Snapshots

if TYPE_CHECKING:  # imported by the server only when tracing is on: OpenTelemetry is not loaded otherwise
    from synctoken_server.tracing import Tracing

T = TypeVar("T")
# The server is grpc.aio; request and response types vary by method.
Context = grpc.aio.ServicerContext[Any, Any]

_log = structlog.get_logger("synctoken.rpc")
_limits_log = structlog.get_logger("synctoken.limits")


class TokenServicer:
    """Implements synctoken.v1.TokenService.

    Methods take the raw request bytes and parse them inside the seam, so that
    a malformed request is answered INVALID_ARGUMENT and audited like any other
    bad input, rather than grpc's bare UNKNOWN naming a Python exception.
    """

    def __init__(
        self,
        *,
        snapshots: Snapshots,
        issuer: TokenIssuer,
        audit_log: record.AuditLog,
        metrics: Metrics,
        tracing: Tracing | None = None,
    ) -> None:
        self._snapshots = snapshots
        self._issuer = issuer
        self._audit = audit_log
        self._metrics = metrics
        self._tracing = tracing
        """None when tracing is off: then nothing here touches OpenTelemetry."""

    async def IssueToken(  # noqa: N802 - the name is the RPC's
        self, request: bytes, context: Context
    ) -> token_service_pb2.IssueTokenResponse:
        """Mint a token if policy allows; the audit record is written before the token is returned."""
        started = time.perf_counter()
        try:
            return await self._serve(
                context, "IssueToken", record.EVENT_TOKEN_DECISION, lambda rpc: self._issue(request, context, rpc)
            )
        finally:
            self._metrics.latency.observe(time.perf_counter() - started)

    async def GetCallerIdentity(  # noqa: N802 - the name is the RPC's
        self, request: bytes, context: Context
    ) -> token_service_pb2.GetCallerIdentityResponse:
        """Say who the caller is and which policy applies; unknown callers get an empty policy."""
        return await self._serve(
            context,
            "GetCallerIdentity",
            record.EVENT_CALLER_LOOKUP,
            lambda rpc: self._lookup(request, context, rpc),
        )

    def _issue(self, raw_request: bytes, context: Context, rpc: _Rpc) -> Issued:
        # Who is asking comes first: an unauthenticated peer learns nothing else.
        rpc.caller_id = self._caller_id(rpc.snapshot, context)
        rpc.request = _parse(token_service_pb2.IssueTokenRequest, raw_request)
        return self._issuer.issue(rpc.snapshot, rpc.caller_id, rpc.request)

    def _lookup(
        self, raw_request: bytes, context: Context, rpc: _Rpc
    ) -> _Answered[token_service_pb2.GetCallerIdentityResponse]:
        rpc.caller_id = caller_id = self._caller_id(rpc.snapshot, context)
        # No fields, but a malformed body is refused all the same.
        _parse(token_service_pb2.GetCallerIdentityRequest, raw_request)
        rule = rpc.snapshot.policy.rule_for(caller_id)
        response = token_service_pb2.GetCallerIdentityResponse(caller_id=caller_id)
        if rule is not None:
            response.policy.CopyFrom(_describe(rule))
        return _Answered(response, {"outcome": record.OUTCOME_ANSWERED, "policy_rule": rule.caller if rule else None})

    def _caller_id(self, snapshot: Snapshot, context: Context) -> str:
        # types-grpcio says bytes, but grpc maps each property to a list of values.
        auth_context = cast("Mapping[str, Sequence[bytes]]", context.auth_context())
        # Values are bytes only for keys ending in -bin, which this one does not.
        metadata = context.invocation_metadata() or ()
        forwarded = [value for key, value in metadata if key == xfcc.HEADER and isinstance(value, str)]
        return mesh.caller_id(snapshot.caller_rules, auth_context, forwarded, mesh=snapshot.config.mesh is not None)

    async def _serve(self, context: Context, method: str, event: str, body: Callable[[_Rpc], _Answer[T]]) -> T:
        """Run `body`, then write the RPC's one audit record and count its metrics, whatever the outcome.

        The one writer of every RPC's record: the answer's, before the response
        leaves (fail closed: if it cannot be written, the answer becomes a
        refusal), or the refusal's.
        """
        # One snapshot for the whole RPC: a reload meanwhile does not mix configs.
        rpc = _Rpc(self._snapshots.current, time.perf_counter(), method, context.peer())
        if self._tracing is not None:
            rpc.trace = self._tracing.log_ids()
        try:
            try:
                answer = body(rpc)
            except Pending as pending:  # global limits: the answer waits for Redis (see Pending)
                # Only IssueToken's body raises it, and its T is Issued's response type.
                answer = cast("_Answer[T]", await pending.answer)
            if isinstance(answer, Issued) and answer.shadow is not None:
                self._shadow_limited(rpc, answer.rule, answer.shadow)
            written = rpc.context()
            written |= answer.record
            written["duration_ms"] = record.ms_since(rpc.started)
            self._audit.record(event, written)
        except SynctokenError as exc:
            error = exc
        except Exception:  # noqa: BLE001 - the one place anything unexpected becomes INTERNAL
            _log.exception("rpc.failed", **rpc.context())
            error = InternalError()
        else:
            # After the record: a token whose record failed is never sent, and is counted as refused.
            self._answered(rpc, answer)
            return answer.response
        return await self._refuse(context, rpc, event, error)

    def _answered(self, rpc: _Rpc, answer: _Answer[object]) -> None:
        minted = False
        if isinstance(answer, Issued) and answer.minted:
            minted = True
            self._metrics.issued.labels(answer.rule, answer.service_sid).inc()
        if self._tracing is not None:
            self._tracing.rpc_ended(grpc.StatusCode.OK, None, _rule_label(rpc), issued=minted)

    async def _refuse(self, context: Context, rpc: _Rpc, event: str, error: SynctokenError) -> Never:
        """Count and audit the refusal, and send it: where an error becomes the status the caller gets."""
        rule_label = _rule_label(rpc)
        if isinstance(error, RateLimited):
            self._metrics.rate_limited.labels(rule_label, "false").inc()
        self._metrics.refused.labels(rule_label, error.reason_name).inc()
        # Already refusing: an unwritable audit log cannot make that worse.
        with contextlib.suppress(SynctokenError):
            self._audit.record(
                event,
                rpc.context(),
                outcome=record.OUTCOME_DENIED,
                code=error.code.name,
                reason=error.reason_name,
                message=error.message,
                **error.audit,
                duration_ms=record.ms_since(rpc.started),
            )
        if self._tracing is not None:
            # Here, not in the interceptor: the stock one never sees abort_with_status, and would say OK.
            self._tracing.rpc_ended(error.code, error.reason_name, rule_label, issued=False)
        await context.abort_with_status(to_status(error))

    def _shadow_limited(self, rpc: _Rpc, rule: str, refusal: RateLimited) -> None:
        # Counted and logged, not refused: what a limit in shadow mode is for.
        self._metrics.rate_limited.labels(rule, "true").inc()
        _limits_log.warning(
            "rate_limit.shadow", **rpc.context(), policy_rule=rule, limit=refusal.subject, message=refusal.message
        )


T_co = TypeVar("T_co", covariant=True)


class _Answer(Protocol[T_co]):
    """A method's yes: the response, and the outcome fields of its audit record."""

    @property
    def response(self) -> T_co: ...

    @property
    def record(self) -> Mapping[str, object]: ...


@dataclass(frozen=True, slots=True)
class _Answered(Generic[T]):
    """An answer with nothing to count beyond its record."""

    response: T
    record: Mapping[str, object]


@dataclass(slots=True)
class _Rpc:
    """What one RPC has established so far: its snapshot, its start, who is asking and what for once known."""

    snapshot: Snapshot
    started: float
    """perf_counter at the start, for the audit record's duration."""
    method: str
    peer: str
    caller_id: str = ""
    request: token_service_pb2.IssueTokenRequest | None = None
    """IssueToken's request once parsed: what the record says was asked for, granted or not."""
    trace: Mapping[str, str] | None = None
    """trace_id and span_id of the RPC's span, when tracing is on and the span is recording; else None or empty."""

    def context(self) -> dict[str, object]:
        """What the RPC's log lines say about it: rpc and peer, then caller_id, then what the request asked for."""
        context: dict[str, object] = {"rpc": self.method, "peer": self.peer}
        if self.caller_id:
            context["caller_id"] = self.caller_id
        request = self.request
        if request is not None:
            context["identity"] = self.snapshot.audit_identity(request.identity)
            context["service_sid"] = request.sync.service_sid
            context["region"] = request.region
        if self.trace:
            context |= self.trace
        return context


def _rule_label(rpc: _Rpc) -> str:
    """The caller's policy entry id, or NO_POLICY: the metrics label, never the caller id (see metrics.py)."""
    rule = rpc.snapshot.policy.rule_for(rpc.caller_id) if rpc.caller_id else None
    return rule.caller if rule else NO_POLICY


M = TypeVar("M", bound=Message)


def _parse(message_type: type[M], data: bytes) -> M:
    try:
        return message_type.FromString(data)
    except DecodeError:
        raise MalformedRequest(message_type.DESCRIPTOR.full_name) from None


def _describe(rule: CallerRule) -> token_service_pb2.CallerPolicy:
    return token_service_pb2.CallerPolicy(
        matched_caller=rule.caller,
        sync_service_sids=rule.sync_services,
        default_sync_service_sid=rule.default_sync_service or "",
        identity_pattern=rule.identity_pattern.pattern if rule.identity_pattern else "",
        allowed_identity_characters="".join(sorted(rule.allowed_identity_characters)),
        default_ttl=duration_pb2.Duration(seconds=rule.default_ttl),
        max_ttl=duration_pb2.Duration(seconds=rule.max_ttl),
    )
