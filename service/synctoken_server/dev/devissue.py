"""`synctoken dev issue`: more certificates from the dev CA (or a new CA), to try other callers and rotations.

Never for production, like the dev CA itself (see pki): keys are written
unencrypted and the CA signs whatever it is asked to.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from synctoken_server.authn.callercert import is_dns_name, parse_spiffe_id
from synctoken_server.dev import files
from synctoken_server.dev.devenv import CA_FILE, CA_KEY, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY
from synctoken_server.dev.pki import CertificateAuthority, KeyPair, LeafSpec

LIFETIME = dt.timedelta(days=30)
"""As long as the dev certificates, but never past the signing CA's own expiry."""


class IssueError(Exception):
    """What was asked cannot be issued; the message says what to change."""


class Kind(enum.Enum):
    """What to issue, and the names of the two files it is written as (the dev folder's names)."""

    CLIENT = (CLIENT_CERT, CLIENT_KEY)
    SERVER = (SERVER_CERT, SERVER_KEY)
    CA = (CA_FILE, CA_KEY)


@dataclass(frozen=True)
class Wanted:
    """A certificate as the command line describes it."""

    kind: Kind
    spiffe_id: str | None = None
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class IssuedCertificate:
    """What `issue` wrote: the certificate, its key (mode 0600), and which of them replaced a file."""

    cert: Path
    key: Path
    serial: str
    not_after: dt.datetime
    replaced: tuple[Path, ...]


def issue(wanted: Wanted, ca_dir: Path, out: Path, *, force: bool = False) -> IssuedCertificate:
    """Make what `wanted` describes, signed by the CA in `ca_dir` (a new self-signed CA for Kind.CA), into `out`."""
    spec = leaf_spec(wanted)  # names first: a typo is reported before anything is read or made
    cert_path, key_path = (out / name for name in wanted.kind.value)
    existing = tuple(path for path in (cert_path, key_path) if path.exists())
    if existing and not force:
        msg = f"{existing[0]} exists: choose another --out, or add --force to replace it"
        raise IssueError(msg)
    if spec is None:
        ca = CertificateAuthority(f"synctoken dev CA {secrets.token_hex(4)}")  # distinct names: both sit in one bundle
        pair = KeyPair(ca.cert_pem, ca.key_pem)
    else:
        signer = load_ca(ca_dir)
        not_after = min(dt.datetime.now(dt.UTC) + LIFETIME, signer.not_after)
        pair = signer.issue(dataclasses.replace(spec, not_after=not_after))
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The key first: a client or server watching these files waits for a matching pair.
        files.put(key_path, pair.key_pem, 0o600, replace=force)
        files.put(cert_path, pair.cert_pem, 0o644, replace=force)
    except FileExistsError as exc:  # made between the check above and now
        msg = f"{exc.filename} exists: choose another --out, or add --force to replace it"
        raise IssueError(msg) from None
    except OSError as exc:
        msg = f"cannot write {exc.filename or out}: {exc.strerror}"
        raise IssueError(msg) from None
    certificate = x509.load_pem_x509_certificate(pair.cert_pem)
    return IssuedCertificate(
        cert_path, key_path, f"{certificate.serial_number:X}", certificate.not_valid_after_utc, existing
    )


def leaf_spec(wanted: Wanted) -> LeafSpec | None:
    """The leaf `wanted` describes (None for a CA), or IssueError naming the flag that is wrong."""
    _check_names(wanted)
    named = wanted.spiffe_id is not None or wanted.dns_names or wanted.ip_addresses
    if wanted.kind is Kind.CA:
        if named:
            raise IssueError("--ca makes a CA, which names no workload: drop --spiffe-id, --dns-name and --ip")
        return None
    if wanted.kind is Kind.SERVER:
        if wanted.spiffe_id is not None:
            raise IssueError("--server takes --dns-name and --ip, the names clients connect to, not --spiffe-id")
        if not wanted.dns_names and not wanted.ip_addresses:
            raise IssueError("--server needs --dns-name (or --ip): the names clients connect to")
        return LeafSpec(
            "synctoken dev server", dns_names=wanted.dns_names, ip_addresses=wanted.ip_addresses, server=True
        )
    if wanted.ip_addresses:
        raise IssueError("--ip is for --server: a client is named by --spiffe-id or --dns-name")
    if len(wanted.dns_names) > 1:
        # With identity.source = "dns_san" the server refuses a certificate with several.
        raise IssueError("a client certificate takes one --dns-name: the server reads exactly one")
    if not named:
        msg = "say what to issue: --spiffe-id ID or --dns-name NAME (a client), --server --dns-name NAME, or --ca"
        raise IssueError(msg)
    uris = () if wanted.spiffe_id is None else (wanted.spiffe_id,)
    return LeafSpec("synctoken dev client", dns_names=wanted.dns_names, uris=uris)


def _check_names(wanted: Wanted) -> None:
    # Each in the grammar the server reads it with, so that what is issued is what it accepts.
    if wanted.spiffe_id is not None:
        try:
            spiffe_id = parse_spiffe_id(wanted.spiffe_id)
        except ValueError as exc:
            msg = f"--spiffe-id: {exc}"
            raise IssueError(msg) from None
        if not spiffe_id.path:
            msg = f"--spiffe-id {wanted.spiffe_id!r} names a trust domain, not a workload (it has no path)"
            raise IssueError(msg)
    for name in wanted.dns_names:
        if not is_dns_name(name):
            msg = f"--dns-name {name!r} is not a lower-case DNS host name (e.g. svc.internal)"
            raise IssueError(msg)
    for address in wanted.ip_addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            msg = f"--ip {address!r} is not an IP address"
            raise IssueError(msg) from None


def load_ca(ca_dir: Path) -> CertificateAuthority:
    """The CA kept in `ca_dir` (ca.pem and ca-key.pem, as `synctoken dev` and `issue --ca` write them)."""
    cert_path, key_path = ca_dir / CA_FILE, ca_dir / CA_KEY
    if not cert_path.exists():
        msg = (
            f"no CA in {ca_dir}: {cert_path} does not exist. Run `synctoken dev` once to make the dev CA there, "
            "or give --ca-dir a folder that `synctoken dev issue --ca` wrote"
        )
        raise IssueError(msg)
    if not key_path.exists():
        msg = (
            f"{ca_dir} has {CA_FILE} but not the CA's key, {CA_KEY}: it was made before `synctoken dev` kept it. "
            "Run `synctoken dev` once to remake the dev PKI"
        )
        raise IssueError(msg)
    try:
        ca = CertificateAuthority.load(cert_path.read_bytes(), key_path.read_bytes())
    except OSError as exc:
        msg = f"cannot read the CA in {ca_dir}: {exc.filename}: {exc.strerror}"
        raise IssueError(msg) from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # cryptography's messages name the problem, never the key's bytes.
        msg = f"cannot use the CA in {ca_dir} ({CA_FILE}, {CA_KEY}): {exc}"
        raise IssueError(msg) from None
    if ca.not_after <= dt.datetime.now(dt.UTC):
        msg = f"the CA in {ca_dir} expired at {ca.not_after:%Y-%m-%d %H:%M} UTC: run `synctoken dev` to renew it"
        raise IssueError(msg)
    return ca
