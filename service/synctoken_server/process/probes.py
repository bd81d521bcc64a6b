"""The probe listener: plaintext gRPC health for the kubelet, sharing the mTLS listener's status, and nothing else.

Kubernetes' gRPC probe speaks plaintext and presents no client certificate,
so it cannot ask the mTLS listener. This is a gRPC server of its own with
only grpc.health.v1 registered (no TokenService, no reflection: any other
method is UNIMPLEMENTED), and the very HealthServicer the mTLS listener
uses, so both say the same thing at every moment: SERVING once started,
NOT_SERVING from the first instant of a drain or while the audit log cannot
be written.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from synctoken_server.serveroptions import ServerTimeouts, server_options

PROBE_CONNECTIONS = 16
"""At most this many connections at once; gRPC closes any more as soon as it accepts them.

The port is plaintext and asks for no certificate: without a bound, anyone who
reaches it holds a file descriptor per connection (for `idle`, 5 minutes, or
longer with a Watch open), and about 20000 of them fill the process's open-file
limit, so that the mTLS listener accepts no connection at all. The kubelet opens
one connection per probe and closes it: a few at once is all it needs.
"""
PROBE_RPCS = PROBE_CONNECTIONS
"""At most this many health calls at once (a Watch stream lasts as long as its peer wants)."""


class ProbeListener:
    """A plaintext gRPC server answering health only, bound but not yet started."""

    def __init__(
        self, listen: str, servicer: health.aio.HealthServicer, timeouts: ServerTimeouts, *, reuse_port: bool
    ) -> None:
        # The same limits as the mTLS listener: a probe sends a few bytes, and an idle or endless
        # connection must not hold a file descriptor here either. With --workers every worker binds
        # it with SO_REUSEPORT, as the mTLS port: whichever answers, it answers for its own process.
        options = [
            *server_options(timeouts, reuse_port=reuse_port),
            ("grpc.max_allowed_incoming_connections", PROBE_CONNECTIONS),
        ]
        self._server = grpc.aio.server(options=options, maximum_concurrent_rpcs=PROBE_RPCS)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self._server)
        try:
            self.port = self._server.add_insecure_port(listen)
        except RuntimeError as exc:  # grpc's way of saying bind() failed
            raise OSError(f"cannot listen on {listen}: address in use or not available") from exc
        self.address = f"{listen.rpartition(':')[0]}:{self.port}"
        """What it listens on, with the port bound (a configured :0 is no address)."""

    async def start(self) -> None:
        """Answer probes."""
        await self._server.start()

    async def stop(self) -> None:
        """Close at once: called after the mTLS listener has closed, so that probes see NOT_SERVING until then."""
        await self._server.stop(0)
