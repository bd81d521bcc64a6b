"""The batch window (limitstore/batching.py) against a real redis-server: checks that arrive close together
share one write, which Redis reads at once; a caller alone stops waiting; nothing held outlives the client."""

from __future__ import annotations

import asyncio

import hiredis
import pytest

from support import serverloop
from support.redisserver import RedisServer
from synctoken_server.limitstore.batching import LONELY_LIMIT, PROBE_EVERY
from synctoken_server.limitstore.scriptclient import ScriptClient
from synctoken_server.policy.limitbackend import RedisSettings

ECHO_SCRIPT = "return {KEYS[1], redis.call('INCR', KEYS[1])}"
"""Each call's own key back, with a count: replies matched to the wrong call would show."""

CHECKS = 5
SPACING_S = 0.003
"""Checks this far apart: each would be a write (and a read in Redis) of its own without a window."""


def settings_for(server: RedisServer, *, window_ms: int, timeout_ms: int = 2000) -> RedisSettings:
    """What the config loader would make of the server's URL, with this batch window."""
    return RedisSettings(
        url=server.url, host="127.0.0.1", port=server.port, timeout_ms=timeout_ms, batch_window_ms=window_ms
    )


class Counts:
    """Redis's counts of reads from its clients and of EVALSHA calls, looked at over one connection of its own."""

    LOOK_READS = 2
    """What one look adds to the reads: its two INFO commands, a read each."""

    def __init__(self, server: RedisServer) -> None:
        self._client = server.client()
        self._client.ping()  # connected (and its opening commands read) before the first look

    def look(self) -> tuple[int, int]:
        """(reads, EVALSHA calls) so far."""
        reads = int(self._client.info("stats")["total_reads_processed"])
        calls = self._client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        return reads, int(calls)

    def close(self) -> None:
        """Close its connection."""
        self._client.close()


async def spaced_checks(client: ScriptClient, tag: str) -> list[object]:
    """CHECKS calls, each started SPACING_S after the last, all awaited together."""
    calls = []
    for i in range(CHECKS):
        calls.append(asyncio.ensure_future(client.run([f"{tag}-{i}"], [])))
        await asyncio.sleep(SPACING_S)
    return list(await asyncio.gather(*calls))


class TestOneWrite:
    """Checks within one window reach Redis in one write; without a window, or without room for one, they do not."""

    @pytest.mark.parametrize(
        ("window_ms", "timeout_ms", "batched"),
        [(50, 2000, True), (0, 2000, False), (50, 80, False)],
        ids=["window", "no-window", "deadline-too-near"],
    )
    def test_spaced_checks(self, redis_server: RedisServer, window_ms: int, timeout_ms: int, batched: bool) -> None:
        """Five checks 3 ms apart: read at once with a window, one by one without room for it; replies to their own."""
        # A loaded machine can delay a check past the window, or let Redis read two writes at once: so "at
        # once" is at most 2 reads, and "one by one" at least 3 (5 without any delay).
        reads: list[int] = []
        counts = Counts(redis_server)

        async def run() -> list[object]:
            client = ScriptClient(settings_for(redis_server, window_ms=window_ms, timeout_ms=timeout_ms), ECHO_SCRIPT)
            try:
                await client.run(["warm"], [])  # connected, and the script known: only EVALSHAs below
                reads_before, calls_before = counts.look()
                replies = await spaced_checks(client, "k")
                reads_after, calls_after = counts.look()
                reads.append(reads_after - reads_before - Counts.LOOK_READS)
                assert calls_after - calls_before == CHECKS
                return replies
            finally:
                await client.close()
                counts.close()

        replies = serverloop.run(run())
        assert replies == [[f"k-{i}".encode(), 1] for i in range(CHECKS)]
        if batched:
            assert reads[0] <= 2
        else:
            assert reads[0] >= 3


