"""Credentialed CORS for GET /token, for an exact set of origins and nothing else.

Starlette's CORSMiddleware would do, but it also takes "*" (and then echoes
any Origin when a cookie comes along) and leaves out `Vary: Origin` when it
refuses an origin. This is small enough to own: an Origin header is allowed
only when it equals one of the configured origins as a whole string, and
every answer from a BFF with CORS says `Vary: Origin`, since every one of
them depends on it.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from synctoken_bff._errors import error_body

# How long a browser may reuse a preflight answer; Chromium caps it at 2 hours anyway.
_MAX_AGE_SECONDS = 600
_EXPOSED = "Date, Retry-After"


class Cors:
    """The CORS headers for one set of allowed origins (already normalised by Settings)."""

    def __init__(self, allowed_origins: tuple[str, ...]) -> None:
        self._allowed = frozenset(allowed_origins)

    def allowed_origin(self, request: Request) -> str | None:
        """The request's Origin if it is allowed, else None (no Origin, "null", or any other origin)."""
        origin = request.headers.get("origin")
        return origin if origin in self._allowed else None

    def decorate(self, request: Request, response: Response) -> None:
        """Add the headers an actual (non-preflight) request from an allowed origin gets, and Vary: Origin always."""
        _vary_on_origin(response)
        origin = self.allowed_origin(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            # Neither is CORS-safelisted, and the browser token provider needs both: Date to read
            # refresh_after on the BFF's clock, Retry-After to wait as long as a 429 or 503 says.
            response.headers["Access-Control-Expose-Headers"] = _EXPOSED

    def preflight(self, request: Request) -> Response:
        """The answer to OPTIONS /token: the go-ahead for a GET without extra headers from an allowed origin only."""
        origin = self.allowed_origin(request)
        method = request.headers.get("access-control-request-method")
        # Only CORS-safelisted headers are ever needed for GET /token, and browsers do not list those.
        asks_headers = bool(request.headers.get("access-control-request-headers", "").strip())
        if origin is None or method != "GET" or asks_headers:
            body = error_body("PERMISSION_DENIED", "CORS_NOT_ALLOWED", "this cross-origin request is not allowed")
            response: Response = JSONResponse(body, status_code=403, headers={"Cache-Control": "no-store"})
            _vary_on_origin(response)
            return response
        response = Response(
            status_code=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Allow-Methods": "GET",
                "Access-Control-Max-Age": str(_MAX_AGE_SECONDS),
                "Cache-Control": "no-store",
            },
        )
        _vary_on_origin(response)
        return response


def _vary_on_origin(response: Response) -> None:
    vary = response.headers.get("Vary")
    if vary is None:
        response.headers["Vary"] = "Origin"
    elif "origin" not in {v.strip().lower() for v in vary.split(",")}:
        response.headers["Vary"] = f"{vary}, Origin"
