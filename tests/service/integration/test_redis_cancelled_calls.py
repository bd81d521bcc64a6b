"""Calls to the global limits whose RPC is cancelled while Redis answers (limitstore/redisbuckets.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import serverloop
from support.redisserver import RedisServer
from synctoken_server.limitstore.redisbuckets import RedisLimiter
from synctoken_server.metrics import Metrics
from synctoken_server.policy.limitbackend import RedisSettings
from synctoken_server.policy.limits import CallerLimits, Limit, RateLimiter, identity_digest

LIMITS = CallerLimits(caller=Limit(rate=0.01, burst=1000))
"""Never refused here, and each token taken keeps the key 100 s: the taking shows in Redis."""
CALLER = "spiffe://example.org/a"
RECOVERY_WAIT = 5.0
"""How long the test lets the limiter find the resumed Redis again: many cool-downs, not a timing goal."""


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server on a free loopback port, killed at teardown."""
    server = RedisServer(tmp_path / "redis")
    yield server
    server.kill()


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
