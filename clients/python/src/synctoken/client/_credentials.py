"""The client's certificate files: loaded whole and checked, then watched for rotation.

cert-manager's CSI driver, spiffe-helper and Vault agent replace the files in
place or by rename, often hourly. `CertificateFiles.poll` notices a change
cheaply (one stat per file, at most every `check_interval` seconds) and returns
a new pair only when it loads and its key matches its certificate; a pair caught
half-written is logged and skipped, and the one in use stays in use.

The key's kind is judged by cryptography, with the server's rule
(synctoken.tlskeys: what gRPC can present). The pair is matched by the
standard library's `ssl`, which is OpenSSL: its `SSLContext.load_cert_chain`
refuses a key that does not match its certificate, and says when a key is
encrypted. It reads paths, not bytes, so the files are read before and after
it and the pair is used only if both reads agree: the bytes handed to gRPC are
the bytes that were checked.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from synctoken.tlskeys import USABLE_KEYS, unusable_key

_log = logging.getLogger("synctoken.client")

CLIENT_KEYS = f"a client presents {USABLE_KEYS}"

DEFAULT_CHECK_INTERVAL = 1.0
"""Seconds between looks at the files: three stat calls, on a call that comes after it."""


class CertificateFilesError(ValueError):
    """The CA, certificate or key file cannot be used; the message says which and why, never their contents."""


class WorkloadApiTimeoutError(TimeoutError):
    """No usable X509-SVID came from the SPIFFE Workload API within the first wait; the message says what was seen."""


class MissingExtraError(ImportError):
    """from_spiffe without py-spiffe installed: the message names the extra that brings it."""


@dataclass(frozen=True)
class TlsFiles:
    """Where the client's trust anchors, certificate chain and private key are."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def paths(self) -> tuple[Path, Path, Path]:
        """The three paths, CA first."""
        return self.ca_file, self.cert_file, self.key_file


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes of one checked set of files; the key never appears in a repr."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials that trust the CA and present this certificate."""
        return grpc.ssl_channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)


def load(files: TlsFiles) -> TlsMaterial:
    """Read and check the three files; raise CertificateFilesError saying what is wrong."""
    material = _read(files)
    _check_certificates(files.ca_file, material.ca_pem)
    _check_certificates(files.cert_file, material.cert_pem)
    # First: gRPC's limits are what the message should say, where OpenSSL would only say it refuses the pair.
    _check_key_kind(files, material)
    _check_pair(files)
    # load_cert_chain read the files again, by path: they must not have changed since our read.
    if _read(files) != material:
        raise CertificateFilesError("the files changed while they were being checked")
    return material


class TlsSource(Protocol):
    """Where a client's TLS material comes from: certificate files, or the SPIFFE Workload API (_workload)."""

    @property
    def current(self) -> TlsMaterial:
        """The material new channels use; a new object when it changed."""
        ...

    def due(self) -> bool:
        """Whether `poll` would look for new material now."""
        ...

    def poll(self) -> TlsMaterial | None:
        """Look for new material (see `current`); may do I/O."""
        ...

    def close(self) -> None:
        """Stop watching for new material."""
        ...


# A file's identity and version, cheap to take: inode (a rename or a symlink swap
# changes it), size, and modification and change times in nanoseconds.
_Stamp = tuple[tuple[int, int, int, int, int], ...]


def _stamp(files: TlsFiles) -> _Stamp:
    stats = [path.stat() for path in files.paths()]  # follows symlinks, as Kubernetes volumes use them
    return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for s in stats)


