"""The gRPC server: mTLS credentials, TokenService, health and reflection, start, reload and stop.

It is a grpc.aio server: reflection and health Watch are long-lived streams,
and on a thread-pool server each one holds a worker thread for its whole life,
so a few grpcurl sessions or watchers could starve IssueToken.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from synctoken.v1 import token_service_pb2
from synctoken_server import metrics
from synctoken_server.audit.record import AuditLog
from synctoken_server.authn import meshbind
from synctoken_server.authn.svid import TrustAnchors
from synctoken_server.config.schema import Config
from synctoken_server.config.tlsfiles import ServerTlsMaterial
from synctoken_server.durations import format_utc
from synctoken_server.metrics import Metrics
from synctoken_server.policy.limits import MAX_BUCKETS, RateLimiter
from synctoken_server.process.certificates import ServerCertificates
from synctoken_server.process.probes import ProbeListener
from synctoken_server.process.workloadcerts import WorkloadApiSource
from synctoken_server.rpc.issuing import GlobalTokenIssuer, TokenIssuer
from synctoken_server.rpc.servicer import TokenServicer
from synctoken_server.rpc.snapshot import Snapshot, Snapshots
from synctoken_server.serveroptions import server_options
from synctoken_server.tokens.keyledger import SignedExpiries

if TYPE_CHECKING:
    from synctoken_server.limitstore.redisbuckets import RedisLimiter
    from synctoken_server.tracing import Tracing

_log = structlog.get_logger("synctoken.tls")

_TOKEN_SERVICE_DESCRIPTOR = token_service_pb2.DESCRIPTOR.services_by_name["TokenService"]
TOKEN_SERVICE = _TOKEN_SERVICE_DESCRIPTOR.full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

AUDIT_PROBE_SECONDS = 0.5
"""How often health re-checks an audit log that could not be written, and the certificate's expiry."""

BALANCING_HEALTH = "synctoken.balancing"
"""The health status that clients balancing over replicas themselves watch (the Python client's
healthCheckConfig names it): NOT_SERVING only in the last moment of a drain, never for the audit
log, so such a client still reaches a replica whose log is full and gets its AUDIT_UNAVAILABLE."""

CLIENT_MOVE_SECONDS = 1.0
"""The end of drain_delay in which BALANCING_HEALTH says NOT_SERVING before the server stops.

gRPC core cancels (CANCELLED, which no client retries) every call that has
reached the server but not yet a handler when the stop begins (grpc/grpc
issue 41785), and a client keeps sending calls until something tells it to
stop: so the calls must stop before the server does. A client watching
BALANCING_HEALTH moves its calls to the other replicas within a round trip
of the change; this is ample for that. It is only the end of the drain,
because a client with one address (an L4 balancer, a ClusterIP) has nowhere
to move meanwhile: its calls wait until the stop's GOAWAY makes it reconnect."""


