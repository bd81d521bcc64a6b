"""The browser token provider (clients/browser) in headless Chromium, on Playwright's paused clock, against a real token endpoint on loopback."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, ConsoleMessage, Page

from support.bff import RunningBff
from support.browser import PAGE_TIMEOUT, Answer, TokenEndpoint, chromium, serve_token_page
from support.logcapture import LeakWatch

# The provider's Retry-After jitter (clients/browser/src/schedule.js RETRY_AFTER_JITTER).
RETRY_AFTER_JITTER = 0.2

# A real browser each: left out of `make test-fast`.
pytestmark = pytest.mark.slow


@dataclass
class Browser:
    """Chromium's context on a paused fake clock, the token endpoint it talks to, and what its pages said."""

    context: BrowserContext
    endpoint: TokenEndpoint
    server: RunningBff
    console: list[str] = field(default_factory=list)
    pages: list[Page] = field(default_factory=list)

    def open(self, clock_lag_ms: int = 0) -> Page:
        """A new tab on the provider's page, once the provider has its first token; its provider's clock `clock_lag_ms` behind."""
        page = self.context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT)
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))
        page.goto(f"{self.server.url}?lag={clock_lag_ms}" if clock_lag_ms else self.server.url)
        page.wait_for_function("window.seen !== undefined && window.seen.tokens.length === 1")
        self.pages.append(page)
        return page

    def _on_console(self, message: ConsoleMessage) -> None:
        self.console.append(message.text)


@pytest.fixture
def browser(tmp_path: Path, leak_watch: LeakWatch) -> Iterator[Browser]:
    """Debian's Chromium, headless, its clock installed and paused, and a scripted token endpoint; no token may be left in storage or the console."""
    endpoint = TokenEndpoint(leak_watch)
    server = serve_token_page(endpoint)
    try:
        with chromium(tmp_path / "profile") as context:
            # Paused: page time moves only when a test moves it, so every delay below is exact.
            start = dt.datetime.now(dt.UTC).replace(microsecond=0)
            context.clock.install(time=start)
            context.clock.pause_at(start + dt.timedelta(seconds=1))
            opened = Browser(context, endpoint, server)
            yield opened
            for page in opened.pages:
                assert_no_token_kept(page, endpoint.issued)
            assert not [line for line in opened.console if any(token in line for token in endpoint.issued)]
    finally:
        server.close()


def assert_no_token_kept(page: Page, tokens: list[str]) -> None:
    """No token in the page's localStorage or sessionStorage, keys or values."""
    stored: str = page.evaluate("JSON.stringify([localStorage, sessionStorage].map(s => Object.entries(s)))")
    assert not [token for token in tokens if token in stored]


def seen(page: Page) -> dict[str, Any]:
    """What the page's provider reported: states, tokens, sign-outs."""
    result: dict[str, Any] = page.evaluate("window.seen")
    return result


def state(page: Page) -> str:
    """The provider's state now."""
    current: str = page.evaluate("window.provider.state")
    return current


def wait_for_tokens(page: Page, count: int) -> None:
    """Wait until the page's provider has had `count` tokens."""
    page.wait_for_function(f"window.seen.tokens.length >= {count}")


def settle(page: Page) -> None:
    """Let whatever the page started (a fetch and its answer) finish: a round trip to the endpoint and back."""
    page.evaluate("fetch('/provider.js', {cache: 'no-store'}).then(r => r.text()).then(() => null)")


def jump(page: Page, ms: int) -> None:
    """Move the page's wall clock `ms` ahead without firing a timer, as sleep or a throttled background tab does."""
    # Playwright's Python API takes seconds.
    page.clock.set_system_time((page.evaluate("Date.now()") + ms) / 1000)