class CertificateFiles:
    """The material in use, and the files it came from, checked for changes on demand.

    Thread-safe: a poll already running in another thread makes a concurrent
    poll return at once, with nothing new.
    """

    def __init__(
        self,
        files: TlsFiles,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.files = files
        self._interval = check_interval
        self._monotonic = monotonic
        self._lock = threading.Lock()
        stamp = _stamp_or_raise(files)
        self.current = load(files)
        self._stamp: _Stamp | None = stamp
        self._next_check = monotonic() + check_interval
        self._refused: tuple[_Stamp | None, str] | None = None

    def due(self) -> bool:
        """Whether a poll would look at the files now: one clock read, no lock."""
        return self._monotonic() >= self._next_check

    def poll(self) -> TlsMaterial | None:
        """New material if the files changed and the new set checks out; else None, the current one staying."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if not self.due():
                return None
            self._next_check = self._monotonic() + self._interval
            return self._look()
        finally:
            self._lock.release()

    def close(self) -> None:
        """Nothing to stop: the files are looked at only on calls."""

    def _look(self) -> TlsMaterial | None:
        try:
            stamp: _Stamp | None = _stamp(self.files)
        except OSError as exc:
            # Mid-swap, a file may be missing for a moment.
            self._refuse(None, f"cannot stat a file: {exc.strerror}: {exc.filename}")
            return None
        # After a refusal, look again even if the stamps did not move: a
        # rewrite within one timestamp tick at the same size leaves no trace.
        if stamp == self._stamp and self._refused is None:
            return None
        try:
            material = load(self.files)
        except CertificateFilesError as exc:
            self._refuse(stamp, str(exc))
            return None
        self._stamp, self._refused = stamp, None
        if material == self.current:
            return None
        self.current = material
        _log.info("client certificate files changed; new connections present the new certificate")
        return material

    def _refuse(self, stamp: _Stamp | None, why: str) -> None:
        # Once per distinct state of the files, not once per poll.
        if self._refused != (stamp, why):
            _log.warning(
                "client certificate files %s and %s not used; the certificate in use stays: %s",
                self.files.cert_file,
                self.files.key_file,
                why,
            )
        self._refused = (stamp, why)


def _stamp_or_raise(files: TlsFiles) -> _Stamp:
    try:
        return _stamp(files)
    except OSError as exc:
        raise CertificateFilesError(f"cannot read {exc.filename}: {exc.strerror}") from None


def _read(files: TlsFiles) -> TlsMaterial:
    try:
        return TlsMaterial(*(path.read_bytes() for path in files.paths()))
    except OSError as exc:
        raise CertificateFilesError(f"cannot read {exc.filename}: {exc.strerror}") from None


def _check_certificates(path: Path, pem: bytes) -> None:
    # Loaded as trust anchors only to see that every certificate in the file parses.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, ValueError):  # UnicodeDecodeError is a ValueError
        raise CertificateFilesError(f"{path} holds no whole PEM certificate") from None


class _EncryptedKeyError(Exception):
    """The key file wants a password; gRPC cannot use an encrypted key."""


def _no_password() -> bytes:
    # Without a callback, OpenSSL would prompt on the terminal.
    raise _EncryptedKeyError


def _check_pair(files: TlsFiles) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(files.cert_file, files.key_file, password=_no_password)
    except _EncryptedKeyError:
        raise CertificateFilesError(f"{files.key_file} is encrypted; gRPC needs an unencrypted key") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CertificateFilesError(
                f"the key in {files.key_file} does not match the certificate in {files.cert_file}"
            ) from None
        raise CertificateFilesError(f"{files.key_file} holds no whole PEM private key") from None
    except OSError as exc:
        raise CertificateFilesError(f"cannot read {exc.filename}: {exc.strerror}") from None


def _check_key_kind(files: TlsFiles, material: TlsMaterial) -> None:
    # The first certificate is the client's own. What cryptography cannot load (an encrypted or broken key, a
    # certificate that is not PEM) is left to _check_pair and _check_certificates, whose messages say so.
    try:
        certificate = x509.load_pem_x509_certificates(material.cert_pem)[0]
        key = serialization.load_pem_private_key(material.key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return
    problem = unusable_key(key, certificate, material.key_pem)
    if problem:
        raise CertificateFilesError(f"{files.key_file} holds {problem}; {CLIENT_KEYS}")
