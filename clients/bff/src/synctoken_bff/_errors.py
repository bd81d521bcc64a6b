"""The one seam that turns a synctoken error into the HTTP response a browser gets."""

from __future__ import annotations

import math
from dataclasses import dataclass

from starlette.responses import JSONResponse

from synctoken.client import (
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    SynctokenError,
    Unauthenticated,
    Unavailable,
)


@dataclass(frozen=True)
class _Mapping:
    status: int
    # Only the browser's own mistakes are explained to it; the rest stay in the BFF's log,
    # since synctoken's messages name callers and policy that are none of the browser's business.
    message: str | None


# Most specific first: isinstance decides.
_MAPPINGS: tuple[tuple[type[SynctokenError], _Mapping], ...] = (
    (InvalidRequest, _Mapping(400, None)),
    (PermissionDenied, _Mapping(403, "the token service does not allow this token")),
    (RateLimited, _Mapping(429, "too many requests; try again later")),
    (Unavailable, _Mapping(503, "the token service is unavailable; try again later")),
    # The BFF's own certificate was refused: the fault is ours, upstream, not the browser's.
    (Unauthenticated, _Mapping(502, "the token service refused this server's credentials")),
)
_OTHER = _Mapping(502, "the token service failed")


def error_body(code: str, reason: str | None, message: str) -> dict[str, object]:
    """The JSON every error response carries."""
    return {"error": {"code": code, "reason": reason, "message": message}}


def error_response(error: SynctokenError) -> JSONResponse:
    """The response for a failed synctoken call: status by gRPC code, Retry-After when synctoken said when."""
    mapping = next((m for cls, m in _MAPPINGS if isinstance(error, cls)), _OTHER)
    headers = {"Cache-Control": "no-store"}
    if error.retry_after is not None and mapping.status in {429, 503}:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after.total_seconds())))
    body = error_body(error.code.name, error.reason, mapping.message or error.message)
    return JSONResponse(body, status_code=mapping.status, headers=headers)