class TokenServer:
    """A configured, not yet started, synctoken server."""

    def __init__(
        self,
        config: Config,
        audit_log: AuditLog | None = None,
        *,
        reuse_port: bool = False,
        workers: int = 1,
        max_buckets: int = MAX_BUCKETS,
        workload_api: WorkloadApiSource | None = None,
    ) -> None:
        """`workload_api`: with [tls] source = "spiffe", the source holding its first set (workloadcerts.connect)."""
        self._workers = workers
        """How many processes share the port (and so divide the rate limits)."""
        self.tracing: Tracing | None = None
        """The span exporter and interceptor, if tracing is configured: made at start (restart to change)."""
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if config.tracing_protocol is not None:
            # Imported only here: without [tracing], OpenTelemetry is never loaded.
            from synctoken_server.tracing import Tracing  # noqa: PLC0415

            self.tracing = Tracing(config.tracing_protocol)
            # Passed explicitly rather than by patching grpc.aio.server: this server, these methods.
            interceptors.append(self.tracing.interceptor(TOKEN_SERVICE))
        self._server = grpc.aio.server(
            interceptors=interceptors, options=server_options(config.timeouts, reuse_port=reuse_port)
        )
        audit_log = audit_log or AuditLog()
        self._audit = audit_log
        self._serving_watch: asyncio.Task[None] | None = None
        self.snapshots = Snapshots(Snapshot.of(config, self._anchors, workers))
        # Workers count too when the parent serves the scrape (workers > 1).
        self.metrics = Metrics(enabled=config.metrics_listen is not None)
        self.metrics.signing_with(config.credentials.api_key_sid)
        self._metrics_listener: metrics.Listener | None = None
        self.signed = SignedExpiries()
        """What each API key has signed: kept across reloads, for the operator's key rotation."""
        self._workload_api = workload_api
        self.certificates = ServerCertificates(_first_material(config, workload_api), config.tls_expiry_warning)
        self.limiter = RateLimiter(time.monotonic, max_buckets)
        """The rate limits' buckets: kept across reloads, and carried over to each new config's limits."""
        issuer = TokenIssuer(signed=self.signed, limiter=self.limiter)
        self.global_limiter: RedisLimiter | None = None
        """The global buckets in Redis, if configured: chosen at start, kept across reloads (restart to change)."""
        if config.limits_backend is not None:
            # Imported only here: without a Redis backend, redis-py is never loaded.
            from synctoken_server.limitstore.redisbuckets import RedisLimiter  # noqa: PLC0415

            self.global_limiter = RedisLimiter(config.limits_backend, self.limiter, self.metrics)
            issuer = GlobalTokenIssuer(signed=self.signed, limiter=self.limiter, global_limiter=self.global_limiter)
        servicer = TokenServicer(
            snapshots=self.snapshots, issuer=issuer, audit_log=audit_log, metrics=self.metrics, tracing=self.tracing
        )
        self._server.add_generic_rpc_handlers((_raw_request_handlers(servicer),))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection((TOKEN_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), self._server)
        try:
            self.port = self._server.add_secure_port(config.listen, self.certificates.credentials())
        except RuntimeError as exc:  # grpc's way of saying bind() failed
            raise OSError(f"cannot listen on {config.listen}: address in use or not available") from exc
        self.probes: ProbeListener | None = None
        """The plaintext health listener for the kubelet; None without [health]."""
        if config.health_listen is not None:
            self.probes = ProbeListener(config.health_listen, self._health, config.timeouts, reuse_port=reuse_port)
        self.mesh_addresses: tuple[str, ...] = ()
        """What the mesh listener listens on (a unix: path, or loopback host:port each); () when off."""
        if config.mesh is not None:
            # Plaintext on purpose: the sidecar terminated TLS, and only it can reach this address.
            self.mesh_addresses = meshbind.bind(self._server, config.mesh, self.port)
        # With several workers the parent serves the scrape for all of them (see workers.py).
        if config.metrics_listen is not None and self.metrics.registry is not None and workers == 1:
            self._metrics_listener = metrics.serve(config.metrics_listen, self.metrics.registry)

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics listener is on, if this server runs one."""
        return self._metrics_listener.port if self._metrics_listener else None

    @property
    def metrics_connections(self) -> int | None:
        """How many scrape connections the metrics listener serves at once, if this server runs one."""
        return self._metrics_listener.connections if self._metrics_listener else None

    async def start(self) -> None:
        """Accept RPCs; health reports SERVING once config and credentials are loaded, i.e. now."""
        self.certificates.announce()
        self.record_certificate()
        await self._server.start()
        if self._workload_api is not None:
            self._workload_api.follow(self.certificates, self.metrics)
        if self.global_limiter is not None:
            # Not a serving condition: without Redis the limits fall back (on_backend_failure), and
            # this one call, bounded by the timeout, puts a wrong password or address in the log now.
            await self.global_limiter.start()
        await self._set_health(serving=True)
        await self._health.set(BALANCING_HEALTH, health_pb2.HealthCheckResponse.SERVING)
        if self.probes is not None:
            # Once health says SERVING: the kubelet's first answer is never a stale NOT_SERVING or UNIMPLEMENTED.
            await self.probes.start()
        self._serving_watch = asyncio.create_task(self._watch_serving(), name="serving-watch")

    async def stop(self, *, drain_delay: float | None = None, grace: float | None = None) -> None:
        """Stop without failing any call that was accepted.

        Health says NOT_SERVING at once (on the probe listener too), but calls are still accepted for
        `drain_delay` seconds, so that balancers and health-checking clients
        move away first; then new calls are refused and calls in flight get
        `grace` seconds to finish. Both default to the current config's values.
        Clients balancing themselves are told last (see CLIENT_MOVE_SECONDS).
        """
        timeouts = self.snapshots.current.config.timeouts
        drain_delay = timeouts.drain_delay if drain_delay is None else drain_delay
        grace = timeouts.grace if grace is None else grace
        if self._serving_watch is not None:
            # Cancelled first, so that it cannot set SERVING again: it only ever waits in its sleep.
            self._serving_watch.cancel()
        await self._set_health(serving=False)
        if self._serving_watch is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._serving_watch
        clients_move = min(drain_delay, CLIENT_MOVE_SECONDS)
        await asyncio.sleep(drain_delay - clients_move)
        # Every status NOT_SERVING, BALANCING_HEALTH included, and no later change.
        await self._health.enter_graceful_shutdown()
        await asyncio.sleep(clients_move)
        await self._server.stop(grace)
        if self._workload_api is not None:
            await self._workload_api.close()
        if self.global_limiter is not None:
            await self.global_limiter.close()
        # After the mTLS listener: until it has closed, the kubelet reads NOT_SERVING, not a refused connection.
        if self.probes is not None:
            await self.probes.stop()
        # Last, so that the calls drained meanwhile are counted in a final scrape.
        if self._metrics_listener is not None:
            await asyncio.to_thread(self._metrics_listener.close)
        if self.tracing is not None:
            # Their spans too, as far as a bounded wait allows (a dead collector gets none).
            await self.tracing.close()

    def record_certificate(self) -> None:
        """Put the expiry of the server certificate in use into the metrics."""
        self.metrics.certificate_expiry.set(self.certificates.current.not_after.timestamp())

    def _anchors(self) -> TrustAnchors:
        # The CAs gRPC verifies against right now: they rotate with the TLS files, not with the config.
        return self.certificates.current.anchors

    def apply(self, config: Config) -> Snapshot:
        """Serve `config` from the next RPC on (and its TLS files from the next handshake); return the old snapshot.

        What only a restart can change (the port, the gRPC server options) stays as it is.
        """
        # The source this server started with stays: tls.source is restart-only (reloading.restart_only).
        self.certificates.use(config.tls if self._workload_api is None else None, config.tls_expiry_warning)
        new = Snapshot.of(config, self._anchors, self._workers)
        old = self.snapshots.replace(new)
        # In the same step as the swap: no RPC sees the new limits with buckets not yet carried over.
        self.limiter.reconfigure(old.limits_for, new.limits_for)
        self.metrics.signing_with(config.credentials.api_key_sid, old.config.credentials.api_key_sid)
        return old

    async def _watch_serving(self) -> None:
        # Balancers must stop sending calls we would refuse: while the audit
        # log cannot be written, health says NOT_SERVING, and a probe line
        # tells when writing works again. So too once the certificate in use
        # has expired (no new handshake can succeed): with the Workload API,
        # the agent has been gone for longer than the SVID's lifetime left.
        serving = True
        expired = False
        while True:
            await asyncio.sleep(AUDIT_PROBE_SECONDS)
            writable = self._audit.probe()
            if self.certificates.expired() != expired:
                expired = not expired
                current = self.certificates.current
                if expired:
                    _log.error("tls.expired", serial=current.serial, not_after=format_utc(current.not_after))
                else:
                    _log.info("tls.valid_again", serial=current.serial, not_after=format_utc(current.not_after))
            if (writable and not expired) != serving:
                serving = not serving
                await self._set_health(serving=serving)

    async def _set_health(self, *, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", TOKEN_SERVICE):
            await self._health.set(service, status)


def _first_material(config: Config, workload_api: WorkloadApiSource | None) -> ServerTlsMaterial:
    """What the server starts with: the checked files, or the Workload API's first set."""
    material = config.tls if workload_api is None else workload_api.material
    if material is None or (config.workload_api is None) != (workload_api is None):
        raise ValueError("[tls] source = spiffe needs the Workload API's first set (workloadcerts.connect)")
    return material


def _raw_request_handlers(servicer: TokenServicer) -> grpc.GenericRpcHandler:
    """TokenService's methods, taken from the descriptor, with requests passed through as bytes."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=None,  # the servicer parses, so that bad bytes get INVALID_ARGUMENT
            response_serializer=message_factory.GetMessageClass(method.output_type).SerializeToString,
        )
        for method in _TOKEN_SERVICE_DESCRIPTOR.methods
    }
    return grpc.method_handlers_generic_handler(TOKEN_SERVICE, handlers)
