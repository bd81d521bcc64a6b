"""The probe listener: plaintext grpc.health.v1 for the kubelet, nothing else, flipping first when a drain starts.

Each test runs `synctoken serve` as a real process; probes are made as the
kubelet's gRPC probe and grpc_health_probe make them (support.probes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from support.calls import ALICE, channel
from support.configs import SECRET_ENV, WriteConfig, config_text
from support.constants import SYNCTOKEN
from support.logcapture import LeakWatch
from support.pki import Pki
from support.probes import probe
from support.processes import START_TIMEOUT, Process, free_port, serve
from synctoken.v1 import token_service_pb2_grpc

TOKEN_SERVICE = "synctoken.v1.TokenService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def config_with_probes(pki: Pki, port: int, health_port: int, server_extra: str = "") -> str:
    """The suite's config on fixed ports, with a [health] listener and extra [server] keys."""
    listen = f'listen = "127.0.0.1:{port}"'
    text = config_text(pki, listen=f"127.0.0.1:{port}").replace(listen, f"{listen}\n{server_extra}")
    return f'{text}\n[health]\nlisten = "127.0.0.1:{health_port}"\n'


def test_workers_need_a_fixed_health_port(
    pki: Pki, tmp_path: Path, write_config: WriteConfig, leak_watch: LeakWatch, processes: list[Process]
) -> None:
    """`serve --workers 2` refuses health at :0 (each worker would get a port of its own): a config error, exit 2."""
    text = config_text(pki, listen=f"127.0.0.1:{free_port()}") + '\n[health]\nlisten = "127.0.0.1:0"\n'
    path = write_config(text)
    process = Process(["serve", "--workers", "2", "--config", str(path)], tmp_path, leak_watch, os.environ | SECRET_ENV)
    processes.append(process)
    assert process.proc.wait(timeout=START_TIMEOUT) == 2
    assert process.stderr_path.read_text() == (
        f"synctoken: config error: {path}: health.listen: --workers needs a fixed port, not :0\n"
    )


