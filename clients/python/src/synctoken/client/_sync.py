"""TokenClient: the blocking client, safe to share between threads for the life of a process."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import NamedTuple, Self, TypeVar

import grpc

from synctoken.client._attempts import Attempts
from synctoken.client._base import ClientBase
from synctoken.client._cache import CacheKey, Clock, TokenCache
from synctoken.client._channel import Generation, Generations
from synctoken.client._credentials import TlsMaterial
from synctoken.client._tracing import traced_channel
from synctoken.client._types import CallerIdentity, IssuedToken, issue_request
from synctoken.v1 import token_service_pb2 as pb
from synctoken.v1.token_service_pb2_grpc import TokenServiceStub

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class _Connection(NamedTuple):
    material: TlsMaterial
    channel: grpc.Channel
    stub: TokenServiceStub


class TokenClient(ClientBase):
    """Calls synctoken over mutual TLS, with a deadline on every call, gRPC's retries, and a token cache.

    The certificate files are read and checked here (CertificateFilesError if
    they cannot be used), then looked at again at most every
    `cert_check_interval` seconds, on a call: a new, matching pair opens a new
    channel for new calls, while calls in flight finish on the old one.
    `from_spiffe` takes the certificate from the SPIFFE Workload API instead,
    and a new SVID it pushes opens a new channel the same way.
    """

    def _start(self, cache_size: int, clock: Clock) -> None:
        self._cache = TokenCache(cache_size, clock)
        # Guards the generations: taking and returning a channel, and swapping it.
        self._lock = threading.Lock()
        self._generations = Generations(self._open(self._tls.current))

    def issue_token(
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
        response = self._call(lambda stub: stub.IssueToken, request)
        return IssuedToken.from_response(response)

    def get_token(
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
        return self._cache.get(
            key,
            lambda: self.issue_token(
                identity, service_sid=service_sid, endpoint_id=endpoint_id, ttl=ttl, region=region
            ),
        )

    def whoami(self) -> CallerIdentity:
        """Who the server believes this client is, and the policy that applies to it."""
        response = self._call(lambda stub: stub.GetCallerIdentity, pb.GetCallerIdentityRequest())
        return CallerIdentity.from_response(response)

    def close(self) -> None:
        """Close every channel (and the Workload API stream); calls still in flight are cancelled.

        A second call does nothing.
        """
        with self._lock:
            self._closed = True
            connections = self._generations.drain()
        self._tls.close()
        for connection in connections:
            connection.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _call(
        self, method: Callable[[TokenServiceStub], grpc.UnaryUnaryMultiCallable[Req, Resp]], request: Req
    ) -> Resp:
        # Not wait-for-ready: see _attempts.
        generation = self._acquire()
        attempts = Attempts(self._timeout, self._server_check)
        try:
            rpc = method(generation.connection.stub)
            while True:
                try:
                    return rpc(request, timeout=attempts.remaining(), wait_for_ready=False)
                except grpc.RpcError as exc:
                    pause = attempts.failed(exc)
                time.sleep(pause)
        finally:
            self._release(generation)

    def _acquire(self) -> Generation[_Connection]:
        # Outside the lock: reading and checking changed files must not hold up other calls.
        if self._tls.due():
            self._tls.poll()
        with self._lock:
            if self._closed:
                raise RuntimeError("this TokenClient is closed")
            # The files' current material is the truth, whoever polled: a new
            # one gets a new channel (opening one only sets it up: no I/O).
            wanted = self._tls.current
            stale = None
            if self._generations.current.material is not wanted:
                stale = self._generations.replace(self._open(wanted))
            generation = self._generations.acquire()
        if stale is not None:
            stale.channel.close()
        return generation

    def _release(self, generation: Generation[_Connection]) -> None:
        with self._lock:
            finished = self._generations.release(generation)
        if finished is not None:
            finished.channel.close()

    def _open(self, material: TlsMaterial) -> _Connection:
        channel = traced_channel(
            grpc.secure_channel(self._target, material.channel_credentials(), options=self._options)
        )
        return _Connection(material, channel, TokenServiceStub(channel))
