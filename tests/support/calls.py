"""Calls: the standard request, a channel with its own connection, a refused call's details, a steady load."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from google.rpc.error_details_pb2 import BadRequest, ErrorInfo
from grpc_status import rpc_status

from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import START_TIMEOUT
from synctoken.v1 import token_service_pb2, token_service_pb2_grpc

ALICE = token_service_pb2.IssueTokenRequest(identity="alice", sync=token_service_pb2.SyncGrant())


def channel(pki: Pki, port: int, cert: str = "bff", root: bytes | None = None) -> grpc.Channel:
    """A channel with its own connection (not shared with other channels in this process)."""
    pair = pki.clients[cert]
    credentials = grpc.ssl_channel_credentials(root or pki.ca.cert_pem, pair.key_pem, pair.cert_pem)
    return grpc.secure_channel(f"localhost:{port}", credentials, options=[("grpc.use_local_subchannel_pool", 1)])


@dataclass(frozen=True)
class Outcome:
    """One call: when it was sent, how it ended, and the token it got (or "")."""

    sent: float
    code: grpc.StatusCode
    token: str = ""
    ended: float | None = None
    """When it ended (time.monotonic()), where a test measures calls' durations."""


class Load:
    """Threads calling until told to stop; each call's outcome in `outcomes`, each token in the leak check."""

    def __init__(self, watch: LeakWatch) -> None:
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch = watch
        self._threads: list[threading.Thread] = []

    def _start(self, threads: list[threading.Thread]) -> None:
        self._threads = threads
        for thread in threads:
            thread.start()

    def _record(self, outcome: Outcome) -> None:
        if outcome.token:
            self._watch.tokens.add(outcome.token)
        with self._lock:
            self.outcomes.append(outcome)

    def _close(self) -> None:
        """What to release once every thread has stopped."""

    def wait_for(self, calls: int) -> None:
        """Wait until at least `calls` more calls have ended."""
        target = len(self.outcomes) + calls
        deadline = time.monotonic() + START_TIMEOUT
        while len(self.outcomes) < target:
            assert time.monotonic() < deadline, f"fewer than {calls} calls in {START_TIMEOUT}s"
            time.sleep(0.02)

    def stop(self) -> list[Outcome]:
        """Stop calling, wait for the last calls, and return every outcome."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self._close()
        return self.outcomes


class SteadyLoad(Load):
    """Clients sending IssueToken back to back until told to stop (at most `limit` calls each).

    `connections` clients each keep one connection; `fresh` clients open a
    new connection (a new TLS handshake) for every call.
    """

    def __init__(
        self,
        pki: Pki,
        port: int,
        watch: LeakWatch,
        connections: int = 4,
        limit: int = 5000,
        fresh: int = 0,
    ) -> None:
        super().__init__(watch)
        self._channels = [channel(pki, port) for _ in range(connections)]
        threads = [threading.Thread(target=self._run, args=(c, limit), daemon=True) for c in self._channels]
        threads += [
            threading.Thread(target=self._run_fresh, args=(pki, port, limit), daemon=True) for _ in range(fresh)
        ]
        self._start(threads)

    def _call(self, ch: grpc.Channel) -> None:
        sent = time.monotonic()
        try:
            token = token_service_pb2_grpc.TokenServiceStub(ch).IssueToken(ALICE, timeout=10).token
            self._record(Outcome(sent, grpc.StatusCode.OK, token))
        except grpc.RpcError as exc:
            self._record(Outcome(sent, exc.code()))

    def _run(self, ch: grpc.Channel, limit: int) -> None:
        for _ in range(limit):
            if self._stop.is_set():
                return
            self._call(ch)

    def _run_fresh(self, pki: Pki, port: int, limit: int) -> None:
        for _ in range(limit):
            if self._stop.is_set():
                return
            with channel(pki, port) as ch:
                self._call(ch)

    def _close(self) -> None:
        for ch in self._channels:
            ch.close()


def rpc_error(call: Callable[[], object]) -> tuple[grpc.RpcError, ErrorInfo, BadRequest | None]:
    """Run a call that must fail; return the error, its ErrorInfo and its BadRequest (if any)."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    info = ErrorInfo()
    bad_request = None
    for detail in status.details:
        if detail.Is(ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(BadRequest.DESCRIPTOR):
            bad_request = BadRequest()
            detail.Unpack(bad_request)
    assert info.domain == "synctoken.v1"
    return error, info, bad_request
