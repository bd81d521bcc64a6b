"""Client spans and W3C traceparent, when the application traces with OpenTelemetry; nothing otherwise.

OpenTelemetry is not a dependency of synctoken-api: the optional extra
`synctoken-api[tracing]` brings OpenTelemetry's gRPC instrumentation. The
client then traces each call (a CLIENT span, `traceparent` sent so that the
server's span is its child) when the application has set a tracer provider
(`trace.set_tracer_provider`, or `opentelemetry-instrument`) before the client
opens its channel, i.e. before its first call. Baggage goes along only as
OTEL_PROPAGATORS says and only if the application put baggage in the context.

Checked without importing anything an application does not already use: if
`opentelemetry.trace` was never imported, no provider can have been set.
"""

from __future__ import annotations

import sys
from typing import Any

import grpc


def _instrumentation() -> Any | None:
    """opentelemetry.instrumentation.grpc when a tracer provider is set and it is installed, else None."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    try:
        import opentelemetry.instrumentation.grpc as instrumentation  # noqa: PLC0415
    except ImportError:  # OpenTelemetry's API without the extra: no spans, and no error
        return None
    return instrumentation


def traced_channel(channel: grpc.Channel) -> grpc.Channel:
    """`channel`, with client spans and traceparent when the application traces (see the module)."""
    instrumentation = _instrumentation()
    if instrumentation is None:
        return channel
    from opentelemetry.instrumentation.grpc import grpcext  # noqa: PLC0415

    traced: grpc.Channel = grpcext.intercept_channel(  # type: ignore[no-untyped-call]
        channel, instrumentation.client_interceptor()
    )
    return traced


def aio_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """What an aio channel needs for client spans and traceparent; none when the application does not trace."""
    instrumentation = _instrumentation()
    if instrumentation is None:
        return []
    interceptors: list[grpc.aio.ClientInterceptor] = instrumentation.aio_client_interceptors()
    return interceptors
