"""`[tracing]`: whether RPCs become OpenTelemetry spans; everything else is said the OpenTelemetry way (OTEL_*).

The exporter's endpoint, headers, timeout and TLS files, the service name, the
sampler and the resource attributes are the standard OTEL_* environment
variables, read by the OpenTelemetry SDK itself, as in any instrumented
service. The table says only what they cannot: turn it on in the config file.
The protocol is read here, not by the SDK, because the server picks the
exporter: an unknown one is a config error, not a silent default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from synctoken_server.config.reader import TomlReader

KEYS = frozenset({"enabled"})
"""What [tracing] may hold."""

SDK_DISABLED = "OTEL_SDK_DISABLED"
"""The standard switch that turns every OpenTelemetry SDK off, whatever the config file says."""
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
"""Where the OTLP transport is chosen, the signal-specific one first, as the specification orders them."""
PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_PROTOCOL = "grpc"
"""As opentelemetry-distro's default: OTLP/gRPC, to port 4317."""


def read_tracing(r: TomlReader, data: Mapping[str, Any]) -> str | None:
    """The OTLP protocol to export spans with when `[tracing] enabled = true`; None when tracing is off.

    OTEL_SDK_DISABLED=true turns it off whatever the file says (with a warning).
    """
    table = r.table(data, "tracing", KEYS, required=False)
    if not r.get(table, "tracing", "enabled", bool, default=False):
        return None
    # As the SDK reads it: case-insensitive "true"; anything else leaves the SDK on.
    if r.environ.get(SDK_DISABLED, "").strip().lower() == "true":
        r.warnings.append(f"[tracing] enabled = true, but {SDK_DISABLED}=true turns tracing off")
        return None
    for variable in PROTOCOL_VARIABLES:
        protocol = r.environ.get(variable, "").strip()
        if protocol:
            if protocol not in PROTOCOLS:
                choices = " or ".join(PROTOCOLS)
                raise r.fail("tracing.enabled", f"environment variable {variable}={protocol!r} is not {choices}")
            return protocol
    return DEFAULT_PROTOCOL
