"""Calls to the global limits whose RPC is cancelled while Redis answers (limitstore/redisbuckets.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

import hiredis
import pytest

from support import serverloop
from support.logcapture import LogSink
from support.redisserver import RedisServer
from synctoken_server.limitstore.redisbuckets import RedisLimiter
from synctoken_server.metrics import Metrics
from synctoken_server.policy.limitbackend import BackendUnavailable, OnBackendFailure, RedisSettings
from synctoken_server.policy.limits import CallerLimits, Limit, RateLimiter, identity_digest

LIMITS = CallerLimits(caller=Limit(rate=0.01, burst=1000))
"""Never refused here, and each token taken keeps the key 100 s: the taking shows in Redis."""
CALLER = "spiffe://example.org/a"
RECOVERY_WAIT = 5.0
"""How long the test lets the limiter find the resumed Redis again: many cool-downs, not a timing goal."""


def test_a_cancelled_probe_lets_the_next_call_probe(redis_server: RedisServer) -> None:
    """The breaker's probe cancelled mid-call (its RPC went away) does not keep the breaker open for good."""
    settings = RedisSettings(
        url=redis_server.url,
        host="127.0.0.1",
        port=redis_server.port,
        timeout_ms=200,
        breaker_failures=1,
        breaker_cooldown_ms=100,
    )

    async def run() -> bool:
        limiter = RedisLimiter(settings, RateLimiter(time.monotonic), Metrics(enabled=False))

        async def check() -> object:
            return await limiter.check(LIMITS, LIMITS, CALLER, "alice", identity_digest)

        try:
            redis_server.pause()
            await check()  # times out: the breaker opens
            assert not limiter.breaker_closed
            await asyncio.sleep(0.15)  # past the cool-down: the next call is the probe
            probe = asyncio.create_task(check())
            await asyncio.sleep(0.05)  # the probe waits for the hung Redis
            probe.cancel()
            with pytest.raises(asyncio.CancelledError):
                await probe
            redis_server.resume()
            deadline = time.monotonic() + RECOVERY_WAIT
            while not limiter.breaker_closed and time.monotonic() < deadline:
                await check()
                await asyncio.sleep(0.05)
            return limiter.breaker_closed
        finally:
            redis_server.resume()
            await limiter.close()

    assert serverloop.run(run()), "the breaker stayed open after Redis came back"
    stored = redis_server.keys()
    assert any(key.endswith(":caller") for key in stored), stored


RPC_DEADLINE = 0.05
"""Each RPC's deadline in these tests, well under the Redis timeout: every call gives up first."""
GIVEN_UP_TIMEOUT_MS = 1000
CALL_SPACING = 0.4
"""Seconds from one call's start to the next's: a deadline (a start + 2.5 spacings) falls between two calls,
when no call is waiting to hear what fails then (sparse traffic, the case the breaker was blind to)."""
MAX_CALLS = 25
"""How many spaced calls the test makes at most for the breaker to open: a bound, not a timing goal."""
COUNT_LOOKS = 500
"""Looks, 10 ms apart, at the counter for the failure to show: a bound, not a timing goal."""


def errors(metrics: Metrics, kind: str) -> float:
    """synctoken_ratelimit_backend_errors_total{kind}."""
    assert metrics.registry is not None
    return metrics.registry.get_sample_value("synctoken_ratelimit_backend_errors_total", {"kind": kind}) or 0.0


def at_once(call: Coroutine[Any, Any, object]) -> object:
    """The call's result if it ends without waiting for anything (never suspends), else the test fails."""
    try:
        call.send(None)
    except StopIteration as stop:
        return stop.value
    call.close()
    pytest.fail("the call waited for something")


