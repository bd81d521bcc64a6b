"""get_token's cache: bounded LRU, never past refresh_after, single flight across threads and tasks."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import pytest
import structlog

from support.clients import Driver, SteppedClock, client_kwargs, keep
from support.constants import SERVICE_B, SERVICE_C
from support.inprocess import RunningServer, ServerHarness
from support.logcapture import LeakWatch, LogSink
from support.pki import Pki
from synctoken.client import AsyncTokenClient, IssuedToken, PermissionDenied, TokenClient
from synctoken.client._cache import CacheKey, TokenCache
from synctoken_server.audit.logs import AUDIT_LOGGER
from synctoken_server.audit.record import AuditLog

MakeClient = Callable[..., Driver]
THREADS = 16
_identities = itertools.count()


def unique_identity() -> str:
    """An identity no other test asks for, so that its audit records can be counted."""
    return f"cache-{next(_identities)}-{time.monotonic_ns()}"


def rpcs(sink: LogSink, identity: str) -> list[dict[str, Any]]:
    """The server's IssueToken audit records for `identity`: one per RPC that reached it."""
    return [r for r in sink.records() if r["event"] == "token.decision" and r.get("identity") == identity]


def token(refresh_after: dt.datetime, name: str = "t") -> IssuedToken:
    """An IssuedToken for the cache's own tests, due for refresh at `refresh_after`."""
    return IssuedToken(name, "alice", refresh_after, refresh_after + dt.timedelta(minutes=5), refresh_after, name)


def key(identity: str) -> CacheKey:
    """A cache key for `identity` with every other argument at its default."""
    return CacheKey(identity, "", "", None, "")


class _SlowAuditLogger:
    """The server's real audit logger, a moment late: long enough that concurrent callers all overlap one RPC."""

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._log = structlog.get_logger(AUDIT_LOGGER)

    def info(self, event: str, **fields: object) -> None:
        time.sleep(self._delay)  # blocks the server's loop, so every request waits its turn behind it
        self._log.info(event, **fields)


@pytest.fixture
def slow_server(harness: ServerHarness) -> RunningServer:
    """A server whose audit records take 0.3 s to write."""
    return harness.start(audit_log=AuditLog(_SlowAuditLogger(0.3)))


class TestLru:
    """The cache's own rules, with plain functions as fetchers."""

    def test_least_recently_used_goes_first(self) -> None:
        """Past its size, the cache drops the entry read or written longest ago."""
        clock = SteppedClock()
        cache = TokenCache(2, clock)
        later = clock.now + dt.timedelta(hours=1)
        for name in ("a", "b"):
            cache.get(key(name), lambda name=name: token(later, name))  # type: ignore[misc]
        cache.get(key("a"), pytest.fail)  # a is now the most recent
        cache.get(key("c"), lambda: token(later, "c"))
        assert len(cache) == 2
        assert cache.get(key("a"), pytest.fail).token == "a"
        assert cache.get(key("b"), lambda: token(later, "b2")).token == "b2"

    def test_refresh_after_is_a_hard_edge(self) -> None:
        """A token is served until the instant before its refresh_after, and not at it."""
        clock = SteppedClock()
        refresh_after = clock.now + dt.timedelta(minutes=10)
        cache = TokenCache(10, clock)
        cache.get(key("a"), lambda: token(refresh_after, "old"))
        clock.set(refresh_after - dt.timedelta(microseconds=1))
        assert cache.get(key("a"), pytest.fail).token == "old"
        clock.set(refresh_after)
        assert cache.get(key("a"), lambda: token(refresh_after + dt.timedelta(hours=1), "new")).token == "new"

    def test_due_token_is_returned_not_kept(self) -> None:
        """A token already due when it arrives (a 3-minute TTL) goes to its caller but not into the cache."""
        clock = SteppedClock()
        cache = TokenCache(10, clock)
        assert cache.get(key("a"), lambda: token(clock.now, "due")).token == "due"
        assert len(cache) == 0

    def test_size_zero_keeps_nothing(self) -> None:
        """cache_size=0 turns caching off; single flight stays."""
        clock = SteppedClock()
        cache = TokenCache(0, clock)
        cache.get(key("a"), lambda: token(clock.now + dt.timedelta(hours=1)))
        assert len(cache) == 0

    def test_negative_size_refused(self) -> None:
        """A negative size is a mistake, said at construction."""
        with pytest.raises(ValueError, match="cache_size must be 0"):
            TokenCache(-1)

    def test_failure_is_shared_not_cached(self) -> None:
        """Threads waiting on a fetch that fails all get its error; the next call fetches again."""
        cache = TokenCache(10)
        release = threading.Event()
        calls = []

        def failing() -> IssuedToken:
            calls.append(1)
            release.wait(timeout=10)
            raise RuntimeError("boom")

        with futures.ThreadPoolExecutor(max_workers=4) as pool:
            pending = [pool.submit(cache.get, key("a"), failing) for _ in range(4)]
            time.sleep(0.2)
            release.set()
            errors = [p.exception(timeout=10) for p in pending]
        assert [str(e) for e in errors] == ["boom"] * 4
        assert len(calls) == 1
        with pytest.raises(RuntimeError):
            cache.get(key("a"), failing)
        assert len(calls) == 2


