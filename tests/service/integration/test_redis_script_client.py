"""The request path's Redis client (limitstore/scriptclient.py) against a real redis-server, redis-py as the reference."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aioredis

from support import serverloop
from support.redisserver import RedisServer
from synctoken_server.limitstore.redisbuckets import GCRA_SCRIPT
from synctoken_server.limitstore.scriptclient import CLIENT_NAME, ResponseError, ScriptClient
from synctoken_server.policy.limitbackend import RedisSettings

ECHO_SCRIPT = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1]), tonumber(ARGV[2]) * 2}"
"""A deterministic script: bulk strings and integers back, and a write."""

FAILING_SCRIPT = "return redis.error_reply('ERR the script refuses ' .. ARGV[1])"

BUSY_SCRIPT = """
local start = redis.call('TIME')
repeat
  local now = redis.call('TIME')
until (now[1] - start[1]) * 1000000 + (now[2] - start[2]) >= tonumber(ARGV[1])
return ARGV[2]
"""
"""Keeps Redis busy for ARGV[1] µs, then returns ARGV[2]: a reply later than its caller is willing to wait."""


def settings_for(server: RedisServer, **changes: object) -> RedisSettings:
    """What the config loader would make of the server's URL."""
    fields: dict[str, object] = {"url": server.url, "host": "127.0.0.1", "port": server.port, "timeout_ms": 2000}
    return RedisSettings(**(fields | changes))  # type: ignore[arg-type]


def reference(server: RedisServer, db: int = 0) -> aioredis.Redis:
    """redis-py's asyncio client on the same server, RESP2 as the script client speaks."""
    return aioredis.Redis(host="127.0.0.1", port=server.port, db=db, password=server.password, protocol=2)


def names(server: RedisServer) -> list[str]:
    """The connection names Redis lists."""
    return [entry["name"] for entry in server.client().client_list()]


def connections(server: RedisServer) -> int:
    """How many connections Redis has accepted since it started, this look's own included."""
    return int(server.client().info("stats")["total_connections_received"])


class TestParityWithRedisPy:
    """The same script, the same replies: what redis-py's Script returns, the script client returns."""

    def test_replies_and_writes(self, redis_server: RedisServer) -> None:
        """Bulk strings, integers and the write are the same through both clients."""

        async def both() -> tuple[list[object], list[object]]:
            ours = ScriptClient(settings_for(redis_server), ECHO_SCRIPT)
            theirs = reference(redis_server)
            script = theirs.register_script(ECHO_SCRIPT)
            try:
                mine = [await ours.run(["ours"], ["é-ü", "21"]) for _ in range(2)]
                reference_replies = [await script(keys=["theirs"], args=["é-ü", "21"]) for _ in range(2)]
            finally:
                await ours.close()
                await theirs.aclose()
            return mine, reference_replies

        mine, theirs = serverloop.run(both())
        assert [[reply[0].replace(b"ours", b"theirs"), *reply[1:]] for reply in mine] == theirs  # type: ignore[index]
        assert theirs[1] == [b"theirs", "é-ü".encode(), 2, 42]
        assert redis_server.client().get("ours") == redis_server.client().get("theirs") == b"2"

    def test_error_replies(self, redis_server: RedisServer) -> None:
        """A script's error reply is raised with Redis's text, as redis-py raises it (code included)."""

        async def both() -> tuple[str, str]:
            ours = ScriptClient(settings_for(redis_server), FAILING_SCRIPT)
            theirs = reference(redis_server)
            try:
                with pytest.raises(ResponseError) as mine:
                    await ours.run([], ["x"])
                with pytest.raises(redis.ResponseError) as reference_error:
                    await theirs.register_script(FAILING_SCRIPT)(args=["x"])
            finally:
                await ours.close()
                await theirs.aclose()
            return str(mine.value), str(reference_error.value)

        mine, theirs = serverloop.run(both())
        # redis-py turns the error code into its exception class (ERR: ResponseError) and drops it from the text.
        assert mine == "ERR " + theirs == "ERR the script refuses x"

    def test_gcra_buckets_agree(self, redis_server: RedisServer) -> None:
        """The limits script takes and refuses in the same order through both clients, and leaves the same keys."""
        args = [repr(1_000_000 / 0.01), "3"]  # rate 0.01/s, burst 3: the fourth call is refused

        async def both() -> tuple[list[object], list[object]]:
            ours = ScriptClient(settings_for(redis_server), GCRA_SCRIPT)
            theirs = reference(redis_server)
            script = theirs.register_script(GCRA_SCRIPT)
            try:
                mine = [await ours.run(["b:{ours}:caller"], args) for _ in range(4)]
                reference_replies = [await script(keys=["b:{theirs}:caller"], args=args) for _ in range(4)]
            finally:
                await ours.close()
                await theirs.aclose()
            return mine, reference_replies

        mine, theirs = serverloop.run(both())
        assert [reply[0] for reply in mine] == [reply[0] for reply in theirs] == [0, 0, 0, 1]  # type: ignore[index]
        # The wait differs by the microseconds between the two runs, nothing more.
        assert abs(mine[3][1] - theirs[3][1]) < 5_000_000  # type: ignore[index]
        client = redis_server.client()
        assert 0 < client.pttl("b:{ours}:caller") <= 300_000
        assert 0 < client.pttl("b:{theirs}:caller") <= 300_000

    def test_password_user_and_database(self, redis_server: RedisServer) -> None:
        """AUTH with an ACL user and SELECT: the keys land in the database the settings name, as redis-py's do."""
        admin = redis_server.client()
        admin.acl_setuser("limits", enabled=True, passwords=["+user-pass-" + "u" * 20], commands=["+@all"], keys=["*"])

        async def run() -> None:
            ours = ScriptClient(
                settings_for(redis_server, username="limits", password="user-pass-" + "u" * 20, db=3), ECHO_SCRIPT
            )
            try:
                await ours.run(["in-db-3"], ["a", "1"])
            finally:
                await ours.close()

        serverloop.run(run())
        assert redis.Redis(host="127.0.0.1", port=redis_server.port, db=3).get("in-db-3") == b"1"
        assert admin.get("in-db-3") is None

    def test_noscript_after_flush(self, redis_server: RedisServer) -> None:
        """After SCRIPT FLUSH (a restarted Redis), the next call runs the script by EVAL, then EVALSHA again."""

        async def run() -> list[object]:
            ours = ScriptClient(settings_for(redis_server), ECHO_SCRIPT)
            try:
                first = await ours.run(["k"], ["a", "1"])
                redis_server.client().script_flush()
                second = await ours.run(["k"], ["a", "1"])
                third = await ours.run(["k"], ["a", "1"])
            finally:
                await ours.close()
            return [first, second, third]

        assert [reply[2] for reply in serverloop.run(run())] == [1, 2, 3]  # type: ignore[index]
        stats = redis_server.client().info("commandstats")
        assert stats["cmdstat_eval"]["calls"] == 2  # the first call and the one after the flush
        assert stats["cmdstat_evalsha"]["calls"] == 3


