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
import ssl
from collections import deque
from collections.abc import Sequence
from typing import cast

import hiredis

from synctoken_server.policy.limitbackend import RedisSettings

CLIENT_NAME = "synctoken"
MAX_REPLY_BYTES = 1 << 20
"""More than any reply this client asks for (a script's few values, an error's text): a longer one is hostile."""
CLOCK_SLACK = 0.001
"""uvloop's clock and timers count whole milliseconds: a timer may fire up to 1 ms before its time by loop.time()."""
_INCOMPLETE = object()
"""What the reader returns while no whole reply is buffered: not False, which `#f` (RESP3) is read as."""


class ResponseError(Exception):
    """An error reply from Redis (WRONGPASS, NOSCRIPT, ERR ...); its text is Redis's."""


class _Pipeline(asyncio.Protocol):
    """One connection: requests written in order, replies matched to them in the same order."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
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
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        failure = exc if isinstance(exc, ConnectionError | TimeoutError) else None
        failure = failure or ConnectionError(f"the connection to Redis closed ({exc or 'by the server'})")
        while self._waiting:
            waiter = self._waiting.popleft()[0]
            if not waiter.done():
                waiter.set_exception(failure)

    def send(self, packed: bytes, deadline: float) -> asyncio.Future[object]:
        """Write one packed command; the future gets its reply, or TimeoutError once `deadline` (loop.time()) passed."""
        waiter: asyncio.Future[object] = self._loop.create_future()
        if self.closed or self._transport is None:
            waiter.set_exception(ConnectionError("the connection to Redis is closed"))
            return waiter
        self._waiting.append((waiter, self._replies, deadline))
        self._transport.write(packed)
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(deadline, self._expire)
        return waiter

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
        stalled = False
        soonest: float | None = None
        # Requests given up (their RPC cancelled) count too: when every caller gives up before the
        # timeout, a dead connection must still be found dead, or it would be kept for good.
        for waiter, replies_then, deadline in self._waiting:
            if deadline <= now:
                if not waiter.done():
                    waiter.set_exception(TimeoutError())
                stalled = stalled or self._replies == replies_then
            elif soonest is None or deadline < soonest:
                soonest = deadline
        if stalled:
            self.abort(TimeoutError("Redis answered nothing within the timeout"))
        elif soonest is not None:
            self._watchdog = self._loop.call_at(soonest, self._expire)


class ScriptClient:
    """Runs one Lua script in Redis by its SHA-1, over one pipelined connection opened when first needed.

    Every call is bounded by the settings' timeout, opening the connection included, and raises
    TimeoutError when it passes, ConnectionError (an OSError) when the connection fails or closes,
    and ResponseError for an error reply.
    """

    def __init__(self, settings: RedisSettings, script: str) -> None:
        self._settings = settings
        self._timeout = settings.timeout_ms / 1000
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script, usedforsecurity=False).hexdigest().encode()
        self._pipeline: _Pipeline | None = None
        self._opening: asyncio.Task[_Pipeline] | None = None

    async def run(self, keys: Sequence[str], args: Sequence[str]) -> object:
        """The script's reply for `keys` and `args` (EVAL once when Redis does not know the script yet)."""
        deadline = asyncio.get_running_loop().time() + self._timeout
        try:
            return await self._request(deadline, b"EVALSHA", self._sha, len(keys), *keys, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # A restarted or flushed Redis: EVAL runs the script and caches it for the EVALSHAs after.
        return await self._request(deadline, b"EVAL", self._script, len(keys), *keys, *args)

    async def ping(self) -> None:
        """Open the connection if needed (AUTH, SELECT) and ask PING: what start-up checks."""
        await self._request(asyncio.get_running_loop().time() + self._timeout, b"PING")

    async def close(self) -> None:
        """Close the connection, failing whatever still waits on it."""
        if self._opening is not None:
            self._opening.cancel()
        if self._pipeline is not None:
            self._pipeline.abort()
            self._pipeline = None

    async def _request(self, deadline: float, *command: bytes | str | int) -> object:
        pipeline = self._pipeline
        if pipeline is None or pipeline.closed:
            pipeline = await self._connected(deadline)
        return await pipeline.send(_pack(command), deadline)

    async def _connected(self, deadline: float) -> _Pipeline:
        if self._opening is None or self._opening.done():
            # One opening shared by every call that finds no connection, bounded by the deadline of the
            # call that started it: the calls that join it later have later deadlines of their own.
            self._opening = asyncio.create_task(self._open(deadline))
            # Its failure reaches the callers still waiting; with none left, it is read here, not reported as lost.
            self._opening.add_done_callback(lambda task: task.cancelled() or task.exception())
        self._pipeline = await asyncio.shield(self._opening)
        return self._pipeline

    async def _open(self, deadline: float) -> _Pipeline:
        settings = self._settings
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(deadline):
            if settings.unix_socket:
                _, pipeline = await loop.create_unix_connection(_Pipeline, settings.unix_socket)
            else:
                context = _tls_context(settings) if settings.tls else None
                _, pipeline = await loop.create_connection(
                    _Pipeline,
                    settings.host,
                    settings.port,
                    ssl=context,
                    server_hostname=settings.host if context else None,
                )
            try:
                await _introduce(pipeline, settings, deadline)
            except BaseException:
                pipeline.abort()
                raise
        return pipeline


async def _introduce(pipeline: _Pipeline, settings: RedisSettings, deadline: float) -> None:
    """AUTH, SELECT and CLIENT SETNAME, pipelined; the first error reply is raised (after every reply came)."""
    opening = [pipeline.send(_pack(command), deadline) for command in _opening_commands(settings)]
    for reply in await asyncio.gather(*opening, return_exceptions=True):
        if isinstance(reply, BaseException):
            raise reply


def _pack(command: tuple[bytes | str | int, ...]) -> bytes:
    # hiredis's stub declares a one-element tuple; any number of arguments is what it packs.
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


def _opening_commands(settings: RedisSettings) -> list[tuple[bytes | str | int, ...]]:
    commands: list[tuple[bytes | str | int, ...]] = []
    if settings.password is not None:
        user = (settings.username,) if settings.username else ()
        commands.append(("AUTH", *user, settings.password))
    if settings.db:
        commands.append(("SELECT", settings.db))
    commands.append(("CLIENT", "SETNAME", CLIENT_NAME))
    return commands


def _tls_context(settings: RedisSettings) -> ssl.SSLContext:
    """Verified TLS: the CA file (or the system's CAs), the host name checked, a client certificate if given."""
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    if settings.cert_file is not None:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context
