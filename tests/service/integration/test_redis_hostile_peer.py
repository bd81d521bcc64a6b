"""The request path's Redis client (limitstore/scriptclient.py) against a peer at the Redis URL that is not Redis."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import hiredis
import pytest

from support import serverloop
from support.pki import Pki
from synctoken_server.limitstore.scriptclient import ScriptClient
from synctoken_server.policy.limitbackend import RedisSettings

Answer = Callable[[list[list[bytes]], asyncio.StreamWriter], Awaitable[None]]
"""What the peer does with the script calls it has read (each a command's arguments)."""

HUGE_REPLY_CAP = 256 << 20
"""The most a streaming peer sends before the test gives up on the client closing the connection."""


async def peer(answer: Answer, calls: int, hung_up: asyncio.Event | None = None) -> asyncio.Server:
    """A TCP server on loopback: +OK to the opening commands, then `answer` once `calls` script calls came.

    `hung_up` is set when the client closes the connection.
    """

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        scripts: list[list[bytes]] = []
        while len(scripts) < calls and (data := await reader.read(65536)):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                if command[0] in (b"EVALSHA", b"EVAL"):
                    scripts.append(command)
                else:
                    writer.write(b"+OK\r\n")
        try:
            await answer(scripts, writer)
            await reader.read()  # until the client closes
        except ConnectionError:
            pass
        finally:
            writer.close()
            if hung_up is not None:
                hung_up.set()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def client_for(server: asyncio.Server, timeout_ms: int) -> ScriptClient:
    """A script client whose settings name the peer."""
    port = server.sockets[0].getsockname()[1]
    settings = RedisSettings(url=f"redis://127.0.0.1:{port}/0", host="127.0.0.1", port=port, timeout_ms=timeout_ms)
    return ScriptClient(settings, "return 1")


class TestHostilePeer:
    """Whatever the peer sends, each call gets the reply to its own request or an error, never another's."""

    def test_a_resp3_false_reply_keeps_the_order(self) -> None:
        """A `#f` reply (what hiredis reads as False) is the first call's reply, not a gap that shifts the next one's."""

        async def answer(scripts: list[list[bytes]], writer: asyncio.StreamWriter) -> None:
            assert [script[3] for script in scripts] == [b"first", b"second"]
            writer.write(b"#f\r\n$6\r\nsecond\r\n")
            await writer.drain()

        async def run() -> list[object]:
            server = await peer(answer, calls=2)
            ours = client_for(server, timeout_ms=2000)
            try:
                return list(await asyncio.gather(ours.run(["first"], []), ours.run(["second"], [])))
            finally:
                await ours.close()
                server.close()

        assert serverloop.run(run()) == [False, b"second"]

    def test_an_endless_reply_closes_the_connection(self) -> None:
        """A reply that never ends is not buffered without bound, even when no call waits for it any more."""
        sent = 0
        finished = asyncio.Event()

        async def answer(_scripts: list[list[bytes]], writer: asyncio.StreamWriter) -> None:
            nonlocal sent
            writer.write(b"$2\r\nok\r\n$1000000000\r\n")
            chunk = b"x" * 65536
            try:
                while sent < HUGE_REPLY_CAP:
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)
            finally:
                finished.set()

        async def run() -> None:
            server = await peer(answer, calls=2)
            ours = client_for(server, timeout_ms=200)
            try:
                first, second = await asyncio.gather(
                    ours.run(["first"], []), ours.run(["second"], []), return_exceptions=True
                )
                assert first == b"ok"
                assert isinstance(second, ConnectionError | TimeoutError)
                # Nothing waits now: only the client's own limit can stop the peer before the test's cap.
                await asyncio.wait_for(finished.wait(), 30)
            finally:
                await ours.close()
                server.close()

        serverloop.run(run())
        assert sent < HUGE_REPLY_CAP, "the client kept reading a reply without end"

    def test_a_reply_hiredis_cannot_build_fails_the_calls_quietly(self) -> None:
        """A map keyed by a list (TypeError in hiredis) fails the waiting calls, with no asyncio 'Fatal error'."""
        reported: list[dict[str, object]] = []

        async def answer(_scripts: list[list[bytes]], writer: asyncio.StreamWriter) -> None:
            writer.write(b"%1\r\n*1\r\n:1\r\n:2\r\n")
            await writer.drain()

        async def run() -> None:
            asyncio.get_running_loop().set_exception_handler(lambda _, context: reported.append(context))
            server = await peer(answer, calls=1)
            ours = client_for(server, timeout_ms=2000)
            try:
                with pytest.raises(ConnectionError, match="protocol does not allow"):
                    await ours.run(["first"], [])
            finally:
                await ours.close()
                server.close()

        serverloop.run(run())
        assert [context["message"] for context in reported if "data_received" in str(context["message"])] == []


async def never(_scripts: list[list[bytes]], _writer: asyncio.StreamWriter) -> None:
    """Answer nothing: a hung Redis, or a connection to one that moved away without a reset."""


