"""The one Redis command on the request path, EVALSHA of the limits script, pipelined on one connection.

Why not redis-py here: measured with callgrind in a grpc.aio handler (one call
at a time, bench.instructions' method), an EVALSHA through redis-py's asyncio
client costs about 410,000 instructions of synctoken's CPU per request and a
registered Script's call 470,000, against about 70,000 for this pipeline: a
connection pool, a lock, a StreamReader's readline and a Python reply parser
per call, for a two-integer reply. The protocol itself is not written here:
hiredis (the Redis project's parser, which redis-py also uses when it is
installed) packs each command and parses every reply. What is left is a FIFO
of futures on an asyncio transport, the connection's opening commands
(AUTH, SELECT, CLIENT SETNAME), and NOSCRIPT. redis-py stays the reference:
tests/service/integration/test_redis_script_client.py runs the same script
through both against one redis-server and compares replies and keys.

Replies come back in the order requests were written, so each write appends a
future and each reply resolves the oldest. Every request is bounded by the
timeout, connecting included, without a timer of its own (asyncio.timeout
cost about 35,000 instructions per call): one watchdog per connection fires at
the oldest deadline and fails whatever has passed its own with TimeoutError.
A request given up (timed out, or its RPC cancelled) keeps its place: its
reply is read and dropped when it comes. A connection that has answered
nothing since a request now past its deadline was written (its caller given
up or not) is stalled (a hung Redis, a dead peer) and closed, so the next
call opens a new one.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import cast

import hiredis

from synctoken_server.limitstore.batching import WriteBatcher
from synctoken_server.limitstore.connecting import Connector
from synctoken_server.policy.limitbackend import RedisSettings

CLIENT_NAME = "synctoken"
MAX_REPLY_BYTES = 1 << 20
"""More than any reply this client asks for (a script's few values, an error's text): a longer one is hostile."""
CLOCK_SLACK = 0.001
"""uvloop's clock and timers count whole milliseconds: a timer may fire up to 1 ms before its time by loop.time()."""
_INCOMPLETE = object()
"""What the reader returns while no whole reply is buffered: not False, which `#f` (RESP3) is read as."""


REDIS_ERROR_CODES = frozenset(
    {
        "ERR", "WRONGPASS", "NOAUTH", "NOPERM", "NOPROTO", "LOADING", "BUSY", "MASTERDOWN", "MISCONF",
        "READONLY", "OOM", "NOREPLICAS", "WRONGTYPE", "EXECABORT", "NOSCRIPT", "CROSSSLOT", "CLUSTERDOWN",
        "TRYAGAIN", "MOVED", "ASK",
    }
)  # fmt: skip
"""The error codes (an error reply's first word) Redis and Valkey answer with: the only words of a reply
to the opening commands that are kept."""
AUTH_REFUSALS = ("NOAUTH", "WRONGPASS", "ERR AUTH", "ERR invalid password")
"""How Redis (7: WRONGPASS, NOAUTH; 6: ERR AUTH ... without any password configured; < 6) starts a refused login."""


class ResponseError(Exception):
    """An error reply from Redis (WRONGPASS, NOSCRIPT, ERR ...); its text is Redis's."""


class OpeningRefused(ResponseError):
    """An error reply to AUTH, SELECT or CLIENT SETNAME, known by its code and the command alone.

    Whatever answers at the URL may quote the command it refused, the password
    with it, in any form (quoted, escaped, cut anywhere, as the code itself):
    so nothing of the reply's text is kept but a code Redis uses, and whether
    it refused the login. Structural, not a search for the password.
    """

    def __init__(self, command: str, reply: ResponseError) -> None:
        text = str(reply)
        word = text.split(" ", 1)[0]
        self.code: str | None = word if word in REDIS_ERROR_CODES else None
        """None: a first word Redis does not use."""
        self.command = command
        self.refused_login = self.code is not None and text.startswith(AUTH_REFUSALS)
        super().__init__(f"{self.code or 'an unknown error code'} in reply to {command}")


