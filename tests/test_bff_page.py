"""The demo page in headless Chromium (Debian's, driven by Playwright): the real Sync SDK, a token, a refresh."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from playwright.sync_api import Page, Response, sync_playwright

from bff_support import RunningBff
from client_support import SteppedClock, client_kwargs
from support import API_SECRET, LeakWatch, Pki, RunningServer
from synctoken.client import AsyncTokenClient
from synctoken_bff import Settings, create_app

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
# Every wait in the page is bounded by this (milliseconds).
PAGE_TIMEOUT = 20_000


def rfc3339(seconds: int) -> str:
    """A JWT time claim as the BFF writes times."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


class Browser:
    """A page in a fresh Chromium profile, recording every request; every token it gets goes to the leak check."""

    def __init__(self, page: Page, watch: LeakWatch) -> None:
        self.page = page
        self.requests: list[str] = []
        self._watch = watch
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("response", self._on_response)

    def _on_response(self, response: Response) -> None:
        if response.url.endswith("/token") and response.ok:
            self._watch.tokens.add(response.json()["token"])

    def text(self, selector: str) -> str:
        """The text of the element `selector`."""
        return self.page.locator(selector).inner_text()


@pytest.fixture
def browser(tmp_path: Path, leak_watch: LeakWatch) -> Iterator[Browser]:
    """Debian's Chromium, headless, with its own profile in this test's folder; a screenshot is left there."""
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "profile",
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            timeout=PAGE_TIMEOUT,
            # The page's CSP forbids eval, which Playwright's string predicates use; requests are checked instead.
            bypass_csp=True,
        )
        try:
            page = context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT)
            yield Browser(page, leak_watch)
            page.screenshot(path=tmp_path / "page.png", full_page=True)
        finally:
            context.close()


class TestDemoPage:
    """The page shows who and until when, starts a SyncClient with the token, and refreshes it at refresh_after."""

    def test_shows_the_token_and_refreshes_it(self, pki: Pki, shared_server: RunningServer, browser: Browser) -> None:
        """Identity and exp as the token says; SyncClient made with it; past refresh_after, updateToken gets a new one."""
        clock = SteppedClock()
        client = AsyncTokenClient(f"localhost:{shared_server.port}", **client_kwargs(pki, "bff"), clock=clock)
        bff = RunningBff(create_app(client, Settings(session_secret=b"k" * 32)))
        try:
            page = browser.page
            # The page's timers run on Playwright's clock, so refresh_after is reached without waiting an hour.
            page.clock.install()
            with page.expect_response(lambda r: r.url.endswith("/token")) as loaded:
                page.goto(bff.url)
            first = loaded.value.json()
            page.wait_for_function("window.syncDemo.client !== null")
            claims = jwt.decode(first["token"], API_SECRET, algorithms=["HS256"])
            assert browser.text("#identity") == claims["grants"]["identity"] == first["identity"]
            assert page.locator("#expires").get_attribute("datetime") == rfc3339(claims["exp"])
            assert page.evaluate("window.syncDemo.createdWith") == first["token"]
            assert page.evaluate("typeof window.syncDemo.client.updateToken") == "function"

            # Twilio is out of reach: the page says so plainly once its deadline passes.
            page.clock.run_for(16_000)
            page.wait_for_function("document.getElementById('state').textContent.startsWith('cannot connect')")

            # A token minted in a later second differs (its jti holds the second), so a refresh is visible.
            time.sleep(max(0.0, claims["nbf"] + 1.05 - time.time()))
            refresh_after = dt.datetime.fromisoformat(first["refresh_after"])
            clock.set(refresh_after + dt.timedelta(seconds=1))  # the BFF's cache sees the token as due
            now_ms = page.evaluate("Date.now()")
            with page.expect_response(lambda r: r.url.endswith("/token")) as refreshed:
                page.clock.run_for(max(0, int(refresh_after.timestamp() * 1000) - now_ms + 1000))
            second = refreshed.value.json()
            page.wait_for_function("window.syncDemo.updatedWith.length > 0")
            assert second["identity"] == first["identity"]
            assert second["token"] != first["token"]
            assert page.evaluate("window.syncDemo.updatedWith[0]") == second["token"]
            assert browser.text("#refreshed").endswith("(timer)")
            assert browser.text("#state").startswith("cannot connect to Twilio Sync (no route to Twilio?): ")
            later = jwt.decode(second["token"], API_SECRET, algorithms=["HS256"])
            assert page.locator("#expires").get_attribute("datetime") == rfc3339(later["exp"])
        finally:
            bff.close()
        # Nothing fetched but the BFF's own files and /token: no CDN, no third party.
        assert {url.split("/")[2] for url in browser.requests if url.startswith("http")} == {f"127.0.0.1:{bff.port}"}