def test_a_connection_whose_calls_were_all_cancelled_is_still_judged_stalled() -> None:
    """Calls cancelled before their deadline (RPC deadlines shorter than the timeout) still get a dead connection closed."""

    async def run() -> None:
        hung_up = asyncio.Event()
        server = await peer(never, calls=1, hung_up=hung_up)
        ours = client_for(server, timeout_ms=200)
        try:
            call = asyncio.create_task(ours.run(["first"], []))
            await asyncio.sleep(0.05)  # written, and waiting for the reply that never comes
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await asyncio.wait_for(hung_up.wait(), 5)
        finally:
            await ours.close()
            server.close()

    serverloop.run(run())
    serverloop.run(run())


NOSCRIPT_AFTER = 1.0
"""Seconds the peer waits before its NOSCRIPT: the call that gets it has this much less of its timeout left."""
RETRY_TIMEOUT_MS = 2000
CHECK_AFTER_DEADLINE = 0.5
"""When the test looks, after the retrying call's deadline and before the other call's (a loop timer, not a timing goal)."""


async def noscript_peer(later: str) -> asyncio.Server:
    """First connection: +OK to the opening; NOSCRIPT_AFTER after two script calls, the first's reply, NOSCRIPT
    to the second, then bytes that are not RESP (so the client closes it). Later connections: `later`, either
    "silent" (nothing at all, the opening included) or "introduce" (+OK to the opening, nothing to scripts).
    """
    accepted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        first = accepted == 1
        parser = hiredis.Reader()
        scripts = 0
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    if command[0] in (b"EVALSHA", b"EVAL"):
                        scripts += 1
                    elif first or later == "introduce":
                        writer.write(b"+OK\r\n")
                if first and scripts == 2:
                    await asyncio.sleep(NOSCRIPT_AFTER)
                    writer.write(b"$5\r\nfirst\r\n-NOSCRIPT No matching script.\r\n?\r\n")
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@pytest.mark.parametrize("later", ["silent", "introduce"])
def test_a_noscript_retry_ends_by_its_own_deadline(later: str) -> None:
    """A call's EVAL after NOSCRIPT, on the connection another call is opening, fails by its own deadline."""

    async def run() -> None:
        server = await noscript_peer(later)
        ours = client_for(server, timeout_ms=RETRY_TIMEOUT_MS)

        async def other() -> None:
            assert await ours.run(["first"], []) == b"first"
            # The connection is closed now: this call opens the next one, with a deadline later than the retry's.
            await ours.run(["next"], [])

        try:
            opener = asyncio.create_task(other())
            retrying = asyncio.create_task(ours.run(["retried"], []))
            await asyncio.sleep(RETRY_TIMEOUT_MS / 1000 + CHECK_AFTER_DEADLINE)
            assert retrying.done(), "the retry outlasted its call's deadline, waiting on another call's"
            assert isinstance(retrying.exception(), TimeoutError)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(opener, 10)
        finally:
            await ours.close()
            server.close()

    serverloop.run(run())


TLS_ATTEMPTS = 20


def open_files() -> int:
    """How many file descriptors this process has open."""
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


async def tls_peer(behaviour: str, pki: Pki, accepted: list[asyncio.StreamWriter]) -> asyncio.Server:
    """What answers a rediss:// URL on 127.0.0.2: silent, not TLS at all, or TLS with a certificate for 127.0.0.1.

    Each connection's writer goes to `accepted`, for the test to end what the client left open.
    """

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        if behaviour == "not TLS":
            writer.write(b"-ERR not TLS\r\n" * 64)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client closes
        writer.close()

    context = None
    if behaviour == "another name":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pki.directory / "server.pem", pki.directory / "server-key.pem")  # 127.0.0.1's
    return await asyncio.start_server(serve, "127.0.0.2", 0, ssl=context)


@pytest.mark.parametrize(
    ("behaviour", "failure"),
    [("silent", TimeoutError), ("not TLS", ssl.SSLError), ("another name", ssl.SSLCertVerificationError)],
)
def test_a_tls_peer_that_fails_the_handshake(pki: Pki, behaviour: str, failure: type[Exception]) -> None:
    """rediss:// on uvloop's TLS: a stalled, garbled or misnamed handshake fails each call, leaks no socket, logs nothing."""
    reported: list[dict[str, object]] = []

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: reported.append(context))
        accepted: list[asyncio.StreamWriter] = []
        server = await tls_peer(behaviour, pki, accepted)
        port = server.sockets[0].getsockname()[1]
        settings = RedisSettings(
            url=f"rediss://127.0.0.2:{port}/0", host="127.0.0.2", port=port, timeout_ms=200, tls=True,
            ca_file=pki.directory / "ca.pem",
        )  # fmt: skip
        ours = ScriptClient(settings, "return 1")
        try:
            async with asyncio.timeout(30):  # a bound on the test, far above 21 calls of 200 ms
                with pytest.raises(failure):
                    await ours.run(["k"], [])  # the loop's own files (libuv's spare descriptor) open with the first
                settled = open_files()
                for _ in range(TLS_ATTEMPTS):
                    with pytest.raises(failure):
                        await ours.run(["k"], [])
            # The peer's ends close as it reads each close: a bounded wait for that, then no more open than before.
            for _ in range(100):
                if open_files() <= settled:
                    break
                await asyncio.sleep(0.05)
            assert open_files() <= settled
        finally:
            await ours.close()
            server.close()
            for writer in accepted:
                writer.transport.abort()

    serverloop.run(run())
    assert reported == []
