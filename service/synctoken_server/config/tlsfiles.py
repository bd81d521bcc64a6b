"""The server's TLS files (certificate chain, key, client CA bundle): checked as one set before gRPC sees them.

The same checks run at start-up (through the config loader) and whenever the
files change under a running server, so a set that could not start a server
never replaces one that works: a key that does not match the certificate, a
half-written PEM file, a certificate outside its validity period.
"""

from __future__ import annotations

import datetime as dt
import re
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from synctoken.tlskeys import USABLE_KEYS, unusable_key
from synctoken_server.authn.svid import TrustAnchors
from synctoken_server.durations import format_utc
from synctoken_server.filestamps import Stamps

CERT_KEY = "tls.cert_file"
KEY_KEY = "tls.key_file"
CA_KEY = "tls.client_ca_file"

# What gRPC's TLS can present is one rule for the server and its clients (synctoken.tlskeys).
SERVER_KEYS = f"gRPC serves {USABLE_KEYS}"
# Certificate blocks only: a chain file may also hold the key, which the count must not include.
_CERTIFICATE_BEGIN = re.compile(rb"-----BEGIN (?:X509 )?CERTIFICATE-----")


class TlsFileError(Exception):
    """A TLS file is unusable: `key` is its config key, `problem` says why (never the file's bytes)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class ServerTlsFiles:
    """Where the server's certificate chain, its key and the client CA bundle are."""

    cert: Path
    key: Path
    client_ca: Path

    def paths(self) -> tuple[Path, Path, Path]:
        """The three paths, in a fixed order."""
        return (self.cert, self.key, self.client_ca)


@dataclass(frozen=True)
class ServerTlsMaterial:
    """A checked set: the server's chain and key, the CAs client certificates must chain to, and their origin."""

    files: ServerTlsFiles | None
    """Where the set was read; None: the SPIFFE Workload API sent it (process/workloadcerts.py)."""
    stamps: Stamps
    """The files' stamps, taken before they were read (none for the Workload API's)."""
    cert_chain_pem: bytes = field(repr=False)
    private_key_pem: bytes = field(repr=False)
    client_ca_pem: bytes = field(repr=False)
    serial: str
    """The server certificate's serial number, in hex, as `openssl x509 -serial` prints it."""
    not_after: dt.datetime
    lifetime: dt.timedelta
    client_cas: int
    anchors: TrustAnchors
    """The client CAs as the caller-id check needs them (their path length is enforced there)."""

    def same_contents(self, other: ServerTlsMaterial) -> bool:
        """True if `other` holds the same bytes (wherever they came from)."""
        return (self.cert_chain_pem, self.private_key_pem, self.client_ca_pem) == (
            other.cert_chain_pem,
            other.private_key_pem,
            other.client_ca_pem,
        )


def read(files: ServerTlsFiles, stamps: Stamps, now: dt.datetime) -> ServerTlsMaterial:
    """Read and check the three files, stamped just before; raise TlsFileError naming the first that is unusable."""
    contents = []
    for key, path in zip((CERT_KEY, KEY_KEY, CA_KEY), files.paths(), strict=True):
        try:
            contents.append(path.read_bytes())
        except OSError as exc:
            raise TlsFileError(key, f"cannot read {path}: {exc.strerror}") from None
    return check(files, stamps, *contents, now=now)


def check(
    files: ServerTlsFiles | None, stamps: Stamps, cert_pem: bytes, key_pem: bytes, ca_pem: bytes, *, now: dt.datetime
) -> ServerTlsMaterial:
    """Check one set of TLS file contents as a whole; raise TlsFileError naming the file at fault."""
    chain = _certificates(CERT_KEY, cert_pem)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except UnsupportedAlgorithm:
        raise TlsFileError(KEY_KEY, f"is a kind of key that cannot be used; {SERVER_KEYS}") from None
    except (ValueError, TypeError):
        raise TlsFileError(KEY_KEY, "is not an unencrypted PEM private key") from None
    unusable = unusable_key(key, chain[0], key_pem)
    if unusable:
        raise TlsFileError(KEY_KEY, f"holds {unusable}; {SERVER_KEYS}")
    try:
        matches = key.public_key() == chain[0].public_key()
    except UnsupportedAlgorithm:
        raise TlsFileError(CERT_KEY, f"has a kind of public key that cannot be used; {SERVER_KEYS}") from None
    if not matches:
        raise TlsFileError(KEY_KEY, f"does not match the first certificate in {CERT_KEY}")
    leaf = chain[0]
    if now < leaf.not_valid_before_utc:
        raise TlsFileError(CERT_KEY, f"is not valid until {format_utc(leaf.not_valid_before_utc)}")
    if now >= leaf.not_valid_after_utc:
        raise TlsFileError(CERT_KEY, f"expired at {format_utc(leaf.not_valid_after_utc)}")
    cas = _certificates(CA_KEY, ca_pem)
    try:
        anchors = TrustAnchors.of(cas)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise TlsFileError(CA_KEY, "holds a certificate whose extensions cannot be decoded") from None
    return ServerTlsMaterial(
        files=files,
        stamps=stamps,
        cert_chain_pem=cert_pem,
        private_key_pem=key_pem,
        client_ca_pem=ca_pem,
        serial=f"{leaf.serial_number:X}",
        not_after=leaf.not_valid_after_utc,
        lifetime=leaf.not_valid_after_utc - leaf.not_valid_before_utc,
        client_cas=len(cas),
        anchors=anchors,
    )


def grpc_can_serve(material: ServerTlsMaterial) -> bool:
    """Whether gRPC itself accepts the set: bind a throwaway server on a loopback port with it.

    The checks above know what BoringSSL refuses today (synctoken.tlskeys:
    Ed448, DSA, RSA-PSS, ...); this asks BoringSSL, for what they do not know
    (whatever a later gRPC refuses), so that such a set is a config error
    rather than a server that cannot listen.
    """
    executor = futures.ThreadPoolExecutor(max_workers=1)
    server = grpc.server(executor, options=[("grpc.so_reuseport", 0)])
    credentials = grpc.ssl_server_credentials(
        [(material.private_key_pem, material.cert_chain_pem)],
        root_certificates=material.client_ca_pem,
        require_client_auth=True,
    )
    try:
        server.add_secure_port("127.0.0.1:0", credentials)
    except RuntimeError:
        return False
    finally:
        server.stop(None)
        executor.shutdown(wait=False)
    return True


def _certificates(key: str, pem: bytes) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise TlsFileError(key, "is not a PEM certificate") from None
    # cryptography skips a last block that lacks its END line, which is what a
    # file caught half-written looks like: count the blocks it began.
    if len(certificates) != len(_CERTIFICATE_BEGIN.findall(pem)):
        raise TlsFileError(key, "holds a PEM block that does not parse (a file caught half-written?)")
    return certificates