class _Pipeline(asyncio.Protocol):
    """One connection: requests written in order, replies matched to them in the same order."""

    unheard: Callable[[Exception], None] | None = None
    """Told when the connection fails with requests waiting but none of their callers left to hear it (every
    one given up): the failure must still count. Set once the connection is introduced; until then, failing
    is the opening's, which ScriptClient reports."""

    def __init__(self, window_s: float = 0.0) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._window_s = window_s
        self._batcher: WriteBatcher | None = None
        self._reader = hiredis.Reader(replyError=ResponseError, notEnoughData=_INCOMPLETE)
        self._waiting: deque[tuple[asyncio.Future[object], int, float]] = deque()
        """(future, replies read before it was written, deadline by loop.time()) per request waiting, oldest first."""
        self._watchdog: asyncio.TimerHandle | None = None
        self._replies = 0
        """Replies read so far. A count, not a time: uvloop's clock counts whole milliseconds, so a reply and
        the next write can share a timestamp, and "no reply since" would be lost in the tie."""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports implement asyncio.Transport without deriving from it.
        self._transport = cast("asyncio.Transport", transport)
        self._batcher = WriteBatcher(self._loop, self._window_s, self._transport.write)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not _INCOMPLETE:
                self._replies += 1
                waiter = self._waiting.popleft()[0]
                if waiter.done():  # timed out or cancelled: the reply keeps the order, nothing more
                    continue
                if isinstance(reply, ResponseError):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)
        except (hiredis.ProtocolError, TypeError, IndexError) as exc:
            # Bytes that are not RESP (or a map hiredis cannot build: TypeError), or a reply nobody asked
            # for: the order is lost with them.
            self.abort(ConnectionError(f"Redis sent what the protocol does not allow ({type(exc).__name__})"))
            return
        if self._reader.len() > MAX_REPLY_BYTES:
            # Unbounded otherwise, even once nobody waits for the reply (the stalled rule needs a waiting call).
            self.abort(ConnectionError(f"Redis sent a reply longer than {MAX_REPLY_BYTES} bytes"))
            return

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._batcher is not None:
            self._batcher.drop()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        failure = exc if isinstance(exc, ConnectionError | TimeoutError) else None
        failure = failure or ConnectionError(f"the connection to Redis closed ({exc or 'by the server'})")
        given_up = bool(self._waiting)
        while self._waiting:
            waiter = self._waiting.popleft()[0]
            if not waiter.done():
                waiter.set_exception(failure)
                given_up = False
        if given_up and self.unheard is not None:
            self.unheard(failure)

    def send(self, packed: bytes, deadline: float, *, batch: bool = False) -> asyncio.Future[object]:
        """Write one packed command; the future gets its reply, or TimeoutError once `deadline` (loop.time()) passed.

        With `batch`, the command may wait for the batch window (batching.py), if the deadline leaves room.
        """
        waiter: asyncio.Future[object] = self._loop.create_future()
        batcher = self._batcher
        if self.closed or batcher is None:
            waiter.set_exception(ConnectionError("the connection to Redis is closed"))
            return waiter
        self._waiting.append((waiter, self._replies, deadline))
        batcher.write(packed, may_wait=batch and batcher.fits(deadline - self._loop.time()))
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(deadline, self._expire)
        return waiter

    @property
    def batch_waits(self) -> bool:
        """Whether a limit check written now would wait for the batch window (batching.py)."""
        return self._batcher is not None and self._batcher.waits

    def abort(self, reason: Exception | None = None) -> None:
        """Close at once; every request still waiting fails."""
        if self._transport is not None and not self.closed:
            self._transport.abort()
        self.connection_lost(reason)

    def _expire(self) -> None:
        """Fail each request past its deadline; close a stalled connection; watch the next deadline."""
        self._watchdog = None
        # With the slack, a timer that fired early fails its requests now, instead of re-arming for a
        # deadline less than a millisecond away, which uvloop would fire at once, again and again.
        now = self._loop.time() + CLOCK_SLACK
        stalled = late = False
        soonest: float | None = None
        # Requests given up (their RPC cancelled) count too: when every caller gives up before the
        # timeout, a dead connection must still be found dead, or it would be kept for good.
        for _, replies_then, deadline in self._waiting:
            if deadline <= now:
                late = True
                stalled = stalled or self._replies == replies_then
            elif soonest is None or deadline < soonest:
                soonest = deadline
        if stalled:
            # Every caller still waiting hears it from connection_lost, or, with none left, `unheard` does.
            self.abort(TimeoutError("Redis answered nothing within the timeout"))
            return
        for waiter, _, deadline in self._waiting if late else ():
            if deadline <= now and not waiter.done():
                waiter.set_exception(TimeoutError())
        if soonest is not None:
            self._watchdog = self._loop.call_at(soonest, self._expire)

    def watch(self, deadline: float) -> None:
        """Make the watchdog fire by `deadline` too: for a request sent later than others with earlier deadlines.

        `send` sets the watchdog only on an idle connection, which holds as long as each request's deadline
        is no earlier than those written before it: true of every first attempt (same timeout, written at
        once), not of a NOSCRIPT retry or of a call that waited for an opening, which call this after `send`.
        Such a request, unanswered at its deadline, judges the connection stalled as any other does, after
        less than a whole timeout of silence: a cost of those rare paths, never of the usual one.
        """
        if self.closed:
            return
        if self._watchdog is None or self._watchdog.when() > deadline:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watchdog = self._loop.call_at(deadline, self._expire)