class TestCacheAgainstServer:
    """get_token against a real server, its RPCs counted on the server's audit log."""

    def test_hit_until_refresh_after(
        self, make_client: MakeClient, shared_server: RunningServer, log_sink: LogSink, leak_watch: LeakWatch
    ) -> None:
        """The same token comes back, with no RPC, until the injected clock reaches refresh_after."""
        clock = SteppedClock()
        client = make_client(shared_server.port, clock=clock)
        identity = unique_identity()
        first = client.get_token(identity, ttl=dt.timedelta(minutes=10))
        keep(leak_watch, first)
        for moment in (first.issued_at, first.refresh_after - dt.timedelta(microseconds=1)):
            clock.set(moment)
            assert client.get_token(identity, ttl=dt.timedelta(minutes=10)) is first
        assert len(rpcs(log_sink, identity)) == 1
        clock.set(first.refresh_after)
        keep(leak_watch, client.get_token(identity, ttl=dt.timedelta(minutes=10)))
        assert len(rpcs(log_sink, identity)) == 2

    def test_arguments_are_the_key(
        self, make_client: MakeClient, shared_server: RunningServer, log_sink: LogSink, leak_watch: LeakWatch
    ) -> None:
        """Each distinct set of arguments gets its own token; repeating any of them is a hit."""
        client = make_client(shared_server.port)
        identity = unique_identity()
        variants: list[dict[str, Any]] = [
            {},
            {"service_sid": SERVICE_B},
            {"endpoint_id": "device-1"},
            {"ttl": dt.timedelta(minutes=10)},
            {"region": "ie1"},
        ]
        for _ in range(2):
            for kwargs in variants:
                keep(leak_watch, client.get_token(identity, **kwargs))
        assert len(rpcs(log_sink, identity)) == len(variants)

    def test_bounded(
        self, make_client: MakeClient, shared_server: RunningServer, log_sink: LogSink, leak_watch: LeakWatch
    ) -> None:
        """With cache_size=2, a third identity pushes out the least recently used one."""
        client = make_client(shared_server.port, cache_size=2)
        a, b, c = (unique_identity() for _ in range(3))
        for identity in (a, b, c, b, a):
            keep(leak_watch, client.get_token(identity))
        assert [len(rpcs(log_sink, i)) for i in (a, b, c)] == [2, 1, 1]

    def test_errors_are_not_cached(
        self, make_client: MakeClient, shared_server: RunningServer, log_sink: LogSink
    ) -> None:
        """A denial is raised each time, and each time asked of the server."""
        client = make_client(shared_server.port)
        identity = unique_identity()
        for _ in range(2):
            with pytest.raises(PermissionDenied):
                client.get_token(identity, service_sid=SERVICE_C)
        assert len(rpcs(log_sink, identity)) == 2


