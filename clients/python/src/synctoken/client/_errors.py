"""The exceptions a call may raise, and the one seam that turns a grpc.RpcError into one of them.

The server sends a google.rpc.Status in the `grpc-status-details-bin` trailer:
one ErrorInfo (the reason and its metadata), a BadRequest for bad requests, and
perhaps a RetryInfo. Callers get those as attributes, never as raw protobufs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.rpc.error_details_pb2 import BadRequest, ErrorInfo, RetryInfo
from google.rpc.status_pb2 import Status

from synctoken.client._connectfailure import Cause, ConnectFailure, ServerCheck, read_failure

DOMAIN = "synctoken.v1"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class SynctokenError(Exception):
    """A call that did not succeed: its gRPC code, the server's reason, and the details it sent.

    `reason` is the ErrorInfo reason (e.g. "SERVICE_NOT_ALLOWED"), or None
    when the status came from gRPC itself rather than from synctoken. `cause`
    says why a call never reached a server (the TLS handshake failed, or no
    connection could be made), and is None when it did.
    """

    codes: ClassVar[tuple[grpc.StatusCode, ...]] = ()
    """The gRPC codes that raise this class (empty for the base, which takes any other code)."""

    def __init__(  # noqa: PLR0913 - the status's parts, each a documented attribute
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_after: dt.timedelta | None = None,
        cause: Cause | None = None,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        self.retry_after = retry_after
        self.cause = cause

    def __str__(self) -> str:
        # A call has a reason (the server answered) or a cause (it never got there), never both.
        why = self.reason or self.cause
        return f"{self.code.name} {why}: {self.message}" if why else f"{self.code.name}: {self.message}"


class InvalidRequest(SynctokenError):
    """INVALID_ARGUMENT: the request breaks a rule; `field_violations` lists every one."""

    codes = (grpc.StatusCode.INVALID_ARGUMENT,)


class PermissionDenied(SynctokenError):
    """PERMISSION_DENIED: the caller, the Sync service or the identity is not allowed by policy."""

    codes = (grpc.StatusCode.PERMISSION_DENIED,)


class Unauthenticated(SynctokenError):
    """UNAUTHENTICATED: the client certificate carries no caller id the server accepts."""

    codes = (grpc.StatusCode.UNAUTHENTICATED,)


class RateLimited(SynctokenError):
    """RESOURCE_EXHAUSTED: too many requests, or a request too large; see `retry_after`."""

    codes = (grpc.StatusCode.RESOURCE_EXHAUSTED,)


class Unavailable(SynctokenError):
    """UNAVAILABLE or DEADLINE_EXCEEDED: no answer in time, even after gRPC's retries; safe to try later.

    Unless `cause` is TLS_HANDSHAKE_FAILED: then this client's or the server's
    certificates must change first.
    """

    codes = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


_CLASSES: Mapping[grpc.StatusCode, type[SynctokenError]] = {
    code: cls
    for cls in (InvalidRequest, PermissionDenied, Unauthenticated, RateLimited, Unavailable)
    for code in cls.codes
}


class _FailedCall(Protocol):
    """What both grpc's and grpc.aio's RpcError offer (the stubs type RpcError bare)."""

    def code(self) -> grpc.StatusCode: ...
    def details(self) -> str | None: ...
    def trailing_metadata(self) -> Iterable[tuple[str, str | bytes]] | None: ...


def from_rpc_error(error: grpc.RpcError, unreached: ConnectFailure | None = None) -> SynctokenError:
    """The typed exception for a failed call: the one place a grpc.RpcError is translated.

    `unreached` is what the call's last fail-fast attempt found when it could
    not connect: a deadline that passed after it says so.
    """
    call: _FailedCall = error  # type: ignore[assignment]
    code = call.code()
    if unreached is not None and code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return deadline_passed(unreached, call.details() or "Deadline Exceeded")
    # The transport's code and message are the truth; the Status only adds details.
    # They differ when something between us and the server rewrote the status.
    status = _rich_status(call.trailing_metadata() or ())
    info = _first(status, ErrorInfo)
    bad_request = _first(status, BadRequest)
    retry_info = _first(status, RetryInfo)
    return _CLASSES.get(code, SynctokenError)(
        code,
        call.details() or "",
        reason=(info.reason or None) if info else None,
        # Sorted: a protobuf map has no order, and messages and logs read better stable.
        metadata=dict(sorted(info.metadata.items())) if info else None,
        field_violations=[(v.field, v.description) for v in bad_request.field_violations] if bad_request else (),
        retry_after=retry_info.retry_delay.ToTimedelta() if retry_info else None,
    )


def failure_to_wait_out(
    error: grpc.RpcError, check: ServerCheck, earlier: ConnectFailure | None = None
) -> ConnectFailure:
    """What kept a fail-fast attempt from a server, if another attempt may get there; else raise the typed error.

    Raises when the attempt reached a server (its answer is final: gRPC has
    retried it already), and when TLS refused the connection (no wait changes
    a certificate). `earlier` is what the call's previous attempts found.
    """
    call: _FailedCall = error  # type: ignore[assignment]
    # A status synctoken sent (AUDIT_UNAVAILABLE) carries its ErrorInfo: that call was made.
    failure = None
    if call.code() == grpc.StatusCode.UNAVAILABLE and _rich_status(call.trailing_metadata() or ()) is None:
        failure = read_failure(call.details() or "", check)
    if failure is None:
        raise from_rpc_error(error, earlier) from error
    if failure.cause is Cause.TLS_HANDSHAKE_FAILED:
        raise Unavailable(call.code(), failure.message, cause=failure.cause) from error
    return failure


def deadline_passed(unreached: ConnectFailure, details: str = "Deadline Exceeded") -> Unavailable:
    """The error for a call whose deadline passed while its attempts could not connect."""
    return Unavailable(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"{details} (its last attempt found: {unreached.message})",
        cause=unreached.cause,
    )


def _rich_status(trailers: Iterable[tuple[str, str | bytes]]) -> Status | None:
    for key, value in trailers:
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return Status.FromString(value)
            except DecodeError:
                # A garbled trailer must not hide the code and message we do have.
                return None
    return None


_Detail = TypeVar("_Detail", ErrorInfo, BadRequest, RetryInfo)


def _first(status: Status | None, kind: type[_Detail]) -> _Detail | None:
    if status is None:
        return None
    for detail in status.details:
        message = kind()
        if detail.Unpack(message):  # False when the detail is of another type
            return message
    return None