class TestPipeline:
    """One connection, many callers, replies matched to requests in order."""

    def test_concurrent_calls_get_their_own_replies(self, redis_server: RedisServer) -> None:
        """200 calls at once over one connection: each gets the reply to its own request."""

        async def run() -> list[object]:
            ours = ScriptClient(settings_for(redis_server), ECHO_SCRIPT)
            try:
                return list(await asyncio.gather(*(ours.run([f"k{i}"], [str(i), str(i)]) for i in range(200))))
            finally:
                await ours.close()

        replies = serverloop.run(run())
        assert [reply[1] for reply in replies] == [str(i).encode() for i in range(200)]  # type: ignore[index]
        assert [reply[3] for reply in replies] == [2 * i for i in range(200)]  # type: ignore[index]

    def test_a_host_name_is_looked_up(self, redis_server: RedisServer) -> None:
        """A URL naming a host (localhost) reaches the Redis listening on one of its addresses (127.0.0.1)."""

        async def run() -> object:
            ours = ScriptClient(settings_for(redis_server, host="localhost"), ECHO_SCRIPT)
            try:
                return await ours.run(["named"], ["a", "1"])
            finally:
                await ours.close()

        assert serverloop.run(run()) == [b"named", b"a", 1, 2]

    def test_one_connection_named(self, redis_server: RedisServer) -> None:
        """The calls share one connection, which CLIENT LIST shows by the client's name."""

        async def run() -> None:
            ours = ScriptClient(settings_for(redis_server), ECHO_SCRIPT)
            try:
                await asyncio.gather(*(ours.run(["k"], ["a", "1"]) for _ in range(50)))
                assert names(redis_server).count(CLIENT_NAME) == 1
            finally:
                await ours.close()

        serverloop.run(run())

    def test_a_stalled_connection_is_replaced(self, redis_server: RedisServer) -> None:
        """A call past its timeout on a connection that answered nothing since is failed and the connection closed."""

        async def run() -> object:
            ours = ScriptClient(settings_for(redis_server, timeout_ms=50), BUSY_SCRIPT)
            try:
                await ours.run([], ["0", "warm"])
                with pytest.raises(TimeoutError):
                    await ours.run([], ["500000", "late"])  # Redis is busy for 0.5 s
                await asyncio.sleep(0.6)  # until Redis can answer again: a new connection's AUTH would time out
                return await ours.run([], ["0", "next"])
            finally:
                await ours.close()

        before = connections(redis_server)
        assert serverloop.run(run()) == b"next"
        # The first, the one that replaced it, and the looking client's own.
        assert connections(redis_server) == before + 3

    def test_every_call_is_bounded(self, redis_server: RedisServer) -> None:
        """Calls on a hung Redis fail with TimeoutError within the timeout, connecting included."""

        async def run() -> list[float]:
            ours = ScriptClient(settings_for(redis_server, timeout_ms=100), ECHO_SCRIPT)
            waits = []
            try:
                await ours.run(["k"], ["a", "1"])
                redis_server.pause()
                for _ in range(3):  # on the open connection, then on the new ones that cannot be introduced
                    started = time.monotonic()
                    with pytest.raises(TimeoutError):
                        await ours.run(["k"], ["a", "1"])
                    waits.append(time.monotonic() - started)
            finally:
                redis_server.resume()
                await ours.close()
            return waits

        waits = serverloop.run(run())
        assert all(0.09 <= wait < 2.0 for wait in waits), waits  # asyncio may fire a timer a tick early

    def test_a_late_reply_is_dropped_on_a_live_connection(self, redis_server: RedisServer) -> None:
        """A call given up after a later-written reply came keeps the connection; its late reply goes to nobody."""

        async def run() -> list[object]:
            ours = ScriptClient(settings_for(redis_server), BUSY_SCRIPT)
            try:
                await ours.run([], ["0", "warm"])
                # Redis writes replies between reads, so 2 is written while 1 keeps Redis busy: 1's reply then
                # comes after 2 was written, and 2 is given up while Redis runs it, with 3 behind it.
                first = asyncio.create_task(ours.run([], ["500000", "1"]))
                await asyncio.sleep(0.2)  # Redis has read 1 long before: the margin is for a loaded machine
                given_up = asyncio.create_task(ours.run([], ["300000", "2"]))
                third = asyncio.create_task(ours.run([], ["0", "3"]))
                replies = [await first]
                assert given_up.cancel()  # the connection answered since 2 was written: it is alive
                replies.append(await third)
                replies.append(await ours.run([], ["0", "4"]))
                return replies
            finally:
                await ours.close()

        before = connections(redis_server)
        assert serverloop.run(run()) == [b"1", b"3", b"4"]
        assert connections(redis_server) == before + 2  # one connection throughout, and the looking client's


