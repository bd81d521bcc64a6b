"""AsyncTokenClient: the asyncio client, for the tasks of one event loop.

It takes the same arguments and keeps the same promises as TokenClient. Its
channels belong to the loop that first uses it, so they are opened on the
first call rather than in the constructor, which can then run anywhere.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple, Self, TypeVar

import grpc

from synctoken.client._attempts import Attempts
from synctoken.client._base import ClientBase
from synctoken.client._cache import AsyncTokenCache, CacheKey, Clock
from synctoken.client._channel import Generation, Generations
from synctoken.client._credentials import TlsMaterial
from synctoken.client._tracing import aio_interceptors
from synctoken.client._types import CallerIdentity, IssuedToken, issue_request
from synctoken.v1 import token_service_pb2 as pb
from synctoken.v1.token_service_pb2_grpc import TokenServiceStub

if TYPE_CHECKING:
    # A typing-only name: the generated stub's overload for an aio channel.
    from synctoken.v1.token_service_pb2_grpc import TokenServiceAsyncStub

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class _Connection(NamedTuple):
    material: TlsMaterial
    channel: grpc.aio.Channel
    stub: TokenServiceAsyncStub


class AsyncTokenClient(ClientBase):
    """Calls synctoken over mutual TLS from asyncio code; see TokenClient for the behaviour."""

    def _start(self, cache_size: int, clock: Clock) -> None:
        self._cache = AsyncTokenCache(cache_size, clock)
        # Opened on the first call, on the loop that makes it.
        self._generations: Generations[_Connection] | None = None
        self._polling = False

    async def issue_token(
        self,
        identity: str,
        *,
        service_sid: str = "",
        endpoint_id: str = "",
        ttl: dt.timedelta | None = None,
        region: str = "",
        validate_only: bool = False,
    ) -> IssuedToken:
        """Mint a new token (no cache); empty service_sid and unset ttl mean the caller's defaults."""
        request = issue_request(
            identity,
            service_sid=service_sid,
            endpoint_id=endpoint_id,
            ttl=ttl,
            region=region,
            validate_only=validate_only,
        )
        response = await self._call(lambda stub: stub.IssueToken, request)
        return IssuedToken.from_response(response)

    async def get_token(
        self,
        identity: str,
        *,
        service_sid: str = "",
        endpoint_id: str = "",
        ttl: dt.timedelta | None = None,
        region: str = "",
    ) -> IssuedToken:
        """A cached token until its refresh_after, else a new one; one RPC for concurrent identical calls."""
        key = CacheKey(identity, service_sid, endpoint_id, ttl, region)
        return await self._cache.get(
            key,
            lambda: self.issue_token(
                identity, service_sid=service_sid, endpoint_id=endpoint_id, ttl=ttl, region=region
            ),
        )

    async def whoami(self) -> CallerIdentity:
        """Who the server believes this client is, and the policy that applies to it."""
        response = await self._call(lambda stub: stub.GetCallerIdentity, pb.GetCallerIdentityRequest())
        return CallerIdentity.from_response(response)

    async def close(self) -> None:
        """Close every channel (and the Workload API stream); calls still in flight are cancelled.

        A second call does nothing.
        """
        self._closed = True
        connections = self._generations.drain() if self._generations is not None else []
        # Joins the stream's thread (at once: the stream is cancelled first), so not on the loop.
        await asyncio.to_thread(self._tls.close)
        for connection in connections:
            await connection.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    async def _call(
        self, method: Callable[[TokenServiceAsyncStub], grpc.aio.UnaryUnaryMultiCallable[Req, Resp]], request: Req
    ) -> Resp:
        # Not wait-for-ready: see _attempts.
        generation = await self._acquire()
        attempts = Attempts(self._timeout, self._server_check)
        try:
            rpc = method(generation.connection.stub)
            while True:
                try:
                    return await rpc(request, timeout=attempts.remaining(), wait_for_ready=False)
                except grpc.RpcError as exc:
                    pause = attempts.failed(exc)
                await asyncio.sleep(pause)
        finally:
            await self._release(generation)

    async def _acquire(self) -> Generation[_Connection]:
        if self._closed:
            raise RuntimeError("this AsyncTokenClient is closed")
        if self._generations is None:
            self._generations = Generations(self._open(self._tls.current))
        elif self._tls.due() and not self._polling:
            # In a thread: changed files are read and checked, which is file I/O.
            # One task polls; the others carry on with the channel they have.
            self._polling = True
            try:
                await asyncio.to_thread(self._tls.poll)
            finally:
                self._polling = False
            if self._closed:  # while we were polling
                raise RuntimeError("this AsyncTokenClient is closed")
        # The files' current material is the truth, not what poll returned: a
        # task cancelled while polling must not leave a new pair unused.
        wanted = self._tls.current
        if self._generations.current.material is not wanted:
            stale = self._generations.replace(self._open(wanted))
            if stale is not None:
                await stale.channel.close()
        return self._generations.acquire()

    async def _release(self, generation: Generation[_Connection]) -> None:
        finished = self._generations.release(generation) if self._generations is not None else None
        if finished is not None:
            await finished.channel.close()

    def _open(self, material: TlsMaterial) -> _Connection:
        channel = grpc.aio.secure_channel(
            self._target, material.channel_credentials(), options=self._options, interceptors=aio_interceptors()
        )
        return _Connection(material, channel, TokenServiceStub(channel))
