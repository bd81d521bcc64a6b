"""The client's certificate from the SPIFFE Workload API: the agent's X509-SVID stream, kept as PEM for gRPC.

Needs the extra `synctoken-api[spiffe]` (py-spiffe):
only `from_spiffe` imports this module. py-spiffe parses and checks each SVID
(the X509-SVID leaf rules) and bundle; the stream itself is read here rather
than by py-spiffe's X509Source, which retries the errors an agent that is away
gives without a word (so a bounded first wait could not say why it ended) and
closes for good on the first SVID it cannot parse. Here every stream error is
logged (once per distinct error, not per retry), the last good SVID stays in
use, and the stream is opened again after a jittered backoff, doubling from
0.1 s to at most 5 s, for as long as the client lives.

One daemon thread per client reads the stream, blocked in gRPC; it sets
`current`, which the clients compare with their channel's at every call (a new
value opens a new channel for new calls, as a new pair of files does). The
thread holds the stream's state (`_SvidStream`), never the client's
`WorkloadCertificates`: a client dropped without close() is collected as any
object is, and a finalizer then ends its stream, so the thread ends too.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import grpc

from synctoken.client._credentials import CLIENT_KEYS, TlsMaterial, WorkloadApiTimeoutError
from synctoken.client._settings import socket_path
from synctoken.tlskeys import unusable_key

with warnings.catch_warnings():
    # cryptography deprecates DSA, which py-spiffe names when it is imported; nothing here uses DSA, and the
    # warning is py-spiffe's to fix, not the application's to read.
    warnings.filterwarnings("ignore", message="DSA is deprecated")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from spiffe import TrustDomain, X509Bundle, X509Svid
    from spiffe._proto import workload_pb2  # the standard's messages; py-spiffe ships no public module for them
    from spiffe.errors import PySpiffeError

_log = logging.getLogger("synctoken.client")

HEADER = ("workload.spiffe.io", "true")
"""The metadata every Workload API call carries: agents refuse calls without it (the standard's SSRF guard)."""
_FETCH_X509_SVID = "/SpiffeWorkloadAPI/FetchX509SVID"
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 5.0
"""Seconds between attempts to open the stream again: the longest an agent that is back waits to be seen."""
_CLOSE_WAIT = 5.0


@dataclass(frozen=True)
class _Svid:
    """One usable update: the PEM for gRPC, and what the logs may say about it."""

    material: TlsMaterial
    spiffe_id: str
    serial: int
    expires: float


class WorkloadCertificates:
    """The X509-SVID and trust bundle the Workload API pushes, as the material a client's channels use.

    The server's certificate is checked against the CAs of one trust domain:
    `server_trust_domain` (that of the expected server SPIFFE ID) or, when
    None, the client's own. Federated bundles for other trust domains are not
    trusted for the server.
    """

    def __init__(self, endpoint_socket: str, *, server_trust_domain: str | None, first_svid_timeout: float) -> None:
        deadline = time.monotonic() + first_svid_timeout
        path = Path(socket_path(endpoint_socket, "the Workload API socket"))
        # An agent that is starting, or restarting, has no socket yet: wait for it within the same bound.
        while not path.exists():
            if time.monotonic() >= deadline:
                raise WorkloadApiTimeoutError(
                    f"no SPIFFE Workload API socket at {path} within {first_svid_timeout:g} s: is the agent running, "
                    "and is its socket mounted in this container?"
                )
            time.sleep(0.05)
        self._stream = _SvidStream(endpoint_socket, path, server_trust_domain)
        # The thread and the finalizer hold the stream, not self: else this object, and the client holding
        # it, could never be collected, and a client dropped without close() would stream for ever.
        self._thread = threading.Thread(target=self._stream.run, name="synctoken-workload-api", daemon=True)
        self._end_stream = weakref.finalize(self, self._stream.stop)
        # At exit the daemon thread ends with the process, as it always has: no gRPC calls from atexit.
        self._end_stream.atexit = False
        self._thread.start()
        stream = self._stream
        if not stream.first.wait(max(0.0, deadline - time.monotonic())) or stream.svid is None:
            self.close()
            seen = stream.error or "the agent accepted the stream but sent nothing"
            raise WorkloadApiTimeoutError(
                f"no usable X509-SVID from the SPIFFE Workload API at {endpoint_socket} within "
                f"{first_svid_timeout:g} s (last seen: {seen}): is this workload registered with the agent?"
            )

    @property
    def current(self) -> TlsMaterial:
        """The material new channels use: the last good SVID, kept while the agent is away."""
        svid = self._stream.svid
        # Set before the constructor returns, and never unset.
        assert svid is not None  # noqa: S101
        return svid.material

    def due(self) -> bool:
        """Never: the agent pushes, so calls have nothing to look at."""
        return False

    def poll(self) -> TlsMaterial | None:
        """Nothing: new SVIDs arrive by themselves (see `current`)."""
        return None

    def close(self) -> None:
        """End the stream and wait for its thread; the material in use stays readable. A second call does nothing."""
        self._end_stream()  # runs stop() once, whoever calls first: close(), or the collector
        if self._thread is not threading.current_thread():
            self._thread.join(_CLOSE_WAIT)


class _SvidStream:
    """The agent's stream and what it last sent: all the reading thread holds.

    `svid` and `error` are written by the thread only, and read by the client's
    threads (an attribute read: atomic, no lock needed).
    """

    def __init__(self, endpoint: str, path: Path, server_trust_domain: str | None) -> None:
        self._endpoint = endpoint
        self._server_trust_domain = server_trust_domain
        self._stop = threading.Event()
        self.first = threading.Event()
        """Set once the first usable SVID is in `svid`."""
        # Re-entrant: stop() may run as a finalizer, in whichever thread a collection happens, this one's too.
        self._lock = threading.RLock()
        self._rpc: grpc.RpcContext | None = None
        self.error: str | None = None
        """The last problem seen, while it lasts (None once a good update arrives)."""
        self.svid: _Svid | None = None
        # gRPC's own reconnection backoff grows to 2 minutes; an agent restarting must be seen within seconds.
        self._channel = grpc.insecure_channel(f"unix:{path}", options=[("grpc.max_reconnect_backoff_ms", 5000)])
        self._fetch = self._channel.unary_stream(
            _FETCH_X509_SVID,
            request_serializer=workload_pb2.X509SVIDRequest.SerializeToString,
            response_deserializer=workload_pb2.X509SVIDResponse.FromString,
        )

    def stop(self) -> None:
        """End the stream and close the channel; the thread then returns. Does not wait: it may run in a finalizer."""
        self._stop.set()
        with self._lock:
            rpc = self._rpc
        if rpc is not None:
            rpc.cancel()
        self._channel.close()

    def run(self) -> None:
        """The thread's loop: read the stream, and open it again after a backoff, until stopped."""
        backoff = FIRST_BACKOFF
        while not self._stop.is_set():
            try:
                rpc = self._fetch(workload_pb2.X509SVIDRequest(), metadata=(HEADER,))
                with self._lock:
                    self._rpc = rpc
                if self._stop.is_set():  # stopped before the stream was recorded
                    rpc.cancel()
                    return
                for response in rpc:
                    if self._take(response):
                        backoff = FIRST_BACKOFF
                why = "the agent ended the stream"
            except ValueError:  # gRPC's word for a closed channel: stop() ran since the loop's check
                if self._stop.is_set():
                    return
                raise
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                why = f"{exc.code().name}: {exc.details()}"
            self._failed(why)
            # Jittered, so that the workloads of a node do not all call a restarted agent at once.
            self._stop.wait(random.uniform(backoff / 2, backoff))  # noqa: S311 - not for security
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _take(self, response: workload_pb2.X509SVIDResponse) -> bool:
        """Use the response's default SVID if it is good; else log why not and keep the one in use."""
        try:
            svid = self._parse(response)
        except (PySpiffeError, ValueError) as exc:
            self._failed(f"an update was not used: {exc}")
            return False
        previous = self.svid
        if previous is not None and previous.material == svid.material:
            # The same bytes again (the agent re-sends on reconnection): keep the object, so no channel is replaced.
            svid = previous
            if self.error is not None:
                _log.info("SPIFFE Workload API at %s answers again; the certificate in use stays", self._endpoint)
        elif previous is None or previous.serial != svid.serial:
            _log.info(
                "client certificate from the Workload API: %s, serial %x; new connections present it",
                svid.spiffe_id,
                svid.serial,
            )
        else:
            _log.info("the Workload API changed the trust bundle; new connections trust the new one")
        self.svid = svid
        self.error = None
        self.first.set()
        return True

    def _parse(self, response: workload_pb2.X509SVIDResponse) -> _Svid:
        if not response.svids:
            raise ValueError("the response holds no X509-SVID")
        first = response.svids[0]  # the default SVID, as the standard says
        svid = X509Svid.parse_raw(first.x509_svid, first.x509_svid_key)
        key_der = svid.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if key_der != svid.leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ValueError("the X509-SVID's key does not match its certificate")
        # No key_pem: gRPC gets the key re-encoded by cryptography, whatever the agent sent (an RSA-PSS key as
        # plain RSA), so only the certificate can make it RSA-PSS.
        unusable = unusable_key(svid.private_key, svid.leaf)
        if unusable:
            raise ValueError(f"the X509-SVID {svid.spiffe_id} has {unusable}; {CLIENT_KEYS}")
        expires = svid.leaf.not_valid_after_utc
        if expires.timestamp() <= time.time():
            # Every handshake with it would fail; the one in use, if any, is no worse. (A not-yet-valid one is
            # used: this host's clock may be behind the agent's and the server's.)
            raise ValueError(f"the X509-SVID {svid.spiffe_id} expired at {expires:%Y-%m-%dT%H:%M:%SZ}")
        own = svid.spiffe_id.trust_domain
        wanted = TrustDomain(self._server_trust_domain) if self._server_trust_domain else own
        federated = {TrustDomain(td): der for td, der in response.federated_bundles.items()}
        if own in federated:
            # It would silently replace the own bundle, the CAs the server of our own trust domain is trusted by.
            raise ValueError(f"a federated bundle is for this workload's own trust domain {own.name}")
        bundles = {own: first.bundle} | federated
        if wanted not in bundles:
            raise ValueError(
                f"no bundle for the trust domain {wanted.name} of the expected server SPIFFE ID: the agent's "
                "bundles are for " + ", ".join(sorted(td.name for td in bundles))
            )
        anchors = X509Bundle.parse_raw(wanted, bundles[wanted]).x509_authorities
        if not anchors:
            raise ValueError(f"the bundle of {wanted.name} holds no CA certificate")
        material = TlsMaterial(
            # A set: sorted, so that the same bundle sent again gives the same bytes.
            ca_pem=_pem(sorted(anchors, key=lambda c: c.public_bytes(serialization.Encoding.DER))),
            cert_pem=_pem(svid.cert_chain),
            key_pem=svid.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        return _Svid(material, str(svid.spiffe_id), svid.leaf.serial_number, expires.timestamp())

    def _failed(self, why: str) -> None:
        # Once per distinct error: an agent away for an hour writes one line, not one per retry.
        if why != self.error:
            svid = self.svid
            expired = svid is not None and svid.expires <= time.time()
            _log.warning(
                "SPIFFE Workload API at %s: %s; %s",
                self._endpoint,
                why,
                "no certificate yet"
                if svid is None
                else f"the certificate in use has EXPIRED ({svid.spiffe_id})"
                if expired
                else f"the certificate in use stays ({svid.spiffe_id}, serial {svid.serial:x})",
            )
        self.error = why


def _pem(certificates: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)