def set_visibility(page: Page, visibility: str) -> None:
    """Make the document say it is `visibility` ("hidden", "visible"), and tell it, as a tab switch does."""
    page.evaluate(
        """v => {
            Object.defineProperty(document, "visibilityState", { configurable: true, get: () => v });
            Object.defineProperty(document, "hidden", { configurable: true, get: () => v === "hidden" });
            document.dispatchEvent(new Event("visibilitychange"));
        }""",
        visibility,
    )


class TestRefresh:
    """A new token at refresh_after, and at once when the page comes back after its timers were held back."""

    def test_refreshes_at_refresh_after(self, browser: Browser) -> None:
        """Nothing before refresh_after (60 s); a fetch once it passes, and the new token handed out."""
        page = browser.open()
        page.clock.run_for(58_000)
        assert (state(page), len(seen(page)["tokens"]), browser.endpoint.count()) == ("fresh", 1, 1)
        page.clock.run_for(3_000)
        wait_for_tokens(page, 2)
        assert browser.endpoint.count() == 2
        assert page.evaluate("window.provider.token()") == browser.endpoint.issued[1]
        assert [s["state"] for s in seen(page)["states"]] == ["refreshing", "fresh", "refreshing", "fresh"]

    def test_hidden_tab_refreshes_when_visible(self, browser: Browser) -> None:
        """A hidden tab whose timer did not fire (throttled) refreshes as soon as it becomes visible."""
        page = browser.open()
        set_visibility(page, "hidden")
        # Throttled: the wall clock moves past refresh_after, the timer does not fire.
        jump(page, 90_000)
        page.evaluate("window.dispatchEvent(new Event('blur'))")
        settle(page)
        assert (state(page), browser.endpoint.count()) == ("stale", 1)
        set_visibility(page, "visible")
        wait_for_tokens(page, 2)
        assert browser.endpoint.count() == 2
        assert state(page) == "fresh"

    @pytest.mark.parametrize(
        "event",
        [
            "window.dispatchEvent(new FocusEvent('focus'))",
            "window.dispatchEvent(new PageTransitionEvent('pageshow', { persisted: true }))",
            "document.dispatchEvent(new Event('resume'))",
        ],
        ids=["focus", "pageshow from the back/forward cache", "resume from freezing"],
    )
    def test_wake_events_check_the_clock(self, browser: Browser, event: str) -> None:
        """Past refresh_after with the timer held back, each sign of the page coming back fetches at once."""
        page = browser.open()
        jump(page, 90_000)
        page.evaluate("window.dispatchEvent(new PageTransitionEvent('pageshow', { persisted: false }))")
        settle(page)
        assert (state(page), browser.endpoint.count()) == ("stale", 1)
        page.evaluate(event)
        wait_for_tokens(page, 2)
        assert browser.endpoint.count() == 2

    def test_sleep_past_exp_refreshes_before_use(self, browser: Browser) -> None:
        """After a sleep past exp (the clock jumps, no timer fires), token() fetches and hands out a new token, not the dead one."""
        page = browser.open()
        jump(page, 3 * 3600_000)
        assert state(page) == "expired"
        token = page.evaluate("window.provider.token()")
        assert token == browser.endpoint.issued[1]
        assert browser.endpoint.count() == 2

    def test_offline_then_online(self, browser: Browser) -> None:
        """Offline at refresh_after: the fetch fails and the token goes stale; back online, it is fetched at once."""
        page = browser.open()
        browser.context.set_offline(True)
        page.clock.run_for(61_000)
        page.wait_for_function("window.provider.error !== null && window.provider.error.status === 0")
        assert state(page) == "stale"
        assert browser.endpoint.count() == 1
        browser.context.set_offline(False)  # the browser fires `online`: the clock stays paused
        wait_for_tokens(page, 2)
        assert browser.endpoint.count() == 2
        assert state(page) == "fresh"


