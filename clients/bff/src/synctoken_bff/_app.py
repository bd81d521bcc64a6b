"""The Starlette app: GET /token for the signed-in user, GET /healthz, and the demo page at /."""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from synctoken.audithash import IdentityHasher
from synctoken.client import Cause, IssuedToken, SynctokenError
from synctoken_bff._cors import Cors
from synctoken_bff._errors import Refusal, error_body, error_response, mapping_for
from synctoken_bff._session import AnonymousSessions
from synctoken_bff._settings import ENV_SESSION_SECRET_FILE, ENV_SYNC_SERVICE_SID, ENV_TOKEN_TTL, Settings
from synctoken_bff._tracing import middleware, trace_id

STATIC = Path(__file__).parent / "static"
_log = logging.getLogger("synctoken_bff")

Authenticate = Callable[[Request], str | Awaitable[str | None] | None]
"""The integration point for a real login: the signed-in user's id for a request, or None (401)."""


class TokenSource(Protocol):
    """What the app needs of AsyncTokenClient: its cached get_token, and close."""

    async def get_token(
        self, identity: str, *, service_sid: str = "", endpoint_id: str = "", ttl: dt.timedelta | None = None
    ) -> IssuedToken:
        """A token for `identity`, reused until its refresh_after."""
        ...

    async def close(self) -> None:
        """Release the connection."""
        ...


MAX_QUERY_BYTES = 4096
"""A longer query string is refused with 414: ?device= at its limit, percent-encoded, fits well within this."""
MAX_DEVICE_CHARACTERS = 256
"""synctoken's limit on endpoint_id: a longer ?device= could never succeed, so synctoken is not asked."""


def create_app(client: TokenSource, settings: Settings, authenticate: Authenticate | None = None) -> Starlette:
    """The BFF. Without `authenticate`, each browser gets an anonymous identity kept in a signed cookie."""
    token = _TokenRoute(client, settings, authenticate)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await client.close()

    # OPTIONS only with CORS: without it there is no preflight to answer, and 405 says so.
    methods = ["GET", "OPTIONS"] if settings.allowed_origins else ["GET"]
    routes = [
        Route("/token", token.handle, methods=methods),
        Route("/healthz", _healthz, methods=["GET"]),
        Route("/favicon.ico", _favicon, methods=["GET"]),
        Mount("/", StaticFiles(directory=STATIC, html=True)),
    ]
    # A server span per request when the application traces (see _tracing): the outermost middleware.
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware())


