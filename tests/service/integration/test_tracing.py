"""Tracing: each TokenService RPC one server span, exported over OTLP to a otlp_receiver of the tests' own.

The server is a real `synctoken serve` subprocess configured as an operator
would: `[tracing] enabled = true` and the standard OTEL_* environment variables.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from support.calls import channel, rpc_error
from support.configs import config_text
from support.constants import API_SECRET, BFF_ID, SERVICE_B, TRUST_DOMAIN
from support.logcapture import LeakWatch
from support.otlp import OtlpHttpReceiver, OtlpReceiver, exporter_env
from support.pki import Pki
from support.processes import Process, check_config, free_port, serve
from synctoken.v1 import token_service_pb2 as pb
from synctoken.v1 import token_service_pb2_grpc
from synctoken_server.tracing import SHUTDOWN_SECONDS

TRACING = "\n[tracing]\nenabled = true\n"
ISSUE_SPAN = "/synctoken.v1.TokenService/IssueToken"
LOOKUP_SPAN = "/synctoken.v1.TokenService/GetCallerIdentity"
CHAT_RULE = f"spiffe://{TRUST_DOMAIN}/ns/chat/*"
IDENTITY = "alice.tracing-identity@example.com"
"""Distinctive, so that finding it in the exported bytes is not chance."""
CHAT_IDENTITY = "not-a-user-number-tracing"
"""Refused by the chat callers' identity_pattern (user-[0-9]+)."""
FIXED_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
FIXED_PARENT_ID = "00f067aa0ba902b7"


def otel_env(endpoint: str) -> dict[str, str]:
    """The OTEL_* variables for a server exporting to `endpoint`."""
    return exporter_env(endpoint, "synctoken-under-test")


@pytest.fixture
def traced(
    pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process], otlp_receiver: OtlpReceiver
) -> Process:
    """A synctoken server with tracing on, exporting to `otlp_receiver`."""
    return serve(config_text(pki) + TRACING, tmp_path, leak_watch, processes, env=otel_env(otlp_receiver.endpoint))


def stub(pki: Pki, process: Process, cert: str = "bff") -> token_service_pb2_grpc.TokenServiceStub:
    """A TokenService stub on a channel of its own to the server, with `cert`'s client certificate."""
    started = process.wait_for_records("server.started")[0]  # with workers, one each: the same port
    return token_service_pb2_grpc.TokenServiceStub(channel(pki, started["port"], cert))


def issue(pki: Pki, process: Process, leak_watch: LeakWatch, **metadata: str) -> pb.IssueTokenResponse:
    """One IssueToken for IDENTITY as the BFF; the token joins the leak watch."""
    request = pb.IssueTokenRequest(identity=IDENTITY, sync=pb.SyncGrant())
    response: pb.IssueTokenResponse = stub(pki, process).IssueToken(
        request, timeout=10, metadata=tuple(metadata.items())
    )
    leak_watch.tokens.add(response.token)
    return response


