"""A peer at the Redis URL that echoes the command it refuses must not put the password in the log."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from support import serverloop
from support.logcapture import LeakWatch, LogSink
from synctoken_server.limitstore.redisbuckets import RedisLimiter
from synctoken_server.metrics import Metrics
from synctoken_server.policy.limitbackend import RedisSettings
from synctoken_server.policy.limits import CallerLimits, Limit, RateLimiter, identity_digest

PASSWORD = "echoed-" + "p" * 150
"""Longer than the 128 characters Redis keeps of each argument it quotes in an error."""


@pytest.fixture
def echoing_peer() -> Iterator[int]:
    """A TCP server that answers every request with a RESP error quoting the request, as some proxies do."""
    listener = socket.create_server(("127.0.0.1", 0))
    turn = iter(range(1_000_000))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(65536).replace(b"\r\n", b" ")
                # Alternately the whole request, and the request with each argument cut at 128 characters.
                if next(turn) % 2:
                    data = data.replace(PASSWORD.encode(), PASSWORD[:128].encode())
                conn.sendall(b"-ERR cannot parse, got: " + data + b"\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()
    thread.join(timeout=5)


def test_an_echoed_password_is_left_out_of_the_log(echoing_peer: int, log_sink: LogSink, leak_watch: LeakWatch) -> None:
    """The failure is logged (kind error, the exception's type), but neither the password nor its first 128 characters."""
    leak_watch.secrets.add(PASSWORD[:128])
    settings = RedisSettings(
        url=f"redis://127.0.0.1:{echoing_peer}/0",
        host="127.0.0.1",
        port=echoing_peer,
        password=PASSWORD,
        timeout_ms=2000,
        breaker_failures=1000,
    )
    limits = CallerLimits(caller=Limit(rate=1, burst=1))
    start = len(log_sink.lines)

    async def two_calls() -> None:
        # Two limiters, since each logs only the first failure of a run.
        for _ in range(2):
            limiter = RedisLimiter(settings, RateLimiter(time.monotonic), Metrics(enabled=False))
            try:
                await limiter.check(limits, limits, "spiffe://example.org/a", "alice", identity_digest)
            finally:
                await limiter.close()

    serverloop.run(two_calls())
    failures = [r for r in log_sink.records(start) if r["event"] == "rate_limit.backend_failed"]
    assert len(failures) == 2
    for record in failures:
        assert record["kind"] == "error"
        assert record["problem"] == "ResponseError (its text is left out: it quotes the password)"
    assert not any(PASSWORD[:128] in line for line in log_sink.lines)