class TestTabs:
    """The tabs of one origin share a refresh."""

    def test_ten_tabs_one_fetch(self, browser: Browser) -> None:
        """Ten tabs whose tokens fall due together make one request, and all get its token."""
        pages = [browser.open() for _ in range(10)]
        opened = browser.endpoint.count()
        pages[0].clock.run_for(61_000)
        for page in pages:
            wait_for_tokens(page, 2)
        for page in pages:
            settle(page)
        assert browser.endpoint.count() == opened + 1
        newest = browser.endpoint.issued[-1]
        assert {page.evaluate("window.seen.tokens.at(-1)") for page in pages} == {newest}
        assert {state(page) for page in pages} == {"fresh"}

    def test_tab_whose_clock_lags_makes_no_request(self, browser: Browser) -> None:
        """A tab whose clock reads behind the fetching tab's (Playwright moves each page's clock in turn) takes its tokens and makes no request of its own."""
        first = browser.open()
        behind = browser.open(clock_lag_ms=10_000)
        assert browser.endpoint.count() == 1
        first.clock.run_for(61_000)
        wait_for_tokens(behind, 2)
        settle(behind)
        assert browser.endpoint.count() == 2
        assert seen(behind)["tokens"] == browser.endpoint.issued
        assert seen(behind)["from"] == ["tab", "tab"]
        assert state(behind) == "fresh"


class TestLaterTab:
    """A tab opened later asks the tabs open before it for their fresh token before it fetches."""

    def test_takes_the_others_fresh_token(self, browser: Browser) -> None:
        """Opened while the first tab's token is fresh: no request, the same token from "tab", due at the first's refresh_after."""
        first = browser.open()
        first.clock.run_for(30_000)
        second = browser.open()
        assert browser.endpoint.count() == 1
        assert seen(second)["tokens"] == seen(first)["tokens"]
        assert (seen(first)["from"], seen(second)["from"]) == (["fetch"], ["tab"])
        assert state(second) == "fresh"
        assert providers_present(second) == 2
        # The token's times came with it: both fall due together, 60 s after the first fetched.
        first.clock.run_for(29_000)
        settle(second)
        assert (browser.endpoint.count(), len(seen(second)["tokens"])) == (1, 1)
        first.clock.run_for(2_000)
        # (How many requests that refresh makes is the turn-taking's business: test_ten_tabs_one_fetch.)
        wait_for_tokens(first, 2)
        wait_for_tokens(second, 2)
        assert {state(first), state(second)} == {"fresh"}

    def test_fetches_when_the_others_token_is_due(self, browser: Browser) -> None:
        """Opened while the first tab's token is past refresh_after (its timer held back): one request, its token shared back."""
        first = browser.open()
        jump(first, 61_000)
        assert state(first) == "stale"
        second = browser.open()
        assert seen(second)["from"] == ["fetch"]
        wait_for_tokens(first, 2)
        settle(second)
        assert browser.endpoint.count() == 2
        assert seen(first)["tokens"][-1] == seen(second)["tokens"][0] == browser.endpoint.issued[1]

    def test_lone_tab_fetches_once(self, browser: Browser) -> None:
        """A tab with no other provider open fetches its first token itself, with one request and no wait on the (paused) clock."""
        page = browser.open()
        settle(page)
        assert browser.endpoint.count() == 1
        assert seen(page)["from"] == ["fetch"]
        assert [s["state"] for s in seen(page)["states"]] == ["refreshing", "fresh"]
        assert providers_present(page) == 1

    def test_fetches_after_the_other_stopped(self, browser: Browser) -> None:
        """Opened after the first tab's provider stopped (its lock let go): it fetches for itself."""
        first = browser.open()
        first.evaluate("window.provider.stop()")
        wait_for_providers(first, 0)
        second = browser.open()
        settle(second)
        assert browser.endpoint.count() == 2
        assert seen(second)["from"] == ["fetch"]
        assert seen(second)["tokens"] == [browser.endpoint.issued[1]]

    def test_page_hidden_in_the_back_forward_cache_is_not_counted(self, browser: Browser) -> None:
        """pagehide lets go of the provider's shared lock (Chrome keeps no page holding one in the back/forward cache); pageshow from the cache takes it again."""
        page = browser.open()
        assert providers_present(page) == 1
        page.evaluate("window.dispatchEvent(new PageTransitionEvent('pagehide', { persisted: true }))")
        wait_for_providers(page, 0)
        page.evaluate("window.dispatchEvent(new PageTransitionEvent('pageshow', { persisted: true }))")
        wait_for_providers(page, 1)
        assert browser.endpoint.count() == 1


