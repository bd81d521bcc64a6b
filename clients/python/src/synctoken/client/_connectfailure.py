"""Why a call never reached synctoken: gRPC's words for a failed connection, read into a cause and a sentence.

A wait-for-ready call that cannot connect waits out its deadline and ends as a
bare DEADLINE_EXCEEDED: gRPC Python keeps the connection's error to itself (the
channel's connectivity state carries none). A call that does not wait fails at
once with UNAVAILABLE instead, and its details carry the last connection error:

    connections to all backends failing; last error: UNKNOWN: ipv4:127.0.0.1:50051:
    Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL
    routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate

So the clients make every attempt of a call without waiting, and read that
text here. It is gRPC core's prose, not an API: the tests, against real servers
with real certificates, pin every form read below.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from synctoken.client._channel import BALANCING_HEALTH


class Cause(enum.StrEnum):
    """Why a call failed before reaching a server, as `SynctokenError.cause`."""

    TLS_HANDSHAKE_FAILED = "tls_handshake_failed"
    """A connection was made, but TLS refused it, on this side or the server's: retrying will not help."""
    CONNECTION_FAILED = "connection_failed"
    """No attempt could connect (refused, unreachable, closed mid-handshake), or every server connected to was
    stopping, before the deadline passed."""


# The first words are the load-balancing policy's: round_robin's (the clients'), then pick_first's (gRPC's default).
# A failed connection's error starts with its code; a connection whose health check says no has none.
_LAST_ERROR = re.compile(
    r"(?:connections to all backends failing|failed to connect to all addresses); "
    r"last error: (?:[A-Z_]+: )?(?P<address>\S+?): (?P<error>.*)",
    re.DOTALL,
)
_UNHEALTHY = "backend unhealthy"
"""gRPC's words for a connection whose health (see _channel.BALANCING_HEALTH) is not SERVING."""
# gRPC appends the status of the OpenSSL error queue, which says nothing.
_TRAILER = ": OK"
_VERIFY_FAILED = "CERTIFICATE_VERIFY_FAILED: "


@dataclass(frozen=True)
class ServerCheck:
    """How a client checks the server's certificate, in the words a failed handshake's message uses."""

    name: str
    """The name checked and the setting that says it: `'synctoken.internal' (server_name)`."""
    anchors: str
    """Where the trusted CAs come from and what must hold: `the CA file (ca_file, ...) must hold ...`."""


@dataclass(frozen=True)
class ConnectFailure:
    """The last connection error behind a call that could not be sent, and what it means."""

    cause: Cause
    address: str
    """The address gRPC tried, as it writes it: `ipv4:10.0.0.7:50051`; empty when it named none."""
    message: str
    """A sentence for people: what failed and, for TLS, the likely reason."""


def read_failure(details: str, check: ServerCheck) -> ConnectFailure | None:
    """What a fail-fast UNAVAILABLE's details say about the connection; None if they are not a connection failure.

    `check` says how the client checks the server certificate, for the
    message when it fails.
    """
    match = _LAST_ERROR.fullmatch(details)
    if match is None:
        return None
    address, error = match["address"], match["error"].removesuffix(_TRAILER)
    if error == _UNHEALTHY:
        # A draining server's last second: wait for its GOAWAY, after which the channel connects anew.
        return ConnectFailure(
            Cause.CONNECTION_FAILED,
            address,
            f"{address} takes no new calls: its health for balancing clients ({BALANCING_HEALTH}) is not SERVING "
            "(it is stopping, or it is a synctoken server older than this client, which does not report it)",
        )
    tls = _tls_reason(error, check)
    if tls is None:
        return ConnectFailure(Cause.CONNECTION_FAILED, address, f"could not connect to {address}: {error}")
    return ConnectFailure(Cause.TLS_HANDSHAKE_FAILED, address, f"TLS handshake with {address} failed: {tls}")


def _tls_reason(error: str, check: ServerCheck) -> str | None:
    if _VERIFY_FAILED in error:
        why = error.rpartition(_VERIFY_FAILED)[2]
        return f"this client does not trust the server's certificate ({why}): {check.anchors}"
    if "Hostname Verification Check failed" in error:
        return f"the server's certificate does not carry the name {check.name}"
    if "WRONG_VERSION_NUMBER" in error:
        return "the server did not answer in TLS (a plaintext port, or not gRPC?)"
    if error == "Socket closed":
        # The whole handshake succeeded on this side, then the server hung up
        # before HTTP/2 began: in TLS 1.3 the client's certificate is checked
        # after the client has finished, and its refusal reaches us as a close.
        # (A close during the handshake reads "Handshake read failed (...)".)
        return (
            "the server closed the connection as the handshake ended: it most likely refused this client's "
            "certificate (not issued by a CA it trusts, expired, or not yet valid). TLS 1.3 does not tell the "
            "client why; the server's gRPC log does (GRPC_VERBOSITY=INFO)"
        )
    if error.startswith(("Tls handshake failed", "Ssl handshake failed", "Failed to create security handshaker")):
        return error
    return None
