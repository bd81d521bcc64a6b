"""The demo page in headless Chromium (Debian's, driven by Playwright): the real Sync SDK, a token, a refresh."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from playwright.sync_api import Page, Response, sync_playwright

from support.bff import RunningBff
from support.browser import CHROMIUM, CHROMIUM_ARGS
from support.clients import SteppedClock, client_kwargs
from support.configs import config_text
from support.constants import ACCOUNT_SID, API_KEY_SID, API_SECRET, SERVICE_A
from support.inprocess import RunningServer, ServerHarness
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import free_port
from synctoken.client import AsyncTokenClient
from synctoken_bff import Settings, create_app
from synctoken_server.dev import devenv

# Every wait in the page is bounded by this (milliseconds).
PAGE_TIMEOUT = 20_000
SETTINGS = Settings(session_secret=b"k" * 32)


def rfc3339(seconds: int) -> str:
    """A JWT time claim as the BFF writes times."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


# A zone that is neither UTC nor a whole hour away, so that a time shown without its zone cannot pass for one with it.
TIME_ZONE = "Asia/Kolkata"


# Every test here drives a real browser or a draining server: left out of `make test-fast`.
pytestmark = pytest.mark.slow


class Browser:
    """A page in a fresh Chromium profile, recording every request and response; every token goes to the leak check."""

    def __init__(self, page: Page, watch: LeakWatch) -> None:
        self.page = page
        self.requests: list[str] = []
        self.statuses: dict[str, int] = {}
        self._watch = watch
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("response", self._on_response)

    def _on_response(self, response: Response) -> None:
        self.statuses[response.url] = response.status
        if response.url.endswith("/token") and response.ok:
            self._watch.tokens.add(response.json()["token"])

    def text(self, selector: str) -> str:
        """The text of the element `selector`."""
        return self.page.locator(selector).inner_text()

    def wait_for_text(self, selector: str, predicate: str) -> None:
        """Wait until the JavaScript `predicate` holds for `text`, the text of the element `selector`."""
        self.page.wait_for_function(f"(text => {predicate})(document.querySelector({selector!r}).textContent)")


@pytest.fixture
def browser(tmp_path: Path, leak_watch: LeakWatch) -> Iterator[Browser]:
    """Debian's Chromium, headless, in TIME_ZONE, with its own profile in this test's folder; a screenshot is left there."""
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "profile",
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            timeout=PAGE_TIMEOUT,
            timezone_id=TIME_ZONE,
            locale="en-US",
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


def start_bff(pki: Pki, port: int) -> RunningBff:
    """The BFF with the demo authenticator, against synctoken at `port`."""
    return RunningBff(create_app(AsyncTokenClient(f"localhost:{port}", **client_kwargs(pki, "bff")), SETTINGS))


def load(browser: Browser, bff: RunningBff) -> dict[str, Any]:
    """Open the page on Playwright's clock (so refresh_after comes without waiting); the first /token answer."""
    page = browser.page
    page.clock.install()
    with page.expect_response(lambda r: r.url.endswith("/token")) as loaded:
        page.goto(bff.url)
    first: dict[str, Any] = loaded.value.json()
    page.wait_for_function("window.syncDemo.client !== null")
    return first


def run_past_deadline(browser: Browser) -> None:
    """Past the page's deadline for Twilio, which is out of reach here: the page says it cannot connect."""
    browser.page.clock.run_for(16_000)
    browser.wait_for_text("#state", "text.startsWith('cannot connect')")


