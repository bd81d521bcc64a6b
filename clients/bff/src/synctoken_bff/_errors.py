"""The one seam that turns a refusal, synctoken's or the BFF's own, into the HTTP response a browser gets."""

from __future__ import annotations

import math
from dataclasses import dataclass

from starlette.responses import JSONResponse

from synctoken.client import (
    Cause,
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    SynctokenError,
    Unauthenticated,
    Unavailable,
)

RATE_LIMITED = "RATE_LIMITED"
"""The ErrorInfo reason of synctoken's rate limits: the only RESOURCE_EXHAUSTED that waiting can cure."""
OPERATOR_FIELDS = frozenset({"sync", "sync.service_sid", "ttl", "region"})
"""Request fields the BFF's settings fill in, never the browser: a rule broken there is the operator's to fix."""


@dataclass(frozen=True)
class Mapping:
    """How one synctoken error is answered."""

    status: int
    # Only the browser's own mistakes are explained to it; the rest stay in the BFF's log,
    # since synctoken's messages name callers and policy that are none of the browser's business.
    message: str | None
    operator_fault: bool = False
    """The BFF's own settings are wrong: logged as an error, for the operator rather than the browser."""


_RATE_LIMITED = Mapping(429, "too many requests; try again later")
# A RESOURCE_EXHAUSTED without RATE_LIMITED is gRPC refusing the request's size: waiting will not help.
_TOO_LARGE = Mapping(502, "the token service could not take this request")
_BAD_SETTINGS = Mapping(502, "the token service refused this server's settings", operator_fault=True)
# No retry cures a refused handshake: the BFF's or synctoken's certificates must change, the operator's to do.
_TLS_FAILED = Mapping(502, "this server cannot connect to the token service", operator_fault=True)
# Most specific first: isinstance decides.
_MAPPINGS: tuple[tuple[type[SynctokenError], Mapping], ...] = (
    (InvalidRequest, Mapping(400, None)),
    (PermissionDenied, Mapping(403, "the token service does not allow this token")),
    (Unavailable, Mapping(503, "the token service is unavailable; try again later")),
    # The BFF's own certificate was refused: the fault is ours, upstream, not the browser's.
    (Unauthenticated, Mapping(502, "the token service refused this server's credentials")),
)
_OTHER = Mapping(502, "the token service failed")


def error_body(code: str, reason: str | None, message: str) -> dict[str, object]:
    """The JSON every error response carries."""
    return {"error": {"code": code, "reason": reason, "message": message}}


class Refusal(Exception):
    """A request the BFF refuses itself, before asking synctoken: raised, then answered by `response()`."""

    def __init__(self, status: int, code: str, reason: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.reason = reason
        self.message = message
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        """The JSON error response, with Retry-After when the refusal says when."""
        headers = {"Cache-Control": "no-store"}
        if self.retry_after is not None:
            headers["Retry-After"] = _seconds(self.retry_after)
        return JSONResponse(error_body(self.code, self.reason, self.message), status_code=self.status, headers=headers)


def mapping_for(error: SynctokenError) -> Mapping:
    """How `error` is answered."""
    if error.cause is Cause.TLS_HANDSHAKE_FAILED:
        return _TLS_FAILED
    if isinstance(error, RateLimited):
        return _RATE_LIMITED if error.reason == RATE_LIMITED else _TOO_LARGE
    if isinstance(error, InvalidRequest) and any(f in OPERATOR_FIELDS for f, _ in error.field_violations):
        return _BAD_SETTINGS
    return next((m for cls, m in _MAPPINGS if isinstance(error, cls)), _OTHER)


def error_response(error: SynctokenError, mapping: Mapping) -> JSONResponse:
    """The response for a failed synctoken call: status by `mapping`, Retry-After when synctoken said when."""
    headers = {"Cache-Control": "no-store"}
    if error.retry_after is not None and mapping.status in {429, 503}:
        headers["Retry-After"] = _seconds(error.retry_after.total_seconds())
    body = error_body(error.code.name, error.reason, mapping.message or error.message)
    return JSONResponse(body, status_code=mapping.status, headers=headers)


def _seconds(delay: float) -> str:
    # Whole seconds, rounded up (so that a client honouring it is not refused again), and at least one.
    return str(max(1, math.ceil(delay)))