class TestServerSpans:
    """What a span holds, and what it never holds."""

    def test_issued_token_span(
        self, pki: Pki, traced: Process, otlp_receiver: OtlpReceiver, leak_watch: LeakWatch
    ) -> None:
        """An issued token's span names the RPC, status 0, the policy entry and token_issued; the audit line names the span."""
        issue(pki, traced, leak_watch)
        [span] = otlp_receiver.wait_for_spans(ISSUE_SPAN)
        assert span.service == "synctoken-under-test"
        assert span.span.kind == span.span.SPAN_KIND_SERVER
        attributes = span.attributes
        assert attributes["rpc.system"] == "grpc"
        assert attributes["rpc.service"] == "synctoken.v1.TokenService"
        assert attributes["rpc.method"] == "IssueToken"
        assert attributes["rpc.grpc.status_code"] == 0
        assert attributes["synctoken.policy_rule"] == BFF_ID
        assert attributes["synctoken.token_issued"] is True
        assert "synctoken.error_reason" not in attributes
        assert span.span.status.code != span.span.status.STATUS_CODE_ERROR
        [decision] = traced.wait_for_records("token.decision")
        assert (decision["trace_id"], decision["span_id"]) == (span.trace_id, span.span_id)

    def test_refused_span(self, pki: Pki, traced: Process, otlp_receiver: OtlpReceiver) -> None:
        """A refused call's span has its gRPC code and ErrorInfo reason (not the interceptor's 0), and is an error."""
        request = pb.IssueTokenRequest(identity=CHAT_IDENTITY, sync=pb.SyncGrant(service_sid=SERVICE_B))
        error, info, _ = rpc_error(lambda: stub(pki, traced, "chat_worker").IssueToken(request, timeout=10))
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        [span] = otlp_receiver.wait_for_spans(ISSUE_SPAN)
        attributes = span.attributes
        assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert attributes["synctoken.error_reason"] == info.reason == "IDENTITY_NOT_ALLOWED"
        assert attributes["synctoken.policy_rule"] == CHAT_RULE
        assert attributes["synctoken.token_issued"] is False
        assert span.span.status.code == span.span.status.STATUS_CODE_ERROR
        assert span.span.status.message == "PERMISSION_DENIED: IDENTITY_NOT_ALLOWED"
        [decision] = traced.wait_for_records("token.decision")
        assert decision["outcome"] == "denied"
        assert decision["trace_id"] == span.trace_id

    def test_unknown_caller_span(self, pki: Pki, traced: Process, otlp_receiver: OtlpReceiver) -> None:
        """A caller outside the policy is answered an empty policy; its span has the empty policy label, as the metrics."""
        answer = stub(pki, traced, "stranger").GetCallerIdentity(pb.GetCallerIdentityRequest(), timeout=10)
        assert not answer.HasField("policy")
        [span] = otlp_receiver.wait_for_spans(LOOKUP_SPAN)
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.attributes["synctoken.policy_rule"] == ""
        assert span.attributes["synctoken.token_issued"] is False

    def test_nothing_forbidden_exported(
        self, pki: Pki, traced: Process, otlp_receiver: OtlpReceiver, leak_watch: LeakWatch
    ) -> None:
        """Not the identity, the token, the secret or the caller's certificate, in any exported byte, issued or refused."""
        token = issue(pki, traced, leak_watch).token
        request = pb.IssueTokenRequest(identity=CHAT_IDENTITY, sync=pb.SyncGrant(service_sid=SERVICE_B))
        rpc_error(lambda: stub(pki, traced, "chat_worker").IssueToken(request, timeout=10))
        otlp_receiver.wait_for_spans(ISSUE_SPAN, 2)
        exported = otlp_receiver.exported_bytes()
        certificate = pki.clients["bff"].cert_pem
        forbidden = {
            "identity": IDENTITY.encode(),
            "refused identity": CHAT_IDENTITY.encode(),
            "token": token.encode(),
            "token signature": token.rsplit(".", 1)[1].encode(),
            "secret": API_SECRET.encode(),
            "certificate": certificate,
            "certificate body": b"".join(certificate.splitlines()[1:3]),
        }
        assert [name for name, value in forbidden.items() if value in exported] == []

    def test_traceparent_continues_the_callers_trace(
        self, pki: Pki, traced: Process, otlp_receiver: OtlpReceiver, leak_watch: LeakWatch
    ) -> None:
        """A W3C traceparent from the caller makes the server span its child, in the caller's trace."""
        issue(pki, traced, leak_watch, traceparent=f"00-{FIXED_TRACE_ID}-{FIXED_PARENT_ID}-01")
        [span] = otlp_receiver.wait_for_spans(ISSUE_SPAN)
        assert span.trace_id == FIXED_TRACE_ID
        assert span.span.parent_span_id.hex() == FIXED_PARENT_ID

    def test_health_checks_are_not_traced(self, pki: Pki, traced: Process, otlp_receiver: OtlpReceiver) -> None:
        """Only TokenService is traced: a balancer's health checks would drown the traces."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

        [started] = traced.wait_for_records("server.started")
        health = health_pb2_grpc.HealthStub(channel(pki, started["port"]))
        health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        stub(pki, traced).GetCallerIdentity(pb.GetCallerIdentityRequest(), timeout=10)
        otlp_receiver.wait_for_spans(LOOKUP_SPAN)
        assert [s.span.name for s in otlp_receiver.spans()] == [LOOKUP_SPAN]


class TestWorkers:
    """Each worker process exports its own spans."""

    def test_every_workers_calls_traced(
        self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process], otlp_receiver: OtlpReceiver
    ) -> None:
        """With --workers 2, calls served by either worker each arrive as a span, named in its audit line."""
        env = otel_env(otlp_receiver.endpoint)
        text = config_text(pki, listen=f"127.0.0.1:{free_port()}") + TRACING
        process = serve(text, tmp_path, leak_watch, processes, workers=2, env=env)
        calls = 16
        for _ in range(calls):  # a new connection each: the kernel spreads them over the workers
            issue(pki, process, leak_watch)
        decisions = process.wait_for_records("token.decision", calls)
        assert {r["worker"] for r in decisions} == {0, 1}, "the kernel sent every connection to one worker"
        spans = otlp_receiver.wait_for_spans(ISSUE_SPAN, calls)
        assert {r["span_id"] for r in decisions} == {s.span_id for s in spans}


class TestHttpExport:
    """OTLP over HTTP, chosen by the standard variable."""

    def test_spans_arrive_over_http(
        self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """With OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf the span is POSTed to the HTTP endpoint."""
        otlp_receiver = OtlpHttpReceiver()
        try:
            env = otel_env(otlp_receiver.endpoint) | {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
            process = serve(config_text(pki) + TRACING, tmp_path, leak_watch, processes, env=env)
            issue(pki, process, leak_watch)
            [span] = otlp_receiver.wait_for_spans(ISSUE_SPAN)
            assert span.attributes["synctoken.token_issued"] is True
            [decision] = process.wait_for_records("token.decision")
            assert decision["trace_id"] == span.trace_id
        finally:
            otlp_receiver.close()


class TestDeadCollector:
    """A collector that is not there costs no call."""

    def test_calls_succeed_and_stop_is_prompt(
        self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """With nothing listening at the endpoint, every call succeeds within its deadline, and SIGTERM stops the server."""
        dead = f"http://127.0.0.1:{free_port()}"
        # No drain delay: what the stop waits for is then the exporter's bounded shutdown.
        text = config_text(pki).replace("[server]\n", '[server]\ndrain_delay = "0s"\n', 1) + TRACING
        process = serve(text, tmp_path, leak_watch, processes, env=otel_env(dead))
        # Deadlines bound each call: a call stalled behind the exporter would fail with DEADLINE_EXCEEDED.
        calls = stub(pki, process)
        request = pb.IssueTokenRequest(identity=IDENTITY, sync=pb.SyncGrant())
        for _ in range(30):
            leak_watch.tokens.add(calls.IssueToken(request, timeout=10).token)
        # Past several export attempts (100 ms batches), so the exporter is retrying while we call.
        time.sleep(0.5)
        for _ in range(10):
            leak_watch.tokens.add(calls.IssueToken(request, timeout=10).token)
        stopping = time.monotonic()
        assert process.terminate() == 0
        # Bounded by SHUTDOWN_SECONDS (2 s), not by the exporter's 10 s timeout against a dead collector.
        assert time.monotonic() - stopping < SHUTDOWN_SECONDS + 5
        decisions = [r for r in process.records() if r["event"] == "token.decision"]
        assert len(decisions) == 40
        assert all(r["outcome"] == "issued" for r in decisions)


class TestConfig:
    """[tracing] and the OTEL_* variables it relies on, as check-config sees them."""

    def test_unknown_protocol_refused(self, pki: Pki, tmp_path: Path) -> None:
        """An OTLP protocol the server cannot export with is a config error naming the variable."""
        path = tmp_path / "synctoken.toml"
        path.write_text(config_text(pki) + TRACING, encoding="utf-8")
        env = os.environ | {"TWILIO_API_SECRET": API_SECRET, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
        result = check_config(path, env)
        assert result.returncode != 0
        assert (
            "tracing.enabled: environment variable OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not grpc or http/protobuf"
            in result.stderr
        )

    def test_sdk_disabled_wins(self, pki: Pki, tmp_path: Path) -> None:
        """OTEL_SDK_DISABLED=true turns tracing off whatever the file says, with a warning."""
        path = tmp_path / "synctoken.toml"
        path.write_text(config_text(pki) + TRACING, encoding="utf-8")
        result = check_config(path, os.environ | {"TWILIO_API_SECRET": API_SECRET, "OTEL_SDK_DISABLED": "TRUE"})
        assert result.returncode == 0, result.stderr
        assert "OTEL_SDK_DISABLED=true turns tracing off" in result.stdout + result.stderr


class TestOff:
    """Without [tracing], OpenTelemetry is never loaded."""

    def test_opentelemetry_not_imported(self, pki: Pki, tmp_path: Path) -> None:
        """The server's modules, and a server made from a config without [tracing], load no OpenTelemetry."""
        path = tmp_path / "synctoken.toml"
        path.write_text(config_text(pki), encoding="utf-8")
        script = (
            "import asyncio, sys; import synctoken_server.cli, synctoken_server.process.server, "
            "synctoken_server.process.workers\n"
            "from synctoken_server.config.schema import load_config\n"
            "from synctoken_server.process.server import TokenServer\n"
            f"server = TokenServer(load_config(__import__('pathlib').Path({str(path)!r})))\n"
            "print(server.tracing, 'opentelemetry' in sys.modules or any(m.startswith('opentelemetry') for m in sys.modules))"
        )
        env = os.environ | {"TWILIO_API_SECRET": API_SECRET}
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True, env=env
        )
        assert result.stdout.split() == ["None", "False"]
