"""Support for tests in a real browser: Debian's Chromium through Playwright, and a token endpoint that answers what the test scripts, serving a page that runs the browser token provider (clients/browser/dist)."""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import BrowserContext, sync_playwright
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from support.bff import RunningBff
from support.constants import ROOT
from support.logcapture import LeakWatch

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking switches Chromium's own connections are refused en masse here.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROVIDER_DIST = ROOT / "clients/browser/dist/index.js"
# Every wait in a page is bounded by this (milliseconds).
PAGE_TIMEOUT = 20_000

# The page: the provider on /token, everything it reports kept in window.seen for the test (tokens in memory,
# as the page would; never in storage or the console).
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>token provider</title></head>
<body>
<script type="module">
import { tokenProvider } from "/provider.js";
const seen = { states: [], tokens: [], from: [], signedOut: 0 };
window.seen = seen;
// ?lag=ms: the provider's clock reads that much behind the page's, as a page's does while Playwright moves the
// other pages' clocks first.
const lag = Number(new URLSearchParams(location.search).get("lag") ?? 0);
window.provider = tokenProvider({
  url: "/token",
  now: lag ? () => Date.now() - lag : undefined,
  onState: (state, info) => seen.states.push({
    state, at: Date.now(), status: info.error?.status ?? null, retryAt: info.retryAt,
  }),
  onToken: (token, info) => { seen.tokens.push(token); seen.from.push(info.from); },
  onSignedOut: () => { seen.signedOut += 1; },
});
</script>
</body></html>
"""


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[BrowserContext]:
    """Debian's Chromium, headless, with its own profile folder; closed on the way out."""
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=PAGE_TIMEOUT
        )
        try:
            yield context
        finally:
            context.close()


@dataclass(frozen=True)
class Answer:
    """One scripted answer to GET /token: a token valid for `expires_in`, due at `refresh_in`, or an error."""

    status: int = 200
    refresh_in: float = 60.0
    expires_in: float = 120.0
    retry_after: str | None = None


@dataclass
class TokenEndpoint:
    """GET /token answering the scripted answers in turn (then tokens with the default times), counting requests."""

    # Not in the repr: an assertion's message must not print the tokens.
    watch: LeakWatch = field(repr=False)
    script: deque[Answer] = field(default_factory=deque, repr=False)
    requests: int = 0
    issued: list[str] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def then(self, *answers: Answer) -> TokenEndpoint:
        """Queue these answers."""
        with self._lock:
            self.script.extend(answers)
        return self

    def count(self) -> int:
        """How many requests came so far."""
        with self._lock:
            return self.requests

    async def handle(self, _: Request) -> Response:
        """The next scripted answer."""
        with self._lock:
            self.requests += 1
            answer = self.script.popleft() if self.script else Answer()
        headers = {"Cache-Control": "no-store"}
        if answer.status != 200:
            if answer.retry_after is not None:
                headers["Retry-After"] = answer.retry_after
            error = {"error": {"code": "UNAVAILABLE", "reason": None, "message": "scripted"}}
            return JSONResponse(error, status_code=answer.status, headers=headers)
        token = f"test-token-{secrets.token_hex(16)}"
        self.watch.tokens.add(token)
        with self._lock:
            self.issued.append(token)
        now = dt.datetime.now(dt.UTC)
        body = {
            "identity": "alice",
            "token": token,
            "expires_at": _rfc3339(now + dt.timedelta(seconds=answer.expires_in)),
            "refresh_after": _rfc3339(now + dt.timedelta(seconds=answer.refresh_in)),
        }
        return JSONResponse(body, headers=headers)


def serve_token_page(endpoint: TokenEndpoint) -> RunningBff:
    """The page, the provider's built module and `endpoint` on a real server on loopback."""

    async def page(_: Request) -> Response:
        return HTMLResponse(PAGE)

    async def provider(_: Request) -> Response:
        return FileResponse(PROVIDER_DIST, media_type="text/javascript")

    routes = [
        Route("/", page),
        Route("/provider.js", provider),
        Route("/token", endpoint.handle),
    ]
    return RunningBff(Starlette(routes=routes))


def _rfc3339(moment: dt.datetime) -> str:
    # As the BFF writes them: whole seconds, rounded down, Z.
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")
