"""Stopping and failing cleanly: drains that drain, signals that stop, a full disk that refuses tokens.

Each test runs `synctoken serve` as a real process and talks to it over real
mTLS and real sockets; every load is bounded in calls and time.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support.calls import SteadyLoad, channel, rpc_error
from support.clients import client_kwargs
from support.configs import SECRET_ENV, WriteConfig, config_text
from support.constants import SYNCTOKEN
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import START_TIMEOUT, Process, free_port
from support.topology import SERVER_NAME
from synctoken.client import SynctokenError, TokenClient
from synctoken.v1 import token_service_pb2 as pb
from synctoken.v1 import token_service_pb2_grpc
from synctoken_server.process import running
from synctoken_server.process.server import BALANCING_HEALTH

REQUEST = pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant())
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


Launch = Callable[..., tuple[Process, int]]


@pytest.fixture
def launch(
    pki: Pki, tmp_path: Path, write_config: WriteConfig, leak_watch: LeakWatch, processes: list[Process]
) -> Launch:
    """Start `synctoken serve` with extra [server] keys (and soft rlimits); return it and its port once it serves."""

    def start(server_extra: str, soft_limits: dict[int, int] | None = None) -> tuple[Process, int]:
        port = free_port()
        text = config_text(pki, listen=f"127.0.0.1:{port}").replace(
            f'listen = "127.0.0.1:{port}"', f'listen = "127.0.0.1:{port}"\n{server_extra}'
        )
        path = write_config(text)
        env = os.environ | SECRET_ENV
        process = Process(["serve", "--config", str(path)], tmp_path, leak_watch, env, soft_limits)
        processes.append(process)
        process.wait_for_records("server.started")
        return process, port

    return start


def health_status(pki: Pki, port: int, service: str = "synctoken.v1.TokenService") -> int:
    """A service's health (TokenService's by default), asked on a fresh connection."""
    with channel(pki, port) as ch:
        request = health_pb2.HealthCheckRequest(service=service)
        return int(health_pb2_grpc.HealthStub(ch).Check(request, timeout=5).status)


# Every test here drives a real browser or a draining server: left out of `make test-fast`.
pytestmark = pytest.mark.slow


class TestDrain:
    """SIGTERM: NOT_SERVING at once, serving through drain_delay, then no accepted call fails."""

    def test_steady_load_through_sigterm(self, pki: Pki, leak_watch: LeakWatch, launch: Launch) -> None:
        """Under a steady stream from four connections, SIGTERM fails no accepted call."""
        drain_delay = 2.0
        process, port = launch('drain_delay = "2s"\ngrace = "5s"')
        load = SteadyLoad(pki, port, leak_watch)
        time.sleep(1.0)
        health_channel = channel(pki, port)
        health = health_pb2_grpc.HealthStub(health_channel)
        check = health_pb2.HealthCheckRequest(service="synctoken.v1.TokenService")
        assert health.Check(check, timeout=5).status == SERVING
        signalled = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        assert health.Check(check, timeout=5).status == NOT_SERVING
        flipped = time.monotonic() - signalled
        health_channel.close()
        assert process.proc.wait(timeout=START_TIMEOUT) == 0
        outcomes = load.stop()

        stopped_accepting = signalled + drain_delay
        before_stop = [o for o in outcomes if o.sent < stopped_accepting - 0.1]
        assert sum(o.sent >= signalled for o in before_stop) > 20, "calls kept coming during the drain"
        assert all(o.code == grpc.StatusCode.OK for o in before_stop), "a call sent before the drain ended failed"
        # After the drain, gRPC refuses new calls: UNAVAILABLE once the port is closed, or
        # CANCELLED for a call that reached the server in the instant it shut. Neither was
        # accepted: every call the server handled has its audit record and was answered OK.
        codes = {o.code for o in outcomes}
        assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes
        issued = sum(r.get("outcome") == "issued" for r in process.records())
        assert issued == sum(o.code == grpc.StatusCode.OK for o in outcomes), "a call was handled but failed"
        assert flipped < 1.0
        events = [r["event"] for r in process.records() if r["event"].startswith("server.")]
        assert events == ["server.started", "server.stopping", "server.stopped"]

    @pytest.mark.parametrize("signals", [(signal.SIGINT,), (signal.SIGTERM, signal.SIGTERM)])
    def test_stop_now(self, launch: Launch, signals: tuple[signal.Signals, ...]) -> None:
        """SIGINT, or a second SIGTERM while draining, stops without waiting out a long drain_delay."""
        process, _ = launch('drain_delay = "60s"')
        started = time.monotonic()
        for signum in signals:
            process.proc.send_signal(signum)
            process.wait_for_records("server.stopping")
            # Sooner, the same signal again is taken for one signal delivered twice.
            time.sleep(running.DUPLICATE_SIGNAL_SECONDS)
        assert process.proc.wait(timeout=START_TIMEOUT) == 0
        assert time.monotonic() - started < 15


class TestUnwritableLog:
    """A log that cannot be written: no token, NOT_SERVING, and signals still stop the server."""

    def test_full_disk(self, pki: Pki, leak_watch: LeakWatch, launch: Launch) -> None:
        """When the log file fills, every delivered token has a whole record; then NOT_SERVING, and SIGTERM stops."""
        # RLIMIT_FSIZE makes the log file "fill" at a chosen size, exactly as a full disk
        # does: the write that crosses it is cut short, every later one fails.
        limit = 4096
        process, port = launch('drain_delay = "0s"\ngrace = "2s"', {resource.RLIMIT_FSIZE: limit})
        issued: list[str] = []
        with channel(pki, port) as ch:
            stub = token_service_pb2_grpc.TokenServiceStub(ch)
            for _ in range(100):
                try:
                    response = stub.IssueToken(REQUEST, timeout=10)
                except grpc.RpcError:
                    break
                leak_watch.tokens.add(response.token)
                issued.append(response.token_id)
            _, info, _ = rpc_error(lambda: stub.IssueToken(REQUEST, timeout=10))
        assert info.reason == "AUDIT_UNAVAILABLE"
        assert issued, "some tokens went out before the file filled"

        text = process.stdout_path.read_bytes()
        assert len(text) == limit, "the last record was cut off at the limit"
        whole = [json.loads(line) for line in text.split(b"\n")[:-1]]
        assert text.split(b"\n")[-1], "the torn record has no newline"
        recorded = {r.get("token_id") for r in whole}
        assert all(token_id in recorded for token_id in issued), "a token went out without a whole record"

        deadline = time.monotonic() + 5
        while health_status(pki, port) != NOT_SERVING:
            assert time.monotonic() < deadline, "health still SERVING with an unwritable audit log"
            time.sleep(0.1)
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(timeout=START_TIMEOUT) == 0

    def test_a_balancing_client_still_gets_the_reason(self, pki: Pki, leak_watch: LeakWatch, launch: Launch) -> None:
        """With the log full, the Python client (which watches health) still reaches the server: AUDIT_UNAVAILABLE.

        The server-wide status says NOT_SERVING, but the one the client's
        balancing watches stays SERVING: the client is told why, not that no
        backend is healthy.
        """
        process, port = launch('drain_delay = "0s"\ngrace = "2s"', {resource.RLIMIT_FSIZE: 4096})
        with TokenClient(f"127.0.0.1:{port}", server_name=SERVER_NAME, **client_kwargs(pki, "bff")) as client:
            for _ in range(100):
                try:
                    leak_watch.tokens.add(client.issue_token("alice").token)
                except SynctokenError:
                    break
            deadline = time.monotonic() + 5
            while health_status(pki, port) != NOT_SERVING:
                assert time.monotonic() < deadline, "health still SERVING with an unwritable audit log"
                time.sleep(0.1)
            assert health_status(pki, port, "") == NOT_SERVING
            assert health_status(pki, port, BALANCING_HEALTH) == SERVING
            with pytest.raises(SynctokenError) as refused:
                client.issue_token("alice")
        assert refused.value.reason == "AUDIT_UNAVAILABLE"
        assert refused.value.cause is None, "the call reached the server"
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(timeout=START_TIMEOUT) == 0

    def test_workers_with_a_closed_pipe(self, pki: Pki, write_config: WriteConfig) -> None:
        """With --workers and stdout a pipe nobody reads, SIGTERM still stops the parent and every worker."""
        port = free_port()
        text = config_text(pki, listen=f"127.0.0.1:{port}").replace(
            "[tls]", 'drain_delay = "0s"\ngrace = "1s"\n\n[tls]'
        )
        path = write_config(text)
        proc = subprocess.Popen(
            [SYNCTOKEN, "serve", "--workers", "2", "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=os.environ | SECRET_ENV,
        )
        try:
            assert proc.stdout is not None
            pids: list[int] = []
            started = 0
            deadline = time.monotonic() + START_TIMEOUT
            while started < 2 and time.monotonic() < deadline:
                record = json.loads(proc.stdout.readline())
                pids = record.get("pids", pids)
                started += record["event"] == "server.started"
            assert len(pids) == 2
            assert started == 2
            proc.stdout.close()  # from now on every log write fails with EPIPE
            with channel(pki, port) as ch:
                _, info, _ = rpc_error(
                    lambda: token_service_pb2_grpc.TokenServiceStub(ch).IssueToken(REQUEST, timeout=10)
                )
            assert info.reason == "AUDIT_UNAVAILABLE"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=START_TIMEOUT) == 0
            for pid in pids:
                assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"worker {pid} still running"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


class TestConnections:
    """File descriptors: a flood of idle connections does not lock callers out."""

    @pytest.fixture
    def idle_sockets(self) -> Iterator[list[socket.socket]]:
        """Raw TCP sockets a test opens; closed at teardown."""
        sockets: list[socket.socket] = []
        yield sockets
        for s in sockets:
            s.close()

    def test_idle_tcp_flood(
        self, pki: Pki, leak_watch: LeakWatch, launch: Launch, idle_sockets: list[socket.socket]
    ) -> None:
        """Started with a soft limit of 128 files, 300 idle TCP connections still leave room for a real caller."""
        process, port = launch('handshake_timeout = "2s"', {resource.RLIMIT_NOFILE: 128})
        [started] = process.wait_for_records("server.started")
        assert started["open_file_limit"] == resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        idle_sockets.extend(socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(300))
        with channel(pki, port) as ch:
            response = token_service_pb2_grpc.TokenServiceStub(ch).IssueToken(REQUEST, timeout=10)
            leak_watch.tokens.add(response.token)
        # A connection that never starts TLS is closed once handshake_timeout passes.
        idle_sockets[0].settimeout(10)
        with contextlib.suppress(ConnectionResetError):  # closed with a reset: closed all the same
            assert idle_sockets[0].recv(1) == b""


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def half_sent_issue_token() -> bytes:
    """An HTTP/2 connection's first bytes: IssueToken's headers, then 1 byte of a promised 100-byte message."""
    fields = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", b"/synctoken.v1.TokenService/IssueToken"),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    # HPACK "literal without indexing, new name": 0x00, name length, name, value length, value.
    block = b"".join(b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v for n, v in fields)
    settings, headers, data = 0x4, 0x1, 0x0
    end_headers = 0x4
    return (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + h2_frame(settings, 0, 0)
        + h2_frame(headers, end_headers, 1, block)
        + h2_frame(data, 0, 1, b"\x00\x00\x00\x00\x64\x0a")
    )


class TestHalfSentRequests:
    """A peer that opens a call and never finishes its request cannot hold the connection forever."""

    def test_closed_after_max_connection_age_and_grace(self, pki: Pki, launch: Launch) -> None:
        """With max_connection_age 2s and grace 1s, the server closes such a connection within seconds."""
        _, port = launch('max_connection_age = "2s"\ngrace = "1s"')
        context = ssl.create_default_context(cafile=str(pki.directory / "ca.pem"))
        context.load_cert_chain(*pki.files("bff"))
        context.set_alpn_protocols(["h2"])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(half_sent_issue_token())
            opened = time.monotonic()
            tls.settimeout(1)
            closed = False
            while not closed and time.monotonic() - opened < 20:
                try:
                    closed = tls.recv(65536) == b""
                except TimeoutError:
                    continue
                except (ConnectionResetError, ssl.SSLError):
                    closed = True
            assert closed, "the server still holds a connection with a half-sent request"


class TestGrpcNativeLogging:
    """gRPC's own plain-text lines stay off stderr unless asked for."""

    @pytest.mark.parametrize(("verbosity", "expect_lines"), [(None, False), ("INFO", True)])
    def test_handshake_failure_lines(
        self,
        pki: Pki,
        write_config: WriteConfig,
        leak_watch: LeakWatch,
        processes: list[Process],
        verbosity: str | None,
        expect_lines: bool,
    ) -> None:
        """A peer speaking plain HTTP prints nothing by default; GRPC_VERBOSITY=INFO brings the lines back."""
        port = free_port()
        path = write_config(config_text(pki, listen=f"127.0.0.1:{port}"))
        env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"} | SECRET_ENV
        if verbosity is not None:
            env["GRPC_VERBOSITY"] = verbosity
        process = Process(["serve", "--config", str(path)], path.parent, leak_watch, env)
        processes.append(process)
        process.wait_for_records("server.started")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            plain.settimeout(5)
            with contextlib.suppress(TimeoutError, ConnectionResetError):  # gRPC closes it either way
                plain.recv(100)
        process.proc.send_signal(signal.SIGINT)
        assert process.proc.wait(timeout=START_TIMEOUT) == 0
        stderr = process.stderr_path.read_text()
        assert ("Handshake failed" in stderr) is expect_lines, stderr