class TestDemoPage:
    """The page shows who and until when, starts a SyncClient with the token, and refreshes it at refresh_after."""

    def test_shows_the_token_and_refreshes_it(self, pki: Pki, shared_server: RunningServer, browser: Browser) -> None:
        """Identity and exp as the token says; SyncClient made with it; past refresh_after, updateToken gets a new one."""
        clock = SteppedClock()
        client = AsyncTokenClient(f"localhost:{shared_server.port}", **client_kwargs(pki, "bff"), clock=clock)
        bff = RunningBff(create_app(client, Settings(session_secret=b"k" * 32)))
        try:
            page = browser.page
            first = load(browser, bff)
            claims = jwt.decode(first["token"], API_SECRET, algorithms=["HS256"])
            assert browser.text("#identity") == claims["grants"]["identity"] == first["identity"]
            assert page.locator("#expires").get_attribute("datetime") == rfc3339(claims["exp"])
            assert page.evaluate("window.syncDemo.createdWith") == first["token"]
            assert page.evaluate("typeof window.syncDemo.client.updateToken") == "function"
            assert page.locator("#history li").count() == 1
            # The provider's state, coloured as the connection's is.
            assert browser.text("#token-state") == "fresh"
            assert "state-ok" in (page.locator("#token-state").get_attribute("class") or "")

            run_past_deadline(browser)

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
            assert browser.text("#refreshed").endswith("(fetched)")
            assert browser.text("#token-state") == "fresh"
            assert browser.text("#state").startswith("cannot connect to Twilio Sync: ")
            later = jwt.decode(second["token"], API_SECRET, algorithms=["HS256"])
            assert page.locator("#expires").get_attribute("datetime") == rfc3339(later["exp"])
            # The history grows with each token, saying why it came.
            history = page.locator("#history li").all_inner_texts()
            assert len(history) == 2
            assert "first token" in history[0]
            assert "refreshed (fetched)" in history[1]
            assert later["jti"] in history[1]
            # run_for left the page's clock an hour ahead of the BFF's, as a skewed browser's can be: the new
            # token's refresh_after, in the BFF's time, must not look due and start a loop of refreshes.
            page.clock.run_for(60_000)
            page.wait_for_timeout(1000)  # real time, for any fetch a loop would have started to come back
            assert page.locator("#history li").count() == 2
        finally:
            bff.close()
        # Nothing fetched but the BFF's own files and /token: no CDN, no third party.
        assert {url.split("/")[2] for url in browser.requests if url.startswith("http")} == {f"127.0.0.1:{bff.port}"}


