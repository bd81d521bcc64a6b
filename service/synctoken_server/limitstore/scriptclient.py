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
future and each reply resolves the oldest. A request given up by its caller
(the timeout) keeps its place: its reply is read and dropped when it comes.
A connection that has answered nothing since such a request was written is
stalled (a hung Redis, a dead peer), and is closed, so that the next call
opens a new one; one that answered since is alive and kept, with every other
request on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections import deque
from collections.abc import Sequence

import hiredis

from synctoken_server.policy.limitbackend import RedisSettings

CLIENT_NAME = "synctoken"


class ResponseError(Exception):
    """An error reply from Redis (WRONGPASS, NOSCRIPT, ERR ...); its text is Redis's."""


class _Pipeline(asyncio.Protocol):
    """One connection: requests written in order, replies matched to them in the same order."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._waiting: deque[asyncio.Future[object]] = deque()
        self.last_reply = 0.0
        """When the last reply came (time.monotonic()): what tells a stalled connection from a busy one."""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - stream connections only
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                waiter = self._waiting.popleft()
                if waiter.done():  # its caller gave up waiting: the reply keeps the order, nothing more
                    continue
                if isinstance(reply, ResponseError):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            # Bytes that are not RESP, or a reply nobody asked for: the order is lost with them.
            self.abort(ConnectionError(f"Redis sent what the protocol does not allow ({type(exc).__name__})"))
            return
        self.last_reply = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        failure = ConnectionError(f"the connection to Redis closed ({exc or 'by the server'})")
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(failure)

    def send(self, packed: bytes) -> asyncio.Future[object]:
        """Write one packed command; the future gets its reply."""
        waiter: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if self.closed or self._transport is None:
            waiter.set_exception(ConnectionError("the connection to Redis is closed"))
            return waiter
        self._waiting.append(waiter)
        self._transport.write(packed)
        return waiter

    def abort(self, reason: Exception | None = None) -> None:
        """Close at once; every request still waiting fails."""
        if self._transport is not None and not self.closed:
            self._transport.abort()
        self.connection_lost(reason)


class ScriptClient:
    """Runs one Lua script in Redis by its SHA-1, over one pipelined connection opened when first needed.

    Calls are not bounded here: the caller wraps each in its timeout, which
    covers opening the connection too.
    """

    def __init__(self, settings: RedisSettings, script: str) -> None:
        self._settings = settings
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script, usedforsecurity=False).hexdigest().encode()
        self._pipeline: _Pipeline | None = None
        self._opening: asyncio.Task[_Pipeline] | None = None

    async def run(self, keys: Sequence[str], args: Sequence[str]) -> object:
        """The script's reply for `keys` and `args` (EVAL once when Redis does not know the script yet)."""
        try:
            return await self._request(b"EVALSHA", self._sha, len(keys), *keys, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # A restarted or flushed Redis: EVAL runs the script and caches it for the EVALSHAs after.
        return await self._request(b"EVAL", self._script, len(keys), *keys, *args)

    async def ping(self) -> None:
        """Open the connection if needed (AUTH, SELECT) and ask PING: what start-up checks."""
        await self._request(b"PING")

    async def close(self) -> None:
        """Close the connection, failing whatever still waits on it."""
        if self._opening is not None:
            self._opening.cancel()
        if self._pipeline is not None:
            self._pipeline.abort()
            self._pipeline = None

    async def _request(self, *command: bytes | str | int) -> object:
        pipeline = await self._connected()
        written = time.monotonic()
        try:
            return await pipeline.send(_pack(command))
        except asyncio.CancelledError:
            if pipeline.last_reply < written:  # nothing came back since this was written: stalled
                pipeline.abort()
            raise

    async def _connected(self) -> _Pipeline:
        if self._pipeline is not None and not self._pipeline.closed:
            return self._pipeline
        if self._opening is None or self._opening.done():
            # One opening shared by every call that finds no connection; bounded on its own, so a
            # Redis that accepts and then says nothing cannot leave it pending after its callers left.
            self._opening = asyncio.create_task(self._open())
            # Its failure reaches the callers still waiting; with none left, it is read here, not reported as lost.
            self._opening.add_done_callback(lambda task: task.cancelled() or task.exception())
        self._pipeline = await asyncio.shield(self._opening)
        return self._pipeline

    async def _open(self) -> _Pipeline:
        settings = self._settings
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(settings.timeout_ms / 1000):
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
                await _introduce(pipeline, settings)
            except BaseException:
                pipeline.abort()
                raise
        return pipeline


async def _introduce(pipeline: _Pipeline, settings: RedisSettings) -> None:
    """AUTH, SELECT and CLIENT SETNAME, pipelined; the first error reply is raised (after every reply came)."""
    opening = [pipeline.send(_pack(command)) for command in _opening_commands(settings)]
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