def test_a_hung_redis_opens_the_breaker_when_every_call_gives_up_first(
    redis_server: RedisServer, log_sink: LogSink
) -> None:
    """SIGSTOP, every call cancelled before the timeout: the stalls still open the breaker, counted and logged."""
    settings = RedisSettings(
        url=redis_server.url,
        host="127.0.0.1",
        port=redis_server.port,
        timeout_ms=GIVEN_UP_TIMEOUT_MS,
        breaker_failures=2,
        breaker_cooldown_ms=600_000,
        on_failure=OnBackendFailure.DENY,
    )
    metrics = Metrics()
    start = len(log_sink.lines)

    async def run() -> object:
        limiter = RedisLimiter(settings, RateLimiter(time.monotonic), metrics)

        def check() -> Coroutine[Any, Any, object]:
            return limiter.check(LIMITS, LIMITS, CALLER, "alice", identity_digest)

        try:
            assert await check() is None  # connected and introduced
            redis_server.pause()
            loop = asyncio.get_running_loop()
            first = loop.time()
            for call in range(MAX_CALLS):
                if not limiter.breaker_closed:
                    break
                await asyncio.sleep(max(0.0, first + call * CALL_SPACING - loop.time()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(check(), RPC_DEADLINE)
            assert not limiter.breaker_closed, "every call gave up first, and the breaker never opened"
            return at_once(check())
        finally:
            redis_server.resume()
            await limiter.close()

    assert isinstance(serverloop.run(run()), BackendUnavailable)
    # The stalled connection, then the opening that could not introduce itself.
    assert errors(metrics, "timeout") >= settings.breaker_failures
    events = [record["event"] for record in log_sink.records(start)]
    assert events.count("rate_limit.backend_failed") == 1
    assert events.count("rate_limit.backend_breaker_open") == 1


async def closing_peer(close: asyncio.Event) -> asyncio.Server:
    """A TCP server on loopback: +OK to the opening commands, no reply to a script call, and closes on `close`."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        while data := await reader.read(65536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                if command[0] in (b"EVALSHA", b"EVAL"):
                    await close.wait()
                    writer.close()
                    return
                writer.write(b"+OK\r\n")

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def test_a_connection_lost_under_calls_given_up_is_a_failure() -> None:
    """A connection closed by the peer while a call waits, its RPC already cancelled: one connection failure."""
    metrics = Metrics()

    async def run() -> None:
        close = asyncio.Event()
        server = await closing_peer(close)
        port = server.sockets[0].getsockname()[1]
        settings = RedisSettings(url=f"redis://127.0.0.1:{port}/0", host="127.0.0.1", port=port, timeout_ms=60_000)
        limiter = RedisLimiter(settings, RateLimiter(time.monotonic), metrics)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(limiter.check(LIMITS, LIMITS, CALLER, "alice", identity_digest), RPC_DEADLINE)
            assert errors(metrics, "connection") == 0
            close.set()
            for _ in range(COUNT_LOOKS):  # until the client has read the close
                if errors(metrics, "connection"):
                    break
                await asyncio.sleep(0.01)
        finally:
            await limiter.close()
            server.close()

    serverloop.run(run())
    assert errors(metrics, "connection") == 1
    assert errors(metrics, "timeout") == 0


def test_closing_under_calls_given_up_is_no_failure(redis_server: RedisServer) -> None:
    """Shutdown closing a connection whose waiting calls had all given up counts no failure: the client closed it."""
    settings = RedisSettings(url=redis_server.url, host="127.0.0.1", port=redis_server.port, timeout_ms=60_000)
    metrics = Metrics()

    async def run() -> None:
        limiter = RedisLimiter(settings, RateLimiter(time.monotonic), metrics)
        try:
            assert await limiter.check(LIMITS, LIMITS, CALLER, "alice", identity_digest) is None
            redis_server.pause()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(limiter.check(LIMITS, LIMITS, CALLER, "alice", identity_digest), RPC_DEADLINE)
        finally:
            await limiter.close()
            redis_server.resume()

    serverloop.run(run())
    assert [errors(metrics, kind) for kind in ("timeout", "connection", "auth", "error")] == [0, 0, 0, 0]
