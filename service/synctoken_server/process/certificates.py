"""The server certificate and client CA bundle in use, swapped for new files as they appear: gRPC's fetcher.

gRPC asks `fetch` for a new certificate configuration once per new
connection, before its handshake, on one of its own threads (never the
event loop's; measured: one call per connection, none per RPC). Connections
already made keep the configuration they were made with. So `fetch` must be
cheap: it stats the three files and re-reads them only when a stamp moved.
A new set is checked as a whole (tlsfiles.check) before gRPC sees it; a bad
one is logged as `tls.reload_failed` and the current one kept, and it is
tried again only when the files change again.

With `[tls] source = "spiffe"` there are no files: the Workload API's
stream (workloadcerts.py) hands each new set to `offer`, and `fetch` hands
it to gRPC on the next connection, as it would a new set of files.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable

import grpc
import structlog

from synctoken_server.config import tlsfiles
from synctoken_server.config.tlsfiles import ServerTlsMaterial, TlsFileError
from synctoken_server.durations import format_utc
from synctoken_server.filestamps import restamp

_log = structlog.get_logger("synctoken.tls")

Clock = Callable[[], dt.datetime]


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ServerCertificates:
    """The checked TLS material gRPC serves; the files are watched for a newer set."""

    def __init__(self, material: ServerTlsMaterial, expiry_warning: int | None, clock: Clock = _utc_now) -> None:
        # gRPC calls fetch on its own threads, the event loop calls refresh:
        # one lock keeps a check of the files and the swap that follows together.
        self._lock = threading.Lock()
        self._clock = clock
        self._current = material
        self._seen = material.stamps
        """The stamps last acted on, good set or bad: a bad set is not read again until they move."""
        self._handed = material
        """What gRPC has: `fetch` hands over `_current` when it is something else."""
        self._expiry_warning = expiry_warning
        self._warned: ServerTlsMaterial | None = None

    @property
    def current(self) -> ServerTlsMaterial:
        """The material new connections get."""
        return self._current

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials for gRPC that require a client certificate and ask `fetch` for newer material."""
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self._current),
            # types-grpcio leaves out the None that gRPC documents (and we use) for "keep the current one".
            self._fetch,  # type: ignore[arg-type]
            require_client_authentication=True,
        )

    def announce(self) -> None:
        """Log the certificate in use and its expiry, and warn if it is within the margin (at start-up)."""
        material = self._current
        _log.info("tls.loaded", **_describe(material, self._clock()))
        self.check_expiry(force=True)

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the files if their stamps moved (or if `force`), and use the new set if it checks out."""
        with self._lock:
            files = self._current.files
            if files is None:  # the Workload API's: it pushes new sets to `offer`
                return
            stamps = restamp(files.paths())
            if stamps == self._seen and not force:
                return
            # Remembered good or bad, so that the next connection does not read (or log) the same files again.
            self._seen = stamps
            try:
                material = tlsfiles.read(files, stamps, self._clock())
            except TlsFileError as exc:
                # A warning: one file at a time, a rotation passes through such a set on its way.
                _log.warning("tls.reload_failed", key=exc.key, reason=exc.problem)
                return
            if material.same_contents(self._current):
                return
            self._current = material
        _log.info("tls.reloaded", **_describe(material, self._clock()))
        self.check_expiry(force=True)

    def offer(self, material: ServerTlsMaterial) -> bool:
        """A checked set from the Workload API: new connections get it, unless it is the one in use; True if new."""
        with self._lock:
            if material.same_contents(self._current):
                return False
            self._current = material
        _log.info("tls.reloaded", **_describe(material, self._clock()))
        self.check_expiry(force=True)
        return True

    def expired(self) -> bool:
        """Whether the certificate in use has expired (every new handshake fails, and health says so)."""
        return self._clock() >= self._current.not_after

    def use(self, material: ServerTlsMaterial | None, expiry_warning: int | None) -> None:
        """After a config reload: take its material if the files are other files, and its expiry margin.

        None: the reloaded config's certificates come from the Workload API, whose stream hands them over.
        """
        with self._lock:
            self._expiry_warning = expiry_warning
            if material is None or material.files == self._current.files:
                # Same files: whatever `refresh` read last is at least as new as what the loader read.
                return
            self._current = material
            self._seen = material.stamps
        _log.info("tls.reloaded", **_describe(material, self._clock()))
        self.check_expiry(force=True)

    def check_expiry(self, *, force: bool = False) -> None:
        """Warn if the certificate is within its margin of expiry: on `force`, or once when it enters it."""
        material = self._current
        now = self._clock()
        margin = (
            dt.timedelta(seconds=self._expiry_warning) if self._expiry_warning is not None else material.lifetime / 3
        )
        if material.not_after - now >= margin or (material is self._warned and not force):
            return
        self._warned = material
        _log.warning("tls.expiring_soon", margin_s=int(margin.total_seconds()), **_describe(material, now))

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # gRPC keeps its current configuration on None, and also (logging on
        # stderr) when this raises; nothing here should, but a bug must not
        # turn into a failed handshake.
        try:
            self.refresh()
            with self._lock:
                if self._current is self._handed:
                    return None
                self._handed = self._current
                return _configuration(self._current)
        except Exception:  # noqa: BLE001 - see above: keep serving on the current set, and say why in the log
            _log.exception("tls.fetch_failed")
            return None


def _configuration(material: ServerTlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.private_key_pem, material.cert_chain_pem)], root_certificates=material.client_ca_pem
    )


def _describe(material: ServerTlsMaterial, now: dt.datetime) -> dict[str, object]:
    return {
        "cert_file": str(material.files.cert) if material.files is not None else None,
        "source": "files" if material.files is not None else "spiffe",
        "serial": material.serial,
        "not_after": format_utc(material.not_after),
        "expires_in_s": int((material.not_after - now).total_seconds()),
        "client_cas": material.client_cas,
    }
