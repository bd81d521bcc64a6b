"""The server's certificate and client CAs from the SPIFFE Workload API: the agent's X509-SVID stream, followed.

With `[tls] source = "spiffe"` the server opens the agent's FetchX509SVID stream before it binds its
port, and waits at most `first_svid_timeout` for a usable answer: without one it does not start (the
message says why). Each answer becomes a TLS set like the files' (the first SVID's chain and key; every
bundle sent, the own trust domain's and the federated ones, as the client CAs), checked by the same
tlsfiles.check, and handed to ServerCertificates, whose fetcher gives it to gRPC on the next new
connection: a rotation pushed by the agent needs no restart and fails no call.

While serving, a broken stream (the agent restarting, its socket gone) or an unusable answer is logged
(`workload_api.stream_error`) and counted (synctoken_workload_api_errors_total, by kind), the last good
set is kept, and the stream is opened again after a capped, jittered backoff. Which callers get in is
still `identity.trust_domains`'s and the policy's decision: a bundle only lets a chain verify, and only
for IDs of its own trust domain (the caller-id check makes sure the chain leads to that one's CAs).

The stream is read in the server's event loop with grpc.aio rather than py-spiffe's X509Source (a
thread): that one stops for good on the first answer it cannot parse, and retries without telling.
py-spiffe parses and checks the SVID and the bundles (X509Svid.parse_raw, X509Bundle.parse_raw).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import random
from collections.abc import Callable
from typing import Any

import grpc
import structlog
from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain, X509Bundle, X509Svid

# py-spiffe's stubs of the standard's workload.proto: its messages, so that this process never holds two
# copies of the same (package-less) message names, which protobuf refuses.
from spiffe._proto import workload_pb2
from spiffe.errors import PySpiffeError

from synctoken_server import metrics
from synctoken_server.config import tlsfiles
from synctoken_server.config.tlsfiles import ServerTlsMaterial, TlsFileError
from synctoken_server.config.workloadapi import WorkloadApiSettings
from synctoken_server.durations import format_utc
from synctoken_server.process.certificates import ServerCertificates

_log = structlog.get_logger("synctoken.workload_api")

FETCH_X509_SVID = "/SpiffeWorkloadAPI/FetchX509SVID"
HEADER = (("workload.spiffe.io", "true"),)
"""Every Workload API call carries it; SPIRE refuses a call without it."""

BACKOFF_FIRST = 0.1
BACKOFF_CAP = 5.0
"""Seconds: the wait before reopening the stream doubles from the first to the cap, each drawn in [half, whole]."""

# The kinds of synctoken_workload_api_errors_total.
UNAVAILABLE = "unavailable"
"""No agent on the socket, or it went away mid-stream."""
REFUSED = "refused"
"""The agent answered with an error status (PERMISSION_DENIED: no registration entry matches this process)."""
ENDED = "ended"
"""The agent closed the stream without an error."""
INVALID = "invalid"
"""An answer that cannot serve: no SVID, a chain or key that does not check out, an unparsable bundle."""
KINDS = (UNAVAILABLE, REFUSED, ENDED, INVALID)

Clock = Callable[[], dt.datetime]


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class WorkloadApiUnavailable(Exception):
    """No usable X509-SVID within first_svid_timeout: the server cannot start."""


class WorkloadApiSource:
    """One agent's X509-SVID stream: the first usable answer, then every later one, into ServerCertificates."""

    def __init__(self, settings: WorkloadApiSettings, clock: Clock = _utc_now) -> None:
        self.settings = settings
        self._clock = clock
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.UnaryStreamCall[Any, Any] | None = None
        self._attempt = 0
        self._problem = ""
        """The last problem, for the start-up failure's message."""
        self._counted: metrics.Metrics | None = None
        self._uncounted: list[str] = []
        """Kinds of the errors before the metrics existed (while waiting for the first SVID)."""
        self._task: asyncio.Task[None] | None = None
        self.material: ServerTlsMaterial | None = None
        """The first set (`first`): what the server starts with."""

    async def first(self) -> ServerTlsMaterial:
        """The first usable set, within first_svid_timeout; else WorkloadApiUnavailable saying what went wrong."""
        loop = asyncio.get_running_loop()
        timeout = self.settings.first_svid_timeout
        deadline = loop.time() + timeout
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                while True:
                    material = await self._receive()
                    if material is not None:
                        self._attempt = 0
                        self.material = material
                        _log.info("workload_api.first_svid", endpoint=self.settings.endpoint_socket)
                        return material
                    await asyncio.sleep(self._backoff())
        if not self._problem:  # an error seen is a likelier reason than silence, so only without one
            connected = self._channel is not None and self._channel.get_state() is grpc.ChannelConnectivity.READY
            self._problem = (
                "the agent accepted the stream but sent no X509-SVID" if connected else "no connection to the agent"
            )
        await self.close()
        raise WorkloadApiUnavailable(
            f"no usable X509-SVID from the SPIFFE Workload API at {self.settings.endpoint_socket} within "
            f"{timeout}s (tls.first_svid_timeout): {self._problem}"
        )

    def follow(self, certificates: ServerCertificates, counted: metrics.Metrics) -> None:
        """From now on, hand every new set the agent sends to `certificates` (in a task of the running loop)."""
        self._counted = counted
        for kind in self._uncounted:
            counted.workload_api_errors.labels(kind).inc()
        self._uncounted.clear()
        self._task = asyncio.get_running_loop().create_task(self._follow(certificates), name="workload-api")

    async def close(self) -> None:
        """Stop following and close the stream."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close_stream()

    async def _follow(self, certificates: ServerCertificates) -> None:
        while True:
            try:
                material = await self._receive()
                if material is not None:
                    self._attempt = 0
                    certificates.offer(material)
                    continue
            except Exception:  # noqa: BLE001 - a bug here must not stop rotation for the server's lifetime
                _log.exception("workload_api.follow_failed", endpoint=self.settings.endpoint_socket)
                await self._close_stream()
            await asyncio.sleep(self._backoff())

    async def _receive(self) -> ServerTlsMaterial | None:
        """The next usable set from the stream, opened if need be; None after a problem (logged and counted)."""
        if self._call is None:
            self._channel = grpc.aio.insecure_channel(self.settings.target)
            fetch = self._channel.unary_stream(
                FETCH_X509_SVID,
                request_serializer=workload_pb2.X509SVIDRequest.SerializeToString,
                response_deserializer=workload_pb2.X509SVIDResponse.FromString,
            )
            self._call = fetch(workload_pb2.X509SVIDRequest(), metadata=HEADER)
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            await self._close_stream()
            code = exc.code()
            self._report(
                UNAVAILABLE if code is grpc.StatusCode.UNAVAILABLE else REFUSED, f"{code.name}: {exc.details()}"
            )
            return None
        if not isinstance(response, workload_pb2.X509SVIDResponse):  # grpc.aio.EOF
            await self._close_stream()
            self._report(ENDED, "the agent ended the stream")
            return None
        try:
            material, spiffe_id, trust_domains = svid_material(response, self._clock())
        except ValueError as exc:
            self._report(INVALID, str(exc))
            return None
        _log.info(
            "workload_api.svid",
            spiffe_id=spiffe_id,
            serial=material.serial,
            not_after=format_utc(material.not_after),
            trust_domains=trust_domains,
        )
        return material

    def _report(self, kind: str, problem: str) -> None:
        self._problem = problem
        if self._counted is not None:
            self._counted.workload_api_errors.labels(kind).inc()
        else:
            self._uncounted.append(kind)
        _log.warning("workload_api.stream_error", kind=kind, problem=problem, endpoint=self.settings.endpoint_socket)

    def _backoff(self) -> float:
        """The wait before the next attempt: doubling to BACKOFF_CAP, jittered so that workers do not move in step."""
        ceiling = min(BACKOFF_CAP, BACKOFF_FIRST * 2**self._attempt)
        self._attempt += 1
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not a secret

    async def _close_stream(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def svid_material(
    response: workload_pb2.X509SVIDResponse, now: dt.datetime
) -> tuple[ServerTlsMaterial, str, list[str]]:
    """The TLS set an answer makes (its first SVID and every bundle), its SPIFFE ID and bundles' trust domains.

    ValueError says why the answer cannot serve; it never quotes the key.
    """
    if not response.svids:
        raise ValueError("the answer holds no X509-SVID")
    first = response.svids[0]
    try:
        svid = X509Svid.parse_raw(first.x509_svid, first.x509_svid_key)
        bundles = [X509Bundle.parse_raw(svid.spiffe_id.trust_domain, first.bundle)]
        bundles += [X509Bundle.parse_raw(TrustDomain(td), der) for td, der in response.federated_bundles.items()]
    except PySpiffeError as exc:
        raise ValueError(f"the X509-SVID or a bundle does not parse: {exc}") from None
    # Each bundle vouches for its own trust domain's IDs only (TrustAnchors.by_trust_domain). A federated
    # bundle under the SVID's own trust domain would be a second, rival set of CAs for it: refused, not merged.
    by_trust_domain = {
        b.trust_domain.name: frozenset(ca.public_bytes(serialization.Encoding.DER) for ca in b.x509_authorities)
        for b in bundles
    }
    if len(by_trust_domain) < len(bundles):
        raise ValueError(f"a federated bundle is for the X509-SVID's own trust domain {svid.spiffe_id.trust_domain}")
    # One PEM of every CA, in a fixed order: the same bundles make the same bytes (see same_contents).
    authorities = sorted(
        {ca.public_bytes(serialization.Encoding.DER): ca for b in bundles for ca in b.x509_authorities}.items()
    )
    if not authorities:
        raise ValueError("the answer holds no CA certificate to verify callers with")
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain)
    key_pem = svid.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ca_pem = b"".join(ca.public_bytes(serialization.Encoding.PEM) for _der, ca in authorities)
    try:
        material = tlsfiles.check(None, (), chain_pem, key_pem, ca_pem, now=now)
    except TlsFileError as exc:
        raise ValueError(f"the X509-SVID cannot serve: {_in_svid_words(exc)}") from None
    material = dataclasses.replace(
        material,
        anchors=dataclasses.replace(
            material.anchors, by_trust_domain=by_trust_domain, own_trust_domain=svid.spiffe_id.trust_domain.name
        ),
    )
    return material, str(svid.spiffe_id), sorted(str(b.trust_domain) for b in bundles)


def _in_svid_words(exc: TlsFileError) -> str:
    """tlsfiles.check's problem, said of the SVID's key or certificate rather than of files that do not exist."""
    part = "key" if exc.key == tlsfiles.KEY_KEY else "certificate"
    problem = exc.problem.replace(f"the first certificate in {tlsfiles.CERT_KEY}", "its certificate")
    # "a DSA key cannot be used; ..." reads after a colon, "expired at ..." and "does not match ..." without.
    return f"its {part}: {problem}" if problem.startswith(("a ", "an ")) else f"its {part} {problem}"


async def connect(settings: WorkloadApiSettings | None) -> WorkloadApiSource | None:
    """The Workload API source with its first set (None for the TLS files); WorkloadApiUnavailable if none came."""
    if settings is None:
        return None
    source = WorkloadApiSource(settings)
    try:
        await source.first()
    except asyncio.CancelledError:
        await source.close()  # a stop signal during the wait: no stream left open as the process ends
        raise
    return source
