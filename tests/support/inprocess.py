"""In-process servers: a real TokenServer on loopback in a background loop, and clients opened to it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from support.configs import SECRET_ENV, config_text
from support.logcapture import LeakWatch
from support.pki import Pki
from synctoken.v1 import token_service_pb2, token_service_pb2_grpc
from synctoken_server.audit.record import AuditLog
from synctoken_server.config.schema import Config, load_config
from synctoken_server.policy.limits import MAX_BUCKETS
from synctoken_server.policy.rules import Grant
from synctoken_server.process import workloadcerts
from synctoken_server.process.running import new_event_loop
from synctoken_server.process.server import TokenServer
from synctoken_server.tokens.minting import Minter, TokenTimes


class RunningServer:
    """A real TokenServer on 127.0.0.1, on the loop `synctoken serve` runs (uvloop), in a background thread."""

    def __init__(self, config: Config, audit_log: AuditLog | None = None, max_buckets: int = MAX_BUCKETS) -> None:
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()
        self._server = self._call(self._start(config, audit_log, max_buckets))
        self.port = self._server.port

    async def _start(self, config: Config, audit_log: AuditLog | None, max_buckets: int) -> TokenServer:
        workload_api = await workloadcerts.connect(config.workload_api)  # [tls] source = "spiffe" only
        server = TokenServer(config, audit_log, max_buckets=max_buckets, workload_api=workload_api)
        await server.start()
        return server

    @property
    def buckets(self) -> int:
        """How many rate-limit buckets the server holds."""
        return len(self._server.limiter)

    @property
    def token_server(self) -> TokenServer:
        """The server itself, for what a test reads of it (its metrics, its limiters)."""
        server: TokenServer = self._server
        return server

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def stop_soon(self, drain_delay: float, grace: float) -> concurrent.futures.Future[None]:
        """Begin the server's stop, drain included, without waiting for it; close() still ends the loop."""
        return asyncio.run_coroutine_threadsafe(self._server.stop(drain_delay=drain_delay, grace=grace), self._loop)

    def close(self) -> None:
        """Stop the server and its loop; a second call does nothing."""
        if self._loop.is_closed():
            return
        self._call(self._server.stop(drain_delay=0, grace=1))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@dataclass
class Client:
    """A TokenService stub over a real mTLS channel, recording every token it receives."""

    stub: token_service_pb2_grpc.TokenServiceStub
    channel: grpc.Channel
    watch: LeakWatch

    def issue(self, request: token_service_pb2.IssueTokenRequest) -> token_service_pb2.IssueTokenResponse:
        """Call IssueToken; remember the token for the session's leak check."""
        response = self.stub.IssueToken(request, timeout=10)
        if response.token:
            self.watch.tokens.add(response.token)
        return response

    def whoami(self) -> token_service_pb2.GetCallerIdentityResponse:
        """Call GetCallerIdentity."""
        return self.stub.GetCallerIdentity(token_service_pb2.GetCallerIdentityRequest(), timeout=10)


@dataclass
class ServerHarness:
    """Starts servers and opens clients to them; closes everything at teardown."""

    pki: Pki
    watch: LeakWatch
    write_config: Callable[[str], Path]
    _servers: list[RunningServer] = field(default_factory=list)
    _channels: list[grpc.Channel] = field(default_factory=list)

    def start(
        self, text: str | None = None, audit_log: AuditLog | None = None, max_buckets: int = MAX_BUCKETS, **kwargs: str
    ) -> RunningServer:
        """Start a server with `text` as its config (default: the suite's policy)."""
        config = load_config(self.write_config(text or config_text(self.pki, **kwargs)), environ=SECRET_ENV)
        return self.start_config(config, audit_log, max_buckets)

    def start_config(
        self, config: Config, audit_log: AuditLog | None = None, max_buckets: int = MAX_BUCKETS
    ) -> RunningServer:
        """Start a server from an already loaded config (and at most `max_buckets` rate-limit buckets)."""
        server = RunningServer(config, audit_log, max_buckets)
        self._servers.append(server)
        return server

    def client(self, server: RunningServer, cert: str | None) -> Client:
        """A client presenting the named certificate (None: no certificate)."""
        channel = grpc.secure_channel(
            f"localhost:{server.port}",
            self.pki.credentials(cert),
            options=[("grpc.max_reconnect_backoff_ms", 1000)],
        )
        self._channels.append(channel)
        return Client(token_service_pb2_grpc.TokenServiceStub(channel), channel, self.watch)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        for server in self._servers:
            server.close()


def break_signing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every mint in this process fail, as a fault nobody planned for would (a ValueError)."""

    def fail(_self: Minter, _grant: Grant, _times: TokenTimes) -> str:
        raise ValueError("signing failed")

    monkeypatch.setattr(Minter, "mint", fail)