CLOSE_SWEEP_TICKS = 60
"""Loop iterations to sweep close() across: more than an opening on a quiet loopback takes (else the last step
waits for the answer)."""
DISCONNECT_WAIT = 5.0
"""How long Redis gets to see a closed connection go: a bounded wait, not a timing goal."""


class TestClose:
    """close() is for shutdown: it leaves no connection open, an opening under way included."""

    def test_close_during_an_opening_leaves_no_connection(self, redis_server: RedisServer) -> None:
        """close() at every step of an opening (the one call's opening done or not): no connection stays open."""

        async def close_after(ticks: int | None) -> bool:
            """close() after `ticks` loop iterations, or (None) once the call answered (waited for, bounded)."""
            ours = ScriptClient(settings_for(redis_server), ECHO_SCRIPT)
            call = asyncio.ensure_future(ours.ping())
            for _ in range(ticks or 0):
                await asyncio.sleep(0)
            if ticks is None:
                await asyncio.wait({call}, timeout=DISCONNECT_WAIT)
            answered = call.done()
            await ours.close()
            await asyncio.gather(call, return_exceptions=True)
            return answered

        async def sweep() -> None:
            for ticks in range(CLOSE_SWEEP_TICKS):
                if await close_after(ticks):  # opened and answered before close(): every step swept
                    return
            # A loaded machine: the opening outlasted the sweep. The step after it still gets its close().
            assert await close_after(None), "the opening never answered"

        serverloop.run(sweep())
        deadline = time.monotonic() + DISCONNECT_WAIT
        while CLIENT_NAME in names(redis_server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert CLIENT_NAME not in names(redis_server), "a connection opened during close() is still open"

    def test_calls_after_close_fail_without_connecting(self, redis_server: RedisServer) -> None:
        """After close(), a call fails at once with ConnectionError and opens no connection."""

        async def run() -> None:
            ours = ScriptClient(settings_for(redis_server), ECHO_SCRIPT)
            await ours.run(["k"], ["a", "1"])
            await ours.close()
            before = connections(redis_server)
            with pytest.raises(ConnectionError, match="closed"):
                await ours.run(["k"], ["a", "1"])
            assert connections(redis_server) == before + 1  # the looking client's own only

        serverloop.run(run())
