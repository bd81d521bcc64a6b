"""The server's settings: its timeouts, the channel arguments made of them, and what a listen address is.

Imports nothing else of synctoken's, nor grpc, so that the benchmark's empty
RPC server runs on exactly these settings without loading synctoken (whose
imports would put tens of MiB into the ceiling it is meant to show).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# [0-9], not \d: \d also matches other scripts' digits, such as U+FF15 (a full-width 5).
_LISTEN = re.compile(r"(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")
_MAX_PORT = 65535

MAX_REQUEST_BYTES = 4 * 1024
"""A valid IssueTokenRequest is well under 1 KiB; anything bigger is refused
by gRPC itself (RESOURCE_EXHAUSTED) before it is parsed."""

MAX_METADATA_BYTES = 16 * 1024
"""A request's headers, all together. gRPC's defaults are a soft limit of 8 KiB and a hard one of
16 KiB, and between the two it refuses at random, more often the larger the headers: a sidecar
forwarding whole certificates in x-forwarded-client-cert (Cert=, Chain=) would fail now and then.
One limit makes the answer the same every time."""


@dataclass(frozen=True)
class ServerTimeouts:
    """Server timings, in seconds: how long connections may take, how a stop drains, how often files are looked at."""

    drain_delay: int = 5
    """After SIGTERM: health says NOT_SERVING, but calls are still accepted this long, so balancers notice."""
    grace: int = 10
    """Then: no new calls; calls in flight get this long to finish."""
    handshake: int = 10
    """A connection that has not finished its TLS handshake by then is closed."""
    idle: int = 300
    """A connection with no call for this long is closed (clients reconnect when they need to)."""
    connection_age: int = 600
    """Any connection is asked to go away (GOAWAY) after this long, and closed `grace` later even if a
    call on it is still unfinished: a peer cannot hold a connection open with a request it never completes."""
    watch_interval: int = 1
    """How often the config file and the files it names are checked for changes; 0: reload on SIGHUP only."""


def server_options(timeouts: ServerTimeouts, *, reuse_port: bool) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments (the benchmark's empty RPC server uses them too)."""
    return [
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
        # gRPC enables SO_REUSEPORT by default, so a second server on a busy
        # port would start "fine" and silently take half the traffic. Only
        # our own workers share a port, and they ask for it.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # gRPC's default handshake timeout is 120 s: idle TCP connections that
        # never start TLS would each hold a file descriptor that long, and a
        # thousand of them lock everyone else out.
        ("grpc.server_handshake_timeout_ms", timeouts.handshake * 1000),
        ("grpc.max_connection_idle_ms", timeouts.idle * 1000),
        # A peer that opens a call and never finishes its request would
        # otherwise hold the connection, and its file descriptor, forever.
        ("grpc.max_connection_age_ms", timeouts.connection_age * 1000),
        ("grpc.max_connection_age_grace_ms", timeouts.grace * 1000),
    ]


def split_listen(listen: str) -> tuple[str, int] | None:
    """`host:port` as (host, port), brackets off an IPv6 host; None if it is not that.

    The one check of a listen address: server.listen, metrics.listen and a loopback mesh.listen.
    """
    match = _LISTEN.fullmatch(listen)
    if match is None or int(match["port"]) > _MAX_PORT:
        return None
    return match["host"].strip("[]"), int(match["port"])