class ScriptClient:
    """Runs one Lua script in Redis by its SHA-1, over one pipelined connection opened when first needed.

    Every call is bounded by the settings' timeout, opening the connection included, and raises
    TimeoutError when it passes, ConnectionError (an OSError) when the connection fails or closes,
    and ResponseError for an error reply.
    """

    def __init__(
        self, settings: RedisSettings, script: str, unheard: Callable[[Exception], None] | None = None
    ) -> None:
        """`unheard` is told of each failure no caller was left to hear (see _Pipeline.unheard)."""
        self._settings = settings
        self._unheard = unheard
        self._connector = Connector(settings)
        self._timeout = settings.timeout_ms / 1000
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script, usedforsecurity=False).hexdigest().encode()
        self._pipeline: _Pipeline | None = None
        self._opening: asyncio.Task[_Pipeline] | None = None
        self._closed = False
        self._joined = 0
        """Calls waiting for the opening: with none, its failure is `unheard`'s."""

    async def run(self, keys: Sequence[str], args: Sequence[str]) -> object:
        """The script's reply for `keys` and `args` (EVAL once when Redis does not know the script yet)."""
        deadline = asyncio.get_running_loop().time() + self._timeout
        try:
            return await self._request(deadline, b"EVALSHA", self._sha, len(keys), *keys, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # A restarted or flushed Redis: EVAL runs the script and caches it for the EVALSHAs after.
        return await self._late_request(deadline, b"EVAL", self._script, len(keys), *keys, *args)

    @property
    def batch_waits(self) -> bool:
        """Whether a limit check made now would wait for the batch window; False with no connection."""
        pipeline = self._pipeline
        return pipeline is not None and not pipeline.closed and pipeline.batch_waits

    async def ping(self) -> None:
        """Open the connection if needed (AUTH, SELECT) and ask PING: what start-up checks."""
        await self._request(asyncio.get_running_loop().time() + self._timeout, b"PING")

    async def close(self) -> None:
        """Close the connection, failing whatever still waits on it; later calls fail at once (shutdown)."""
        self._closed = True
        opening = self._opening
        if opening is not None:
            opening.cancel()
            # Cancelling is not enough: an opening that has just finished has a connection nobody took yet.
            await asyncio.gather(opening, return_exceptions=True)
            if not opening.cancelled() and opening.exception() is None:
                opening.result().abort()
        if self._pipeline is not None:
            self._pipeline.abort()
            self._pipeline = None

    async def _request(self, deadline: float, *command: bytes | str | int) -> object:
        pipeline = self._pipeline
        if pipeline is None or pipeline.closed:
            return await self._late_request(deadline, *command)
        return await pipeline.send(_pack(command), deadline, batch=True)

    async def _late_request(self, deadline: float, *command: bytes | str | int) -> object:
        """A request that may have waited (for an opening, or for NOSCRIPT): still bounded by its own deadline."""
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            raise TimeoutError  # not written at all: Redis would run it for a caller already told no
        pipeline = self._pipeline
        if pipeline is None or pipeline.closed:
            pipeline = await self._connected(deadline)
        waiter = pipeline.send(_pack(command), deadline)
        pipeline.watch(deadline)
        return await waiter

    async def _connected(self, deadline: float) -> _Pipeline:
        if self._closed:
            raise ConnectionError("the Redis client is closed")
        opening = self._opening
        bound: float | None = deadline
        if opening is None or opening.done():
            # One opening shared by every call that finds no connection, bounded by the deadline of the
            # call that started it (so that call waits for its end: a later one never joins a finished
            # opening's failure); a call that joins it waits at most until its own deadline.
            opening = self._opening = asyncio.create_task(self._open(deadline))
            opening.add_done_callback(self._opened)
            bound = None
        self._joined += 1
        try:
            async with asyncio.timeout_at(bound):
                pipeline = await asyncio.shield(opening)
        finally:
            self._joined -= 1
        if self._closed:  # closed while this call waited: the connection is close()'s to end, not to keep
            raise ConnectionError("the Redis client is closed")
        return pipeline

    def _opened(self, opening: asyncio.Task[_Pipeline]) -> None:
        # Run before any joined call resumes (the first of the task's callbacks), so `_joined` still counts
        # the calls about to hear the failure. Read here in any case: not reported by asyncio as never read.
        if opening.cancelled() or (failure := opening.exception()) is None:
            return
        if self._joined == 0 and isinstance(failure, Exception):
            self._lost(failure)

    def _lost(self, failure: Exception) -> None:
        """A failure no call was left to hear, for `unheard`; none once closed: close() ends what it finds."""
        if self._unheard is not None and not self._closed:
            self._unheard(failure)

    async def _open(self, deadline: float) -> _Pipeline:
        settings = self._settings
        async with asyncio.timeout_at(deadline):
            pipeline = await self._connector.connect(lambda: _Pipeline(settings.batch_window_ms / 1000))
            try:
                await _introduce(pipeline, settings, deadline)
            except BaseException:
                pipeline.abort()
                raise
        # Kept here, not by the calls that wait for it: when every one of them has given up, the next
        # call uses it rather than opening another and leaving this one open for good.
        pipeline.unheard = self._lost
        self._pipeline = pipeline
        return pipeline


async def _introduce(pipeline: _Pipeline, settings: RedisSettings, deadline: float) -> None:
    """AUTH, SELECT and CLIENT SETNAME, pipelined; the first error reply is raised (after every reply came)."""
    commands = _opening_commands(settings)
    opening = [pipeline.send(_pack(command), deadline) for _, command in commands]
    replies = await asyncio.gather(*opening, return_exceptions=True)
    for (name, _), reply in zip(commands, replies, strict=True):
        if isinstance(reply, ResponseError):
            raise OpeningRefused(name, reply) from None  # its text, the password maybe, not even as the cause
        if isinstance(reply, BaseException):
            raise reply


def _pack(command: tuple[bytes | str | int, ...]) -> bytes:
    # hiredis's stub declares a one-element tuple; any number of arguments is what it packs.
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


def _opening_commands(settings: RedisSettings) -> list[tuple[str, tuple[bytes | str | int, ...]]]:
    """Each opening command by its name (what errors say: never its arguments) and in full."""
    commands: list[tuple[str, tuple[bytes | str | int, ...]]] = []
    if settings.password is not None:
        user = (settings.username,) if settings.username else ()
        commands.append(("AUTH", ("AUTH", *user, settings.password)))
    if settings.db:
        commands.append(("SELECT", ("SELECT", settings.db)))
    commands.append(("CLIENT SETNAME", ("CLIENT", "SETNAME", CLIENT_NAME)))
    return commands
