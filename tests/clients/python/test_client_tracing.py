"""The client's tracing: spans and traceparent when the application traces, nothing loaded when it does not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from support.clients import client_kwargs
from support.configs import config_text
from support.logcapture import LeakWatch
from support.otlp import OtlpReceiver, exporter_env
from support.pki import Pki
from support.processes import Process, serve

ISSUE_SPAN = "/synctoken.v1.TokenService/IssueToken"

# An application that traces: its own tracer provider, set before the client's first call.
_TRACED_APP = """
import sys
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from synctoken.client import TokenClient

provider = TracerProvider(resource=Resource({"service.name": "client-app"}))
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=sys.argv[1], insecure=True)))
trace.set_tracer_provider(provider)
with TokenClient(sys.argv[2], ca_file=sys.argv[3], cert_file=sys.argv[4], key_file=sys.argv[5]) as client:
    with trace.get_tracer("app").start_as_current_span("handle-request"):
        print(client.issue_token("alice").token_id)
provider.shutdown()
"""

_UNTRACED_APP = """
import sys
import synctoken.client, synctoken_bff
from synctoken.client import TokenClient
with TokenClient(sys.argv[1], ca_file=sys.argv[2], cert_file=sys.argv[3], key_file=sys.argv[4]) as client:
    client.issue_token("alice")
print(any(name.startswith("opentelemetry") for name in sys.modules))
"""


@pytest.fixture
def traced_server(
    pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process], otlp_receiver: OtlpReceiver
) -> int:
    """The port of a synctoken server with tracing on, exporting to `otlp_receiver`."""
    text = config_text(pki) + "\n[tracing]\nenabled = true\n"
    server = serve(text, tmp_path, leak_watch, processes, env=exporter_env(otlp_receiver.endpoint, "synctoken"))
    [started] = server.wait_for_records("server.started")
    port: int = started["port"]
    return port


def _files(pki: Pki) -> list[str]:
    paths = client_kwargs(pki, "bff")
    return [str(paths["ca_file"]), str(paths["cert_file"]), str(paths["key_file"])]


class TestTracedApplication:
    """An application with a tracer provider gets a client span per call, parent of synctoken's span."""

    def test_sync_client_span_and_traceparent(self, pki: Pki, traced_server: int, otlp_receiver: OtlpReceiver) -> None:
        """TokenClient's call is a CLIENT span under the application's span, and synctoken's span is its child."""
        target = f"127.0.0.1:{traced_server}"
        result = subprocess.run(
            [sys.executable, "-c", _TRACED_APP, otlp_receiver.endpoint, target, *_files(pki)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert result.stdout.strip()
        spans = otlp_receiver.wait_for_spans(ISSUE_SPAN, 2)
        [server_span] = [s for s in spans if s.span.kind == Span.SPAN_KIND_SERVER]
        [client_span] = [s for s in spans if s.span.kind == Span.SPAN_KIND_CLIENT]
        [app_span] = otlp_receiver.wait_for_spans("handle-request")
        assert client_span.service == "client-app"
        assert server_span.service == "synctoken"
        assert server_span.trace_id == client_span.trace_id == app_span.trace_id
        assert server_span.span.parent_span_id == client_span.span.span_id
        assert client_span.span.parent_span_id == app_span.span.span_id


class TestUntracedApplication:
    """An application that does not trace loads no OpenTelemetry through the client or the BFF."""

    def test_nothing_imported(self, pki: Pki, traced_server: int) -> None:
        """The client's and the BFF's modules, and a call, import no OpenTelemetry module."""
        result = subprocess.run(
            [sys.executable, "-c", _UNTRACED_APP, f"127.0.0.1:{traced_server}", *_files(pki)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert result.stdout.split() == ["False"]