class _TokenRoute:
    """GET /token: the user's token from the client's cache, or the error synctoken gave, as JSON."""

    def __init__(self, client: TokenSource, settings: Settings, authenticate: Authenticate | None) -> None:
        self._client = client
        self._settings = settings
        self._cors = Cors(settings.allowed_origins) if settings.allowed_origins else None
        key = settings.identity_hash_key
        self._hash = IdentityHasher(key) if key is not None else None
        self._sessions: AnonymousSessions | None = None
        if authenticate is None:
            self._sessions = AnonymousSessions(_session_secret(settings), settings.new_identity_limit)
            authenticate = self._sessions.authenticate
        self._authenticate = authenticate

    async def handle(self, request: Request) -> Response:
        """The response for one request (a method, so that Starlette calls it with the request)."""
        if self._cors is None:
            return await self._respond(request)
        if request.method == "OPTIONS":
            return self._cors.preflight(request)
        response = await self._respond(request)
        self._cors.decorate(request, response)
        return response

    async def _respond(self, request: Request) -> Response:
        try:
            # The input first: a request that can never succeed costs no identity and no RPC.
            device = _device(request)
            identity = self._authenticate(request)
            if inspect.isawaitable(identity):
                identity = await identity
        except Refusal as refusal:
            return refusal.response()
        if not identity:
            body = error_body("UNAUTHENTICATED", "NO_USER", "sign in first")
            return JSONResponse(body, status_code=401, headers={"Cache-Control": "no-store"})
        response = await self._token(identity, device)
        if self._sessions is not None:
            self._sessions.remember(request, response)
        return response

    async def _token(self, identity: str, device: str) -> Response:
        try:
            issued = await self._client.get_token(
                identity, service_sid=self._settings.sync_service_sid, endpoint_id=device, ttl=self._settings.token_ttl
            )
        except SynctokenError as exc:
            mapping = mapping_for(exc)
            # The error's str() is synctoken's code, reason and message: no token, no secret, no identity.
            if exc.cause is Cause.TLS_HANDSHAKE_FAILED:
                # The message says which side refused and why; nothing to do with this browser.
                _log.error(
                    "token.refused%s%s status=%d error=%s (check SYNCTOKEN_CA_FILE, SYNCTOKEN_CERT_FILE, "
                    "SYNCTOKEN_KEY_FILE (or the Workload API's SVID and SYNCTOKEN_SERVER_SPIFFE_ID) and "
                    "SYNCTOKEN_SERVER_NAME against synctoken's certificate and client CA)",
                    self._who(identity),
                    trace_id(),
                    mapping.status,
                    exc,
                )
            elif mapping.operator_fault:
                _log.error(
                    "token.refused%s%s status=%d error=%s (synctoken refuses this BFF's settings: check %s and %s "
                    "against the caller's policy)",
                    self._who(identity),
                    trace_id(),
                    mapping.status,
                    exc,
                    ENV_TOKEN_TTL,
                    ENV_SYNC_SERVICE_SID,
                )
            else:
                _log.warning(
                    "token.refused%s%s status=%d error=%s", self._who(identity), trace_id(), mapping.status, exc
                )
            return error_response(exc, mapping)
        # token_id is a hash prefix, made for logs; the token itself never goes there.
        _log.info("token.served%s%s token_id=%s", self._who(identity), trace_id(), issued.token_id)
        body = {
            "identity": issued.identity,
            "token": issued.token,
            "expires_at": _rfc3339(issued.expires_at),
            "refresh_after": _rfc3339(issued.refresh_after),
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    def _who(self, identity: str) -> str:
        # The identity only as its keyed hash: a plain user id in a log is personal data anyone reading it has.
        return f" identity={self._hash(identity)}" if self._hash is not None else ""


def _device(request: Request) -> str:
    """?device=, checked against what synctoken would take; raise Refusal otherwise."""
    if len(request.scope["query_string"]) > MAX_QUERY_BYTES:
        message = f"the query string is over {MAX_QUERY_BYTES} bytes"
        raise Refusal(414, "INVALID_ARGUMENT", "URI_TOO_LONG", message)
    devices = request.query_params.getlist("device")
    if len(devices) > 1:
        raise Refusal(400, "INVALID_ARGUMENT", "INVALID_REQUEST", "device is given more than once")
    device = devices[0] if devices else ""
    if len(device) > MAX_DEVICE_CHARACTERS:
        message = f"device is {len(device)} characters; the limit is {MAX_DEVICE_CHARACTERS}"
        raise Refusal(400, "INVALID_ARGUMENT", "INVALID_REQUEST", message)
    return device


def _session_secret(settings: Settings) -> bytes:
    if settings.session_secret is not None:
        return settings.session_secret
    # Fine for a demo; behind a balancer every process would sign differently, and a restart logs everyone out.
    # Said here, not when reading the settings: only the demo authenticator signs, and every fatal check is done.
    _log.warning(
        "%s is not set: signing session cookies with a random key for this process only", ENV_SESSION_SECRET_FILE
    )
    return secrets.token_bytes(32)


async def _healthz(_: Request) -> Response:
    # Liveness of this process only: a synctoken outage shows as 503s on /token, not as a dead BFF.
    return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})


async def _favicon(_: Request) -> Response:
    # The page links favicon.svg, but browsers and tools still ask for /favicon.ico by convention: the same
    # icon, rather than a 404 in every access log. Browsers go by the content type, not the name.
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


def _rfc3339(moment: dt.datetime) -> str:
    # Whole seconds, rounded down: refresh_after may only move earlier, and exp is whole already.
    return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
