"""The Starlette app: GET /token for the signed-in user, GET /healthz, and the demo page at /."""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from synctoken.client import IssuedToken, SynctokenError
from synctoken_bff._errors import error_body, error_response
from synctoken_bff._session import AnonymousSessions
from synctoken_bff._settings import Settings

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


def create_app(client: TokenSource, settings: Settings, authenticate: Authenticate | None = None) -> Starlette:
    """The BFF. Without `authenticate`, each browser gets an anonymous identity kept in a signed cookie."""
    token = _TokenRoute(client, settings, authenticate)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await client.close()

    middleware = []
    if settings.allowed_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.allowed_origins),
                allow_methods=["GET"],
                allow_credentials=True,
            )
        )
    routes = [
        Route("/token", token.handle, methods=["GET"]),
        Route("/healthz", _healthz, methods=["GET"]),
        Mount("/", StaticFiles(directory=STATIC, html=True)),
    ]
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


class _TokenRoute:
    """GET /token: the user's token from the client's cache, or the error synctoken gave, as JSON."""

    def __init__(self, client: TokenSource, settings: Settings, authenticate: Authenticate | None) -> None:
        self._client = client
        self._settings = settings
        self._sessions: AnonymousSessions | None = None
        if authenticate is None:
            self._sessions = AnonymousSessions(settings.session_secret)
            authenticate = self._sessions.authenticate
        self._authenticate = authenticate

    async def handle(self, request: Request) -> Response:
        """The response for one request (a method, so that Starlette calls it with the request)."""
        identity = self._authenticate(request)
        if inspect.isawaitable(identity):
            identity = await identity
        if not identity:
            body = error_body("UNAUTHENTICATED", "NO_USER", "sign in first")
            return JSONResponse(body, status_code=401, headers={"Cache-Control": "no-store"})
        response = await self._token(identity, request.query_params.get("device", ""))
        if self._sessions is not None:
            self._sessions.remember(request, response)
        return response

    async def _token(self, identity: str, device: str) -> Response:
        try:
            issued = await self._client.get_token(
                identity, service_sid=self._settings.sync_service_sid, endpoint_id=device, ttl=self._settings.token_ttl
            )
        except SynctokenError as exc:
            # The error's str() is synctoken's code, reason and message: no token, no secret.
            _log.warning("token.refused identity=%s error=%s", identity, exc)
            return error_response(exc)
        # token_id is a hash prefix, made for logs; the token itself never goes there.
        _log.info("token.served identity=%s token_id=%s", identity, issued.token_id)
        body = {
            "identity": issued.identity,
            "token": issued.token,
            "expires_at": _rfc3339(issued.expires_at),
            "refresh_after": _rfc3339(issued.refresh_after),
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})


async def _healthz(_: Request) -> Response:
    # Liveness of this process only: a synctoken outage shows as 503s on /token, not as a dead BFF.
    return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})


def _rfc3339(moment: dt.datetime) -> str:
    # Whole seconds, rounded down: refresh_after may only move earlier, and exp is whole already.
    return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
