"""An OTLP/gRPC trace sink for measuring tracing's cost: accepts every export, keeps nothing, counts requests.

A collector that answers at once, on its own threads in the harness's process
(not the server's), so what a traced server is charged for is its own work:
making the spans, and encoding and sending them from the batch processor's thread.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

import grpc

_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


class OtlpSink:
    """Listens on 127.0.0.1 (plaintext OTLP/gRPC); `exports` counts the Export calls received."""

    def __init__(self) -> None:
        self.exports = 0
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="otlp-sink"))
        # Bytes in, bytes out: no parsing.
        handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(self._export)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, {"Export": handler}),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def _export(self, _request: bytes, _context: Any) -> bytes:
        with self._lock:
            self.exports += 1
        return b""  # an empty ExportTraceServiceResponse: everything accepted

    @property
    def endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (http: plaintext)."""
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop at once."""
        self._server.stop(grace=None).wait(timeout=5)
