"""Tracing for the BFF: its Starlette app as an OpenTelemetry server span, and the trace id on its token lines.

With the extra `synctoken-bff[tracing]`, `BFF_TRACING=true` makes the
`synctoken-bff` command set up OpenTelemetry's SDK the standard way (OTLP
export over gRPC or HTTP, a batch processor, and every OTEL_* variable:
endpoint, service name, sampler, resource attributes, propagators). An
application that builds the app itself and has set its own tracer provider
gets the same spans. The synctoken client then makes its call a child of the
BFF's span, and synctoken's own span a child of that: one GET /token, one trace.

Nothing is imported without it: the checks read `sys.modules` first.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from starlette.middleware import Middleware

ENV_TRACING = "BFF_TRACING"
"""`true`: the synctoken-bff command exports spans as the OTEL_* variables say."""
DEFAULT_SERVICE_NAME = "synctoken-bff"


def start_from_env(environ: Mapping[str, str]) -> Callable[[], None] | None:
    """Set the global tracer provider if BFF_TRACING=true (and OTEL_SDK_DISABLED is not); return its shutdown."""
    value = environ.get(ENV_TRACING, "").strip().lower()
    if value not in {"", "true", "false"}:
        # As every BFF setting: a typo ("yes", "1") is refused at start, not read as "off".
        raise ValueError(f"{ENV_TRACING}: {value!r} is neither true nor false")
    if value != "true" or environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    # Imported only here: the extra synctoken-bff[tracing] installs these.
    try:
        from opentelemetry import trace  # noqa: PLC0415
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
    except ImportError as exc:
        raise ValueError(f"{ENV_TRACING}=true needs the extra synctoken-bff[tracing] ({exc.name} is missing)") from None

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(_exporter(environ)))
    trace.set_tracer_provider(provider)
    return provider.shutdown


def _exporter(environ: Mapping[str, str]) -> Any:
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol.strip() == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter as GrpcSpanExporter,
    )

    return GrpcSpanExporter()


def _tracing_on() -> bool:
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return False
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def middleware() -> list[Middleware]:
    """The ASGI server-span middleware when a tracer provider is set (and the extra installed); else none.

    The span never sees the query string (`?device=`, the browser's endpoint id, which the BFF never
    logs either) or the browser's address: the stock middleware would put both in every span. The
    layers around it hide them from it and give them back to the app.
    """
    if not _tracing_on():
        return []
    try:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware  # noqa: PLC0415
    except ImportError:
        return []
    return [Middleware(_HideFromSpan), Middleware(OpenTelemetryMiddleware), Middleware(_GiveBack)]


_HIDDEN = "synctoken_bff.hidden_from_span"
"""Where _HideFromSpan keeps what it took out of the scope, for _GiveBack."""

Scope = dict[str, Any]
App = Callable[[Scope, Any, Any], Any]


class _HideFromSpan:
    """Takes the query string and the client address out of an HTTP scope, before the span middleware."""

    def __init__(self, app: App) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            hidden = {"query_string": scope.get("query_string", b""), "client": scope.get("client")}
            scope = {**scope, "query_string": b"", "client": None, _HIDDEN: hidden}
        await self._app(scope, receive, send)


class _GiveBack:
    """Puts back what _HideFromSpan took, after the span middleware: the app sees the request as sent."""

    def __init__(self, app: App) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        hidden = scope.get(_HIDDEN)
        if hidden is not None:
            scope = {k: v for k, v in scope.items() if k != _HIDDEN} | hidden
        await self._app(scope, receive, send)


def trace_id() -> str:
    """` trace_id=<hex>` for a log line, when the request's span is recording; else empty."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return ""
    span = trace.get_current_span()
    if not span.is_recording():
        return ""
    return f" trace_id={trace.format_trace_id(span.get_span_context().trace_id)}"
