"""A peer at the Redis URL that echoes the command it refuses must not put the password in the log."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import hiredis
import pytest

from support import serverloop
from support.logcapture import LeakWatch, LogSink
from support.redisserver import RedisServer
from synctoken_server.limitstore.redisbuckets import RedisLimiter
from synctoken_server.metrics import Metrics
from synctoken_server.policy.limitbackend import RedisSettings
from synctoken_server.policy.limits import CallerLimits, Limit, RateLimiter, identity_digest

PASSWORD = "echoed-" + "p" * 150
"""Longer than the 128 characters Redis keeps of each argument it quotes in an error."""


@pytest.fixture
def echoing_peer() -> Iterator[int]:
    """A TCP server that accepts the opening commands, then answers a script call with an error quoting
    everything the connection sent, the AUTH command with it (as a confused proxy might)."""
    listener = socket.create_server(("127.0.0.1", 0))
    turn = iter(range(1_000_000))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                parser = hiredis.Reader()
                received = b""
                while data := conn.recv(65536):  # until the client closes
                    received += data
                    parser.feed(data)
                    while (command := parser.gets()) is not False:
                        if command[0] not in (b"EVALSHA", b"EVAL"):
                            conn.sendall(b"+OK\r\n")
                            continue
                        # Alternately everything, and everything with each argument cut at 128 characters.
                        echoed = received.replace(b"\r\n", b" ")
                        if next(turn) % 2:
                            echoed = echoed.replace(PASSWORD.encode(), PASSWORD[:128].encode())
                        conn.sendall(b"-ERR cannot parse, got: " + echoed + b"\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()
    thread.join(timeout=5)


def test_an_echoed_password_is_left_out_of_the_log(echoing_peer: int, log_sink: LogSink, leak_watch: LeakWatch) -> None:
    """A script call's error reply quoting the password (the second net): logged as its type, without its text."""
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


ESCAPED_PASSWORD = 'quo"ted\\back-slash ä ' + "e" * 40
"""Characters a peer would escape when it quotes them: a quote, a backslash, a space, a non-ASCII letter."""


def redis_repr(text: str) -> str:
    """`text` quoted as Redis quotes an argument in its messages (sdscatrepr): \\" \\\\ and \\xNN."""
    quoted = "".join(
        "\\" + chr(byte) if chr(byte) in '"\\' else chr(byte) if 32 <= byte < 127 else f"\\x{byte:02x}"
        for byte in text.encode()
    )
    return f'"{quoted}"'


ESCAPED_ECHOES = {
    "quoted as Redis does": ("ERR unknown command 'AUTH', with args beginning with: ", redis_repr(ESCAPED_PASSWORD)),
    "every byte as \\xNN": ("ERR got ", "".join(f"\\x{byte:02x}" for byte in ESCAPED_PASSWORD.encode())),
    "cut after its first characters": ("ERR invalid password ", ESCAPED_PASSWORD[9:60]),
    "percent-encoded": ("WRONGPASS ", quote(ESCAPED_PASSWORD, safe="")),
    "as the error code": ("", ESCAPED_PASSWORD[22:40] + " refused"),
}
"""An error reply to AUTH, as the words before the password and the password as the peer quoted it."""


async def auth_refusing_peer(reply: str) -> asyncio.Server:
    """A TCP server on loopback answering AUTH with `-reply`, and anything else with +OK."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    writer.write(f"-{reply}\r\n".encode() if command[0] == b"AUTH" else b"+OK\r\n")
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@pytest.mark.parametrize("echo", list(ESCAPED_ECHOES))
def test_no_text_of_a_refused_login_is_logged(echo: str, log_sink: LogSink, leak_watch: LeakWatch) -> None:
    """An error reply to AUTH shows in the log only as its known Redis error code, however it quotes the password."""
    words, quoted = ESCAPED_ECHOES[echo]
    reply = words + quoted
    leak_watch.secrets.add(quoted)
    limits = CallerLimits(caller=Limit(rate=1, burst=1))
    metrics = Metrics()
    start = len(log_sink.lines)

    async def run() -> None:
        server = await auth_refusing_peer(reply)
        port = server.sockets[0].getsockname()[1]
        settings = RedisSettings(
            url=f"redis://127.0.0.1:{port}/0", host="127.0.0.1", port=port, password=ESCAPED_PASSWORD, timeout_ms=2000
        )
        limiter = RedisLimiter(settings, RateLimiter(time.monotonic), metrics)
        try:
            await limiter.check(limits, limits, "spiffe://example.org/a", "alice", identity_digest)
        finally:
            await limiter.close()
            server.close()

    serverloop.run(run())
    [record] = [r for r in log_sink.records(start) if r["event"] == "rate_limit.backend_failed"]
    code = reply.split(" ", 1)[0]
    if code in {"WRONGPASS", "ERR"} and reply.startswith(("WRONGPASS", "ERR invalid password")):
        assert record["kind"] == "auth"
        assert record["problem"] == (
            "Redis refused the credentials: check limits.redis.password_file and the URL's user name "
            f"({code} in reply to AUTH)"
        )
    else:
        assert record["kind"] == "error"
        shown = code if code == "ERR" else "an error code Redis does not use"
        assert (
            record["problem"]
            == f"Redis refused AUTH ({shown}; the rest of its reply is left out: it may quote the command)"
        )
    assert metrics.registry is not None
    assert metrics.registry.get_sample_value("synctoken_ratelimit_backend_errors_total", {"kind": record["kind"]}) == 1


def test_a_password_redis_does_not_expect_is_not_logged(
    tmp_path: Path, log_sink: LogSink, leak_watch: LeakWatch
) -> None:
    """A real Redis without a password quotes the AUTH it refuses: an auth failure, logged without that text."""
    password = "unexpected-" + "u" * 30
    leak_watch.secrets.add(password)
    redis = RedisServer(tmp_path / "redis")
    limits = CallerLimits(caller=Limit(rate=1, burst=1))
    start = len(log_sink.lines)
    settings = RedisSettings(
        url=redis.url, host="127.0.0.1", port=redis.port, password=password, timeout_ms=2000, breaker_failures=1000
    )

    async def run() -> None:
        limiter = RedisLimiter(settings, RateLimiter(time.monotonic), Metrics(enabled=False))
        try:
            await limiter.check(limits, limits, "spiffe://example.org/a", "alice", identity_digest)
        finally:
            await limiter.close()

    try:
        serverloop.run(run())
    finally:
        redis.kill()
    [record] = [r for r in log_sink.records(start) if r["event"] == "rate_limit.backend_failed"]
    assert record["kind"] == "auth"
    assert record["problem"] == (
        "Redis refused the credentials: check limits.redis.password_file and the URL's user name (ERR in reply to AUTH)"
    )
