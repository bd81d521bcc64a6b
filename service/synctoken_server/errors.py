"""The errors an RPC can end with, and the one place they become a google.rpc.Status.

Each class carries its gRPC code and its ErrorInfo reason; the message is built
from structured arguments so that no caller of these classes formats one by
hand. Nothing here ever includes a secret or a token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc.code_pb2 import Code
from google.rpc.error_details_pb2 import BadRequest, ErrorInfo, QuotaFailure, RetryInfo
from google.rpc.status_pb2 import Status
from grpc_status import rpc_status

from synctoken.v1 import token_service_pb2

DOMAIN = "synctoken.v1"


def reason_name(reason: int) -> str:
    """The ErrorInfo reason for an ErrorReason value: the enum name without its prefix."""
    return token_service_pb2.ErrorReason.Name(reason).removeprefix("ERROR_REASON_")


@dataclass(frozen=True)
class FieldViolation:
    """One broken rule in a request: the field path (e.g. "sync.service_sid") and why."""

    field: str
    description: str


class SynctokenError(Exception):
    """Base of every error an RPC may return on purpose."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    reason: ClassVar[int] = token_service_pb2.ERROR_REASON_INTERNAL

    def __init__(
        self, message: str, metadata: Mapping[str, str] | None = None, audit: Mapping[str, object] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        # For the audit record only: never sent to the caller.
        self.audit: dict[str, object] = dict(audit or {})

    @property
    def reason_name(self) -> str:
        """The UPPER_SNAKE reason sent in ErrorInfo."""
        return reason_name(self.reason)

    def extra_details(self) -> Sequence[any_pb2.Any]:
        """Details beyond the ErrorInfo, packed; subclasses add theirs."""
        return ()


class InvalidRequest(SynctokenError):
    """The request breaks one or more rules; every broken rule is listed."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = token_service_pb2.ERROR_REASON_INVALID_REQUEST

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations = tuple(violations)
        summary = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(f"invalid request: {summary}")

    def extra_details(self) -> Sequence[any_pb2.Any]:
        """One BadRequest with a violation per broken rule."""
        bad_request = BadRequest(
            field_violations=[
                BadRequest.FieldViolation(field=v.field, description=v.description) for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        return (packed,)


class MalformedRequest(SynctokenError):
    """The request bytes do not parse as the method's request message."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = token_service_pb2.ERROR_REASON_MALFORMED_REQUEST

    def __init__(self, message_type: str) -> None:
        super().__init__(f"request is not a valid {message_type}: bad wire format or a string that is not UTF-8")


class CallerUnauthenticated(SynctokenError):
    r"""The caller's certificate carries no caller id the server accepts.

    On the mTLS listener that is the TLS peer's certificate; on the mesh
    listener (`forwarded`) it is the one the sidecar forwarded in
    x-forwarded-client-cert, and the message says so: there the caller sent
    no certificate of its own. `why` is one of the callercert or mesh module's
    fixed phrases, never certificate bytes. The SANs offered go to the audit
    record only, as received but escaped, so that a NUL or a newline shows
    as \x00 or \n instead of cutting or splitting the record.
    """

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = token_service_pb2.ERROR_REASON_CALLER_UNAUTHENTICATED

    def __init__(self, why: str, presented_sans: Sequence[str] = (), *, forwarded: bool = False) -> None:
        escaped = [escape(san) for san in presented_sans]
        audit: dict[str, object] = {}
        if len(escaped) == 1:
            audit["presented_san"] = escaped[0]
        elif escaped:
            audit["presented_sans"] = escaped
        subject = "x-forwarded-client-cert" if forwarded else "client certificate"
        super().__init__(f"{subject} has no acceptable caller id: {why}", audit=audit)


class ForwardedCertNotTrusted(SynctokenError):
    """x-forwarded-client-cert on a listener that does not trust it: refused, neither used nor ignored."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = token_service_pb2.ERROR_REASON_FORWARDED_CLIENT_CERT_UNTRUSTED

    def __init__(self) -> None:
        super().__init__(
            "x-forwarded-client-cert is read only on the mesh listener; on this one the client certificate "
            "names the caller: send the call without the header, or through the sidecar"
        )


def escape(text: str) -> str:
    """`text` in printable ASCII, every other character (and the backslash) as a Python escape."""
    return text.encode("unicode_escape").decode("ascii")


class CallerNotAllowed(SynctokenError):
    """No policy entry matches the caller: deny by default."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = token_service_pb2.ERROR_REASON_CALLER_NOT_ALLOWED

    def __init__(self, caller_id: str) -> None:
        super().__init__(f"caller {caller_id} is not in the policy", {"callerId": caller_id})


class ServiceNotAllowed(SynctokenError):
    """The Sync service asked for is not in the caller's list."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = token_service_pb2.ERROR_REASON_SERVICE_NOT_ALLOWED

    def __init__(self, caller_id: str, service_sid: str) -> None:
        super().__init__(
            f"caller {caller_id} may not mint tokens for Sync service {service_sid}",
            {"callerId": caller_id, "serviceSid": service_sid},
        )


class IdentityNotAllowed(SynctokenError):
    """The identity does not match the caller's identity pattern."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = token_service_pb2.ERROR_REASON_IDENTITY_NOT_ALLOWED

    def __init__(self, caller_id: str) -> None:
        super().__init__(
            f"identity does not match the identity_pattern of caller {caller_id}",
            {"callerId": caller_id},
        )


class RateLimited(SynctokenError):
    """The caller, or one identity of the caller, is over its rate limit: retry after the delay given.

    RetryInfo says when a token will be available (rounded up to the
    millisecond, so that a client honouring it exactly is not refused
    again); QuotaFailure says which limit. The subject names the identity
    only by a digest: proxies and client logs see these details too.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = token_service_pb2.ERROR_REASON_RATE_LIMITED

    def __init__(self, caller_id: str, subject: str, description: str, retry_after: float) -> None:
        self.subject = subject
        self.description = description
        self.retry_after_ms = max(1, math.ceil(retry_after * 1000))
        super().__init__(
            f"over {description}: retry in {self.retry_after_ms / 1000:g}s",
            {"callerId": caller_id, "quotaSubject": subject},
            audit={"limit": subject, "retry_after_ms": self.retry_after_ms},
        )

    def extra_details(self) -> Sequence[any_pb2.Any]:
        """A RetryInfo with the delay, and a QuotaFailure naming the limit."""
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(self.retry_after_ms)
        retry, quota = any_pb2.Any(), any_pb2.Any()
        retry.Pack(RetryInfo(retry_delay=delay))
        quota.Pack(
            QuotaFailure(violations=[QuotaFailure.Violation(subject=self.subject, description=self.description)])
        )
        return (retry, quota)


class RateLimitUnavailable(SynctokenError):
    """The caller's limits are global (Redis), Redis cannot answer, and the server refuses meanwhile (deny).

    UNAVAILABLE, as for any dependency that is down for a while: safe to
    retry, and RetryInfo says when the server will ask Redis again.
    """

    code = grpc.StatusCode.UNAVAILABLE
    reason = token_service_pb2.ERROR_REASON_RATE_LIMIT_UNAVAILABLE

    def __init__(self, caller_id: str, retry_after: float) -> None:
        self.retry_after_ms = max(1, math.ceil(retry_after * 1000))
        super().__init__(
            f"the shared rate limits cannot be checked right now: retry in {self.retry_after_ms / 1000:g}s",
            {"callerId": caller_id},
            audit={"retry_after_ms": self.retry_after_ms},
        )

    def extra_details(self) -> Sequence[any_pb2.Any]:
        """A RetryInfo with the delay."""
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(self.retry_after_ms)
        retry = any_pb2.Any()
        retry.Pack(RetryInfo(retry_delay=delay))
        return (retry,)


class AuditUnavailable(SynctokenError):
    """The audit record could not be written, so no token leaves the server."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = token_service_pb2.ERROR_REASON_AUDIT_UNAVAILABLE

    def __init__(self) -> None:
        super().__init__("the audit log cannot be written; no token was issued")


class InternalError(SynctokenError):
    """Anything unexpected: the caller learns nothing, the log gets the traceback."""

    def __init__(self) -> None:
        super().__init__("internal error")


def to_status(error: SynctokenError) -> grpc.Status:
    """Turn an error into the google.rpc.Status sent to the caller."""
    info = ErrorInfo(reason=error.reason_name, domain=DOMAIN, metadata=error.metadata)
    packed_info = any_pb2.Any()
    packed_info.Pack(info)
    status = Status(
        code=_CODES[error.code],
        message=error.message,
        details=[packed_info, *error.extra_details()],
    )
    return rpc_status.to_status(status)  # type: ignore[no-any-return]


# grpc.StatusCode values are (int, name) pairs; google.rpc.Code has the ints by name.
_CODES: Mapping[grpc.StatusCode, int] = {code: Code.Value(code.name) for code in grpc.StatusCode}