class TestProbeListener:
    """A running server answers health in plaintext on [health] listen, and only health."""

    def test_check_answers_serving(
        self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """A plaintext Check, for the server as a whole and for TokenService, answers SERVING; started says where."""
        health_port = free_port()
        process = serve(config_with_probes(pki, free_port(), health_port), tmp_path, leak_watch, processes)
        assert [probe(health_port), probe(health_port, TOKEN_SERVICE)] == ["SERVING", "SERVING"]
        assert probe(health_port, "no.such.Service") == "NOT_FOUND"
        [started] = process.records()[-1:]
        assert started["event"] == "server.started"
        assert started["health"] == f"127.0.0.1:{health_port}"

    def test_watch_answers_serving(
        self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """A plaintext Watch stream's first answer is SERVING."""
        health_port = free_port()
        serve(config_with_probes(pki, free_port(), health_port), tmp_path, leak_watch, processes)
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch:
            stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert next(iter(stream)).status == SERVING
            stream.cancel()

    def test_exposes_nothing_but_health(
        self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """TokenService and reflection are UNIMPLEMENTED on the probe port, with no audit record; mTLS serves them."""
        port, health_port = free_port(), free_port()
        process = serve(config_with_probes(pki, port, health_port), tmp_path, leak_watch, processes)
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch:
            for method in ("IssueToken", "GetCallerIdentity"):
                raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(f"/{TOKEN_SERVICE}/{method}")
                with pytest.raises(grpc.RpcError) as refused:
                    raw(ALICE.SerializeToString(), timeout=5)
                assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED
            reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as refused:
                list(reflection.ServerReflectionInfo(iter([request]), timeout=5))
            assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert not [r for r in process.records() if r["event"] == "token.decision"]
        with channel(pki, port) as mtls:
            response = token_service_pb2_grpc.TokenServiceStub(mtls).IssueToken(ALICE, timeout=10)
        leak_watch.tokens.add(response.token)
        assert response.identity == "alice"

    def test_tls_client_cannot_use_it(
        self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """The probe port speaks no TLS: a TLS client's health Check fails, so nobody mistakes it for the service."""
        health_port = free_port()
        serve(config_with_probes(pki, free_port(), health_port), tmp_path, leak_watch, processes)
        with channel(pki, health_port) as tls:
            request = health_pb2.HealthCheckRequest(service="")
            with pytest.raises(grpc.RpcError) as failed:
                health_pb2_grpc.HealthStub(tls).Check(request, timeout=5)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE


def watch_statuses(port: int, seen: list[tuple[float, int]], first: threading.Event) -> None:
    """Record each status a plaintext Watch stream on `port` sends, with when it came, until the stream ends."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            for update in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=60):
                seen.append((time.monotonic(), update.status))
                first.set()
        except grpc.RpcError:
            pass  # the stream ends when the probe listener closes


@pytest.mark.slow
class TestProbesDrain:
    """SIGTERM: the probe port says NOT_SERVING at once, while the mTLS listener still accepts calls."""

    def test_sigterm_flips_before_the_listener_closes(
        self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """NOT_SERVING on Check and Watch well within drain_delay; mTLS calls still served; closed after the stop."""
        drain_delay = 3.0
        port, health_port = free_port(), free_port()
        text = config_with_probes(pki, port, health_port, 'drain_delay = "3s"\ngrace = "2s"')
        process = serve(text, tmp_path, leak_watch, processes)
        seen: list[tuple[float, int]] = []
        first = threading.Event()
        watcher = threading.Thread(target=watch_statuses, args=(health_port, seen, first), daemon=True)
        watcher.start()
        assert first.wait(timeout=10)
        assert probe(health_port) == "SERVING"
        mtls = channel(pki, port)
        tokens = token_service_pb2_grpc.TokenServiceStub(mtls)
        leak_watch.tokens.add(tokens.IssueToken(ALICE, timeout=10).token)  # connected before the signal

        signalled = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        statuses: list[str] = []
        while time.monotonic() - signalled < drain_delay and (not statuses or statuses[-1] == "SERVING"):
            statuses.append(probe(health_port))
        flipped = time.monotonic() - signalled
        assert statuses[-1] == "NOT_SERVING"
        assert flipped < drain_delay / 2, f"the probe port flipped {flipped:.2f}s after SIGTERM"
        # Still within the drain: the mTLS listener accepts calls, old connection and new alike.
        leak_watch.tokens.add(tokens.IssueToken(ALICE, timeout=10).token)
        with channel(pki, port) as fresh:
            leak_watch.tokens.add(token_service_pb2_grpc.TokenServiceStub(fresh).IssueToken(ALICE, timeout=10).token)
        assert time.monotonic() - signalled < drain_delay, "the calls above did not land within the drain"
        assert probe(health_port, TOKEN_SERVICE) == "NOT_SERVING"
        mtls.close()

        assert process.proc.wait(timeout=START_TIMEOUT) == 0
        watcher.join(timeout=10)
        assert [status for _, status in seen] == [SERVING, NOT_SERVING]
        assert seen[1][0] - signalled < drain_delay / 2
        assert probe(health_port, timeout=2) == "UNAVAILABLE"  # closed once the process is gone
        issued = [r for r in process.records() if r.get("outcome") == "issued"]
        assert len(issued) == 3

    def test_workers_share_the_probe_port(
        self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """With --workers 2 both bind the probe port: every probe answers SERVING, and NOT_SERVING once draining."""
        port, health_port = free_port(), free_port()
        text = config_with_probes(pki, port, health_port, 'drain_delay = "3s"\ngrace = "1s"')
        process = serve(text, tmp_path, leak_watch, processes, workers=2)
        started = process.wait_for_records("server.started", 2)
        assert {r["worker"] for r in started} == {0, 1}
        assert {r["health"] for r in started} == {f"127.0.0.1:{health_port}"}
        # Fresh connections, spread over both workers by the kernel: every one answers.
        assert {probe(health_port) for _ in range(20)} == {"SERVING"}
        process.proc.send_signal(signal.SIGTERM)
        process.wait_for_records("server.stopping", 2)  # each worker has flipped its health by then
        assert {probe(health_port) for _ in range(20)} == {"NOT_SERVING"}
        assert process.proc.wait(timeout=START_TIMEOUT) == 0


def test_unwritable_audit_log_reads_not_serving(pki: Pki, write_config: WriteConfig) -> None:
    """With stdout on /dev/full no token can be audited: the probe port says NOT_SERVING, as the mTLS one does."""
    health_port = free_port()
    path = write_config(config_with_probes(pki, free_port(), health_port, 'drain_delay = "0s"'))
    with Path("/dev/full").open("wb") as full:
        proc = subprocess.Popen(
            [SYNCTOKEN, "serve", "--config", str(path)],
            stdout=full,
            stderr=subprocess.DEVNULL,
            env=os.environ | SECRET_ENV,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        seen: list[str] = []
        while not seen or seen[-1] != "NOT_SERVING":
            assert time.monotonic() < deadline, seen
            seen.append(probe(health_port, timeout=1))
            time.sleep(0.1)
        assert probe(health_port, TOKEN_SERVICE) == "NOT_SERVING"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=START_TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