class TestSingleFlight:
    """Concurrent get_token calls with the same arguments share one RPC, counted on the audit log."""

    def test_threads(self, pki: Pki, slow_server: RunningServer, log_sink: LogSink, leak_watch: LeakWatch) -> None:
        """Sixteen threads asking at once make one RPC and all get its token.

        The cache stays on here: with threads there is no telling that all
        sixteen arrive within the RPC's 0.3 s, and one that comes after must
        get the cached token rather than make the count flaky. The tasks' test
        below runs with caching off, since gather starts them all at once.
        """
        identity = unique_identity()
        barrier = threading.Barrier(THREADS)
        with TokenClient(f"localhost:{slow_server.port}", **client_kwargs(pki, "bff")) as client:
            client.whoami()  # connected first, so that the calls below overlap in the RPC, not in the handshake

            def ask() -> IssuedToken:
                barrier.wait(timeout=10)
                return client.get_token(identity)

            with futures.ThreadPoolExecutor(max_workers=THREADS) as pool:
                tokens = list(pool.map(lambda _: ask(), range(THREADS), timeout=30))
        keep(leak_watch, *tokens)
        assert len({id(t) for t in tokens}) == 1
        assert len(rpcs(log_sink, identity)) == 1

    def test_tasks(self, pki: Pki, slow_server: RunningServer, log_sink: LogSink, leak_watch: LeakWatch) -> None:
        """Sixteen tasks asking at once, with caching off, make one RPC and all get its token."""
        identity = unique_identity()

        async def main() -> list[IssuedToken]:
            async with AsyncTokenClient(
                f"localhost:{slow_server.port}", cache_size=0, **client_kwargs(pki, "bff")
            ) as client:
                await client.whoami()
                return await asyncio.wait_for(
                    asyncio.gather(*(client.get_token(identity) for _ in range(THREADS))), timeout=30
                )

        tokens = asyncio.run(main())
        keep(leak_watch, *tokens)
        assert len({id(t) for t in tokens}) == 1
        assert len(rpcs(log_sink, identity)) == 1

    def test_cancelled_task_does_not_cancel_the_others(
        self, pki: Pki, slow_server: RunningServer, log_sink: LogSink, leak_watch: LeakWatch
    ) -> None:
        """The task that started the RPC may be cancelled; the tasks waiting with it still get the token."""
        identity = unique_identity()

        async def main() -> IssuedToken:
            async with AsyncTokenClient(
                f"localhost:{slow_server.port}", cache_size=0, **client_kwargs(pki, "bff")
            ) as client:
                await client.whoami()
                first = asyncio.ensure_future(client.get_token(identity))
                await asyncio.sleep(0.05)
                second = asyncio.ensure_future(client.get_token(identity))
                await asyncio.sleep(0.05)
                first.cancel()
                return await asyncio.wait_for(second, timeout=10)

        token = asyncio.run(main())
        keep(leak_watch, token)
        assert len(rpcs(log_sink, identity)) == 1

    def test_distinct_arguments_distinct_flights(
        self, pki: Pki, slow_server: RunningServer, log_sink: LogSink, leak_watch: LeakWatch
    ) -> None:
        """Tasks asking for three identities at once, four each, make one RPC per identity."""
        identities = [unique_identity() for _ in range(3)]

        async def main() -> list[IssuedToken]:
            async with AsyncTokenClient(
                f"localhost:{slow_server.port}", cache_size=0, **client_kwargs(pki, "bff")
            ) as client:
                return await asyncio.wait_for(
                    asyncio.gather(*(client.get_token(i) for i in identities for _ in range(4))), timeout=30
                )

        tokens = asyncio.run(main())
        keep(leak_watch, *tokens)
        assert [len(rpcs(log_sink, i)) for i in identities] == [1, 1, 1]
        assert len({t.identity for t in tokens}) == 3
