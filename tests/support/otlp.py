"""An OTLP/gRPC trace receiver of the tests' own, built from opentelemetry-proto's generated TraceService.

No collector binary can be installed here, so the tests receive what the
exporters send themselves. The receiver is a synchronous grpc server on its
own threads: never on an event loop an exporter flushes from (a receiver on
the loop that the flush blocks would deadlock). It keeps each request's bytes,
so a test can search everything that was exported, not just the fields it
knows about.
"""

from __future__ import annotations

import http.server
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from support.processes import START_TIMEOUT


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, with the service.name of the resource it came with."""

    service: str
    span: Span

    @property
    def trace_id(self) -> str:
        """Hex, as the audit log and trace UIs write it."""
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        """Hex, as the audit log and trace UIs write it."""
        return self.span.span_id.hex()

    @property
    def attributes(self) -> dict[str, object]:
        """The span's attributes as Python values."""
        return {kv.key: _value(kv.value) for kv in self.span.attributes}


def _value(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def exporter_env(endpoint: str, service: str) -> dict[str, str]:
    """The standard variables an operator sets: where to export (OTLP/gRPC), as what service, a short batch delay."""
    return {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
        "OTEL_SERVICE_NAME": service,
        # Export within 100 ms rather than 5 s, so the tests wait less; the path is the same.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


class _Requests:
    """The ExportTraceServiceRequests a receiver got, and what tests read of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def keep(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        """Keep one request (from any thread)."""
        with self._lock:
            self._requests.append(request)

    def exported_bytes(self) -> bytes:
        """Every request received so far, serialized: what a leak search reads."""
        with self._lock:
            return b"".join(request.SerializeToString() for request in self._requests)

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far."""
        with self._lock:
            requests = list(self._requests)
        found = []
        for request in requests:
            for resource_spans in request.resource_spans:
                names = [kv.value.string_value for kv in resource_spans.resource.attributes if kv.key == "service.name"]
                service = names[0] if names else ""
                found += [ReceivedSpan(service, span) for scope in resource_spans.scope_spans for span in scope.spans]
        return found

    def wait_for_spans(self, name: str, count: int = 1) -> list[ReceivedSpan]:
        """Wait until `count` spans called `name` have arrived; return them in order of arrival."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = [s for s in self.spans() if s.span.name == name]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        names = [s.span.name for s in self.spans()]
        raise AssertionError(f"fewer than {count} spans {name!r} within {START_TIMEOUT}s; received {names}")


class OtlpReceiver(_Requests, trace_service_pb2_grpc.TraceServiceServicer):
    """Listens on 127.0.0.1 (OTLP/gRPC, plaintext) and keeps every ExportTraceServiceRequest."""

    def __init__(self) -> None:
        super().__init__()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="otlp-receiver"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT says for this receiver (http: plaintext)."""
        return f"http://127.0.0.1:{self.port}"

    def Export(  # noqa: N802 - the RPC's name
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.ServicerContext,  # noqa: ARG002 - the servicer's signature
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        """Keep the request; accept every span."""
        self.keep(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def close(self) -> None:
        """Stop listening at once."""
        self._server.stop(grace=None).wait(timeout=5)


class OtlpHttpReceiver(_Requests):
    """Listens on 127.0.0.1 (OTLP/HTTP with protobuf bodies, plaintext) on a thread of its own."""

    def __init__(self) -> None:
        super().__init__()
        requests = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                requests.keep(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                del format, args  # quiet: the suite's output is for failures

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-http-receiver", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_TRACES_ENDPOINT says for this receiver: the full URL, as the HTTP exporter wants."""
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def close(self) -> None:
        """Stop listening."""
        self._server.shutdown()
        self._server.server_close()
