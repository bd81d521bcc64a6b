"""OpenTelemetry for the server: each TokenService RPC a server span, exported over OTLP in the background.

Imported only when `[tracing] enabled = true` (see process/server.py): a server
without it loads no OpenTelemetry at all. The span is opened by the stock
grpc.aio interceptor (which also picks up the caller's W3C traceparent); what
only synctoken knows (the status a refusal becomes, its ErrorInfo reason, the
policy entry, whether a token left) is written by `rpc/servicer.py` through
`rpc_ended`, at the one place errors become statuses: the stock interceptor
never sees `abort_with_status`, and would call every refusal OK.

What a span never holds, by construction: the end user's identity, a token,
the API secret, the caller's certificate. Only the fields named here are set,
and none of them is built from the request's contents.

Everything else is configured the OpenTelemetry way, by the SDK itself reading
the standard OTEL_* environment variables: OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT,
_HEADERS, _TIMEOUT, _CERTIFICATE..., OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*, OTEL_PROPAGATORS.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.semconv._incubating.attributes.rpc_attributes import RPC_GRPC_STATUS_CODE

PROTOCOL_HTTP = "http/protobuf"
"""OTLP over HTTP, as OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL names it; config/tracing.py checks the choice."""

DEFAULT_SERVICE_NAME = "synctoken"
"""service.name unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES say otherwise."""

POLICY_RULE = "synctoken.policy_rule"
"""The caller's policy entry (its configured `id`), empty when none matched: the metrics label, never the caller id."""
ERROR_REASON = "synctoken.error_reason"
"""The ErrorInfo reason a refused call was sent (UPPER_SNAKE), absent on success."""
TOKEN_ISSUED = "synctoken.token_issued"  # noqa: S105 - an attribute name, not a password
"""Whether a token left the server in the response."""

SHUTDOWN_SECONDS = 2.0
"""How long a stopping server waits for the last spans to be exported: a dead collector must not hold it up."""


class Tracing:
    """The server's tracer provider, its OTLP exporter behind a batch processor, and the RPC interceptor."""

    def __init__(self, protocol: str) -> None:
        """`protocol`: http/protobuf, or grpc for anything else (config/tracing.py accepts only these two)."""
        # Shut down by close(), bounded; the SDK's own at-exit shutdown would wait for a dead collector.
        self._provider = TracerProvider(resource=_resource(), shutdown_on_exit=False)
        # Batched: the export runs on the processor's own thread, never on an RPC's path. A dead or
        # slow collector fills the queue (OTEL_BSP_MAX_QUEUE_SIZE), and spans beyond it are dropped.
        self._processor = BatchSpanProcessor(_exporter(protocol))
        self._provider.add_span_processor(self._processor)

    def interceptor(self, service: str) -> grpc.aio.ServerInterceptor:
        """The stock grpc.aio server interceptor, for `service`'s methods only (health checks are no trace)."""
        return aio_server_interceptor(  # type: ignore[no-untyped-call,no-any-return]
            tracer_provider=self._provider, filter_=filters.service_name(service)
        )

    @staticmethod
    def log_ids() -> dict[str, str]:
        """The current span's trace_id and span_id (hex, as exporters and trace UIs show them), if it is recording."""
        span = trace.get_current_span()
        if not span.is_recording():
            return {}
        context = span.get_span_context()
        return {"trace_id": trace.format_trace_id(context.trace_id), "span_id": trace.format_span_id(context.span_id)}

    @staticmethod
    def rpc_ended(code: grpc.StatusCode, reason: str | None, policy_rule: str, *, issued: bool) -> None:
        """Write how the current RPC ended on its span: the status it was sent, and synctoken's own fields."""
        span = trace.get_current_span()
        if not span.is_recording():
            return
        span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
        span.set_attribute(POLICY_RULE, policy_rule)
        span.set_attribute(TOKEN_ISSUED, issued)
        if reason is not None:
            span.set_attribute(ERROR_REASON, reason)
            # The code and reason only: a status message may quote the caller's request.
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code.name}: {reason}"))

    async def close(self) -> None:
        """Export what is left and stop the exporter, waiting for that at most SHUTDOWN_SECONDS.

        The SDK's shutdown waits for an export in progress, which against a
        dead collector retries until OTEL_EXPORTER_OTLP_TIMEOUT (10 s by
        default): it runs on a daemon thread, left behind if it takes longer.
        """
        done = threading.Event()

        def shut_down() -> None:
            self._provider.shutdown()
            done.set()

        threading.Thread(target=shut_down, name="otel-shutdown", daemon=True).start()
        await asyncio.to_thread(done.wait, SHUTDOWN_SECONDS)


def _resource() -> Resource:
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; without either,
    # the service is called synctoken rather than the SDK's unknown_service.
    detected = Resource.create()
    name = str(detected.attributes.get(SERVICE_NAME, ""))
    if name.startswith("unknown_service"):
        return detected.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return detected


def _exporter(protocol: str) -> SpanExporter:
    # Each exporter reads its endpoint, headers, timeout, compression and TLS files from OTEL_*.
    if protocol == PROTOCOL_HTTP:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter as GrpcSpanExporter,
    )

    return GrpcSpanExporter()