def wait_for_providers(page: Page, count: int) -> None:
    """Wait (bounded) until the lock manager lists `count` providers of /token: a lock let go is let go on the browser's side a moment later."""
    deadline = time.monotonic() + PAGE_TIMEOUT / 1000
    while providers_present(page) != count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert providers_present(page) == count


def providers_present(page: Page) -> int:
    """How many providers of /token the browser's lock manager lists (each holds a shared lock while it lives)."""
    count: int = page.evaluate(
        "navigator.locks.query().then(q => q.held.filter(l => l.name === 'synctoken:/token:tabs').length)"
    )
    return count


class TestFailures:
    """The HTTP way: Retry-After honoured with bounded jitter, 401 told once."""

    @pytest.mark.parametrize(("status", "retry_after"), [(503, 10), (429, 3)])
    def test_retry_after_honoured(self, browser: Browser, status: int, retry_after: int) -> None:
        """At refresh_after a 503 or 429 with Retry-After: the retry comes within [RA, RA * (1 + jitter)] of page time."""
        browser.endpoint.then(Answer(), Answer(status=status, retry_after=str(retry_after)))
        page = browser.open()
        page.clock.run_for(61_000)
        page.wait_for_function(f"window.provider.error?.status === {status}")
        failed_at = page.evaluate("Date.now()")
        retry_at = seen(page)["states"][-1]["retryAt"]
        assert failed_at + retry_after * 1000 <= retry_at <= failed_at + retry_after * 1000 * (1 + RETRY_AFTER_JITTER)
        page.clock.run_for(retry_after * 1000 - 1)
        settle(page)
        assert (browser.endpoint.count(), state(page)) == (2, "stale")
        page.clock.run_for(int(retry_after * 1000 * RETRY_AFTER_JITTER) + 2)
        wait_for_tokens(page, 2)
        assert browser.endpoint.count() == 3

    def test_401_tells_the_app_once(self, browser: Browser) -> None:
        """401: onSignedOut once, state signed_out, no retry, whatever the page does (focus, online, visible, time)."""
        browser.endpoint.then(Answer(), Answer(status=401))
        page = browser.open()
        page.clock.run_for(61_000)
        page.wait_for_function("window.provider.state === 'signed_out'")
        for event in ("focus", "online"):
            page.evaluate(f"window.dispatchEvent(new Event({event!r}))")
        set_visibility(page, "visible")
        page.clock.run_for(3_600_000)
        settle(page)
        assert seen(page)["signedOut"] == 1
        assert browser.endpoint.count() == 2
        assert state(page) == "signed_out"
        assert page.evaluate("window.provider.token().then(() => 'token', e => e.status)") == 401


class TestSecrecy:
    """Tokens stay in memory: none in storage, none in the console."""

    def test_no_token_in_storage_or_console(self, browser: Browser) -> None:
        """After refreshes and a failure, no token in localStorage, sessionStorage or any console message (the fixture checks every test too)."""
        browser.endpoint.then(Answer(), Answer(), Answer(status=503, retry_after="1"))
        page = browser.open()
        page.clock.run_for(61_000)
        wait_for_tokens(page, 2)
        page.clock.run_for(61_000)
        page.wait_for_function("window.provider.error?.status === 503")
        page.evaluate("console.log('page says', window.provider.state)")
        assert len(browser.endpoint.issued) == 2
        assert_no_token_kept(page, browser.endpoint.issued)
        assert any("page says" in line for line in browser.console)
        assert not [line for line in browser.console if any(t in line for t in browser.endpoint.issued)]