class TestLoneCaller:
    """A caller alone stops waiting for company, and waits again once company comes."""

    def test_lone_then_company(self, redis_server: RedisServer) -> None:
        """After LONELY_LIMIT lone windows a check is written at once; spaced checks bring the window back."""

        async def run() -> tuple[list[bool], bool]:
            client = ScriptClient(settings_for(redis_server, window_ms=5), ECHO_SCRIPT)
            try:
                await client.run(["warm"], [])  # the opening's call is written at once: no window
                waits = []
                for i in range(LONELY_LIMIT + 1):
                    waits.append(client.batch_waits)
                    await client.run([f"lone-{i}"], [])
                waits.append(client.batch_waits)
                # Company: spaced checks, until a probe's window gathers some (one in PROBE_EVERY checks opens one).
                for round_ in range(PROBE_EVERY // CHECKS + 2):
                    await spaced_checks(client, f"busy-{round_}")
                    if client.batch_waits:
                        break
                return waits, client.batch_waits
            finally:
                await client.close()

        waits, back = serverloop.run(run())
        assert waits == [True] * LONELY_LIMIT + [False, False]
        assert back


class TestHeldAtClose:
    """A check held in the window when the client closes fails at once, and never reaches Redis."""

    def test_close_while_held(self, redis_server: RedisServer) -> None:
        """close() during the window: the held check raises ConnectionError; Redis ran no EVALSHA for it."""

        counts = Counts(redis_server)

        async def run() -> tuple[BaseException | None, int, int]:
            client = ScriptClient(settings_for(redis_server, window_ms=10), ECHO_SCRIPT)
            await client.run(["warm"], [])
            _, calls_before = counts.look()
            held = asyncio.ensure_future(client.run(["held"], []))
            await asyncio.sleep(0)  # the check is in the window now
            await client.close()
            failure = (await asyncio.gather(held, return_exceptions=True))[0]
            await asyncio.sleep(0.03)  # past the window: a write left behind would have gone out by now
            _, calls_after = counts.look()
            counts.close()
            return failure if isinstance(failure, BaseException) else None, calls_before, calls_after

        failure, before, after = serverloop.run(run())
        assert isinstance(failure, ConnectionError)
        assert after == before


class TestLateRequestInWindow:
    """A request that cannot afford the window (a NOSCRIPT retry near its deadline) is not held by one that is open."""

    def test_noscript_retry_does_not_stall_a_healthy_connection(self) -> None:
        """A NOSCRIPT retry due before an open window closes is written at once, not judged a stalled connection."""
        # Held, it would be unanswered at its deadline and the watchdog would close a connection that answers
        # everything, failing the check whose window it joined with it.
        window_ms, timeout_ms = 100, 400
        first_read = asyncio.Event()
        noscript_now = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Redis as far as this needs: +OK to the opening, NOSCRIPT to the first EVALSHA when told, :1 after.
            parser = hiredis.Reader()
            scripts = 0
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    if command[0] not in (b"EVALSHA", b"EVAL"):
                        writer.write(b"+OK\r\n")
                        continue
                    scripts += 1
                    if scripts == 1:
                        first_read.set()
                        await noscript_now.wait()
                        writer.write(b"-NOSCRIPT No matching script.\r\n")
                    else:
                        writer.write(b":1\r\n")
            writer.close()

        async def run() -> list[object]:
            server = await asyncio.start_server(serve, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            settings = RedisSettings(
                url=f"redis://127.0.0.1:{port}/0",
                host="127.0.0.1",
                port=port,
                timeout_ms=timeout_ms,
                batch_window_ms=window_ms,
            )
            ours = ScriptClient(settings, ECHO_SCRIPT)
            loop = asyncio.get_running_loop()
            try:
                await ours.ping()
                started = loop.time()
                first = asyncio.ensure_future(ours.run(["first"], []))
                await asyncio.wait_for(first_read.wait(), 5)
                # 60 ms before the first call's deadline: the second opens a window that closes 40 ms after it.
                await asyncio.sleep(started + (timeout_ms - 60) / 1000 - loop.time())
                second = asyncio.ensure_future(ours.run(["second"], []))
                await asyncio.sleep(0)  # the second check is in its window now
                noscript_now.set()
                return list(await asyncio.gather(first, second, return_exceptions=True))
            finally:
                await ours.close()
                server.close()

        assert serverloop.run(run()) == [1, 1]


class TestCancelledWhileHeld:
    """A check whose call is cancelled while it is held keeps its place: every other reply still goes to its own call."""

    def test_cancel_one_of_the_held(self, redis_server: RedisServer) -> None:
        """Of three checks in one window the middle one cancelled: the others and the next get their own replies."""
        reported: list[dict[str, object]] = []

        async def run() -> list[object]:
            asyncio.get_running_loop().set_exception_handler(lambda _, context: reported.append(context))
            client = ScriptClient(settings_for(redis_server, window_ms=20), ECHO_SCRIPT)
            try:
                await client.run(["warm"], [])
                calls = [asyncio.ensure_future(client.run([f"held-{i}"], [])) for i in range(3)]
                await asyncio.sleep(0)  # all three in the window now
                calls[1].cancel()
                replies = list(await asyncio.gather(*calls, return_exceptions=True))
                replies.append(await client.run(["after"], []))
                return replies
            finally:
                await client.close()

        first, middle, last, after = serverloop.run(run())
        assert first == [b"held-0", 1]
        assert isinstance(middle, asyncio.CancelledError)
        assert last == [b"held-2", 1]
        assert after == [b"after", 1]
        assert reported == []