class TestWhatThePageShows:
    """What people come to the page to check, each visible on it."""

    def test_decoded_token_without_its_signature(
        self, pki: Pki, shared_server: RunningServer, browser: Browser
    ) -> None:
        """The header and claims as JSON, the grant's fields and nbf/exp; no signature and no whole token on the page."""
        bff = start_bff(pki, shared_server.port)
        try:
            first = load(browser, bff)
            page = browser.page
            claims = jwt.decode(first["token"], API_SECRET, algorithms=["HS256"])
            assert json.loads(browser.text("#jwt-header")) == jwt.get_unverified_header(first["token"])
            assert json.loads(browser.text("#jwt-claims")) == claims
            assert browser.text("#service") == claims["grants"]["data_sync"]["service_sid"] == SERVICE_A
            assert browser.text("#endpoint").startswith("none")
            assert page.locator("#not-before").get_attribute("datetime") == rfc3339(claims["nbf"])
            signature = first["token"].rsplit(".", 1)[1]
            html = page.content()
            assert signature not in html
            assert signature not in page.locator("body").inner_text()
            # Not dev-signed: the suite's credentials are not the dev server's.
            assert page.locator("#dev-note").is_hidden()
        finally:
            bff.close()

    def test_times_countdowns_and_state(self, pki: Pki, shared_server: RunningServer, browser: Browser) -> None:
        """Expiry in the browser's named zone; countdowns that move; the state coloured by what it says."""
        bff = start_bff(pki, shared_server.port)
        try:
            load(browser, bff)
            page = browser.page
            expires = browser.text("#expires")
            # The zone by its offset and its name (Chromium's ICU still says Asia/Calcutta, the name's older spelling).
            assert "GMT+5:30" in expires
            assert expires.endswith(("(Asia/Kolkata)", "(Asia/Calcutta)"))
            before = (browser.text("#expires-in"), browser.text("#refresh-in"))
            assert all(text.startswith("(in ") for text in before)
            page.clock.run_for(2_000)
            browser.wait_for_text("#expires-in", f"text !== {before[0]!r}")
            assert browser.text("#refresh-in") != before[1]

            run_past_deadline(browser)
            state_element = page.locator("#state")
            assert "state-error" in (state_element.get_attribute("class") or "")
            # The class is styled: red, unlike the pending and connected states.
            assert state_element.evaluate("e => getComputedStyle(e).color") == "rgb(138, 16, 16)"
            state = browser.text("#state")
            # The SDK's own words here are "Socket error: undefined": the page says what that means instead.
            assert "undefined" not in state
            assert "Socket error" not in state
            assert "Twilio" in state.removeprefix("cannot connect to Twilio Sync: ")
        finally:
            bff.close()

    @pytest.mark.parametrize(
        ("error", "words"),
        [
            ({"message": "Socket error: undefined", "terminal": False}, "could not open its WebSocket to Twilio"),
            (
                {
                    "message": "Connection error: Invalid Access Token issuer/subject",
                    "httpStatusCode": 401,
                    "errorCode": 20103,
                },
                "Twilio refused the token (error 20103): Twilio does not know the account or API key that signed it",
            ),
            ({"message": "Connection error: x", "httpStatusCode": 401, "errorCode": 20104}, "the token has expired"),
            ({"message": "Connection error: busy", "httpStatusCode": 429, "errorCode": None}, "limiting how often"),
            ({"message": "undefined"}, "the SDK gave no reason"),
        ],
        ids=["socket error", "unknown key", "expired", "rate limited", "no reason"],
    )
    def test_connection_errors_in_words(
        self, pki: Pki, shared_server: RunningServer, browser: Browser, error: dict[str, Any], words: str
    ) -> None:
        """The SDK's connectionError, as the page explains it."""
        bff = start_bff(pki, shared_server.port)
        try:
            load(browser, bff)
            explained = browser.page.evaluate("e => window.syncDemo.explainConnectionError(e)", error)
        finally:
            bff.close()
        assert words in explained
        assert "undefined" not in explained

    def test_dev_signed_token_is_flagged(self, pki: Pki, harness: ServerHarness, browser: Browser) -> None:
        """A token signed with `synctoken dev`'s made-up credentials carries a visible note: Twilio will refuse it."""
        dev_config = (
            config_text(pki).replace(ACCOUNT_SID, devenv.DEV_ACCOUNT_SID).replace(API_KEY_SID, devenv.DEV_API_KEY_SID)
        )
        server = harness.start(dev_config)
        bff = start_bff(pki, server.port)
        try:
            first = load(browser, bff)
            assert jwt.decode(first["token"], API_SECRET, algorithms=["HS256"])["iss"] == devenv.DEV_API_KEY_SID
            note = browser.page.locator("#dev-note")
            assert note.is_visible()
            assert "Twilio will refuse it" in note.inner_text()
            run_past_deadline(browser)
            assert "dev-signed" in browser.text("#state")
        finally:
            bff.close()

    def test_token_service_down_shows_failing(self, pki: Pki, browser: Browser) -> None:
        """synctoken unreachable: the BFF answers 503, and the page says the provider is failing and will try again."""
        bff = start_bff(pki, free_port())
        try:
            page = browser.page
            page.clock.install()
            with page.expect_response(lambda r: r.url.endswith("/token")) as answered:
                page.goto(bff.url)
            assert answered.value.status == 503
            # One look at the state, its colour and the detail together: the clock runs, and a retry (full
            # jitter, possibly within milliseconds) turns the state to refreshing between two separate looks.
            page.wait_for_function(
                """() => {
                  const state = document.querySelector('#token-state');
                  const detail = document.querySelector('#token-detail').textContent;
                  return state.textContent === 'failing' && state.classList.contains('state-error')
                    && detail.includes('last attempt: GET /token: 503 ') && detail.includes('next attempt');
                }"""
            )
            assert browser.text("#state") == "fetching a token"
            assert page.evaluate("window.syncDemo.client") is None
        finally:
            bff.close()

    def test_favicon(self, pki: Pki, shared_server: RunningServer, browser: Browser) -> None:
        """The page's icon loads, /favicon.ico is the same icon, and nothing the page asked for was missing."""
        bff = start_bff(pki, shared_server.port)
        try:
            load(browser, bff)
            browser.page.wait_for_function("document.readyState === 'complete'")
            icon = httpx.get(f"{bff.url}/favicon.ico", timeout=10)
            linked = httpx.get(f"{bff.url}/favicon.svg", timeout=10)
        finally:
            bff.close()
        assert icon.status_code == 200
        assert icon.headers["content-type"] == "image/svg+xml"
        assert icon.content == linked.content
        assert icon.content.startswith(b"<svg")
        assert browser.statuses.get(f"{bff.url}/favicon.svg") == 200
        assert {url: status for url, status in browser.statuses.items() if status >= 400} == {}
