"""Who the caller is, read from its verified TLS client certificate and nothing else.

gRPC's own `peer_spiffe_id` and `peer_dns` properties are C strings, cut short
at a NUL byte inside a SAN, so the id is read from the certificate itself
(`x509_pem_cert`) with cryptography, and must be written exactly as the SPIFFE
ID grammar (or DNS) allows: neither `spiffe://td/admin` followed by a NUL and
more, nor `spiffe://TD/admin`, is `spiffe://td/admin`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from spiffe import SpiffeId, TrustDomain
from spiffe.errors import PySpiffeError

from synctoken_server.authn import svid
from synctoken_server.errors import CallerUnauthenticated

SPIFFE_ID_FORM = (
    "spiffe://<trust domain>/<path>, the trust domain in a-z 0-9 . - _, "
    "path segments in A-Z a-z 0-9 . - _ and none empty, '.' or '..'"
)
TRUST_DOMAIN_FORM = "a-z 0-9 . - _ only, with no scheme, port or path"

NO_CERTIFICATE = "gRPC passed on no client certificate"
NOT_ONE_URI_SAN = "it must have exactly one URI SAN, a SPIFFE ID"
NOT_A_SPIFFE_ID = "its URI SAN is not a SPIFFE ID"
NO_WORKLOAD_PATH = "its SPIFFE ID names a trust domain, not a workload (it has no path)"
NOT_ONE_DNS_SAN = "it must have exactly one DNS SAN"
NOT_A_DNS_NAME = "its DNS SAN is not a lower-case host name"

_DNS_NAME = re.compile(r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")

# Distinct client certificates are few and each connection reuses one, so
# each is parsed once; the bound keeps a stream of new ones from growing it.
CERTIFICATE_CACHE_SIZE = 1024


class CallerIdSource(enum.Enum):
    """Which part of the client certificate names the caller."""

    SPIFFE = "spiffe"
    DNS_SAN = "dns_san"


def parse_spiffe_id(text: str) -> SpiffeId:
    """The SPIFFE ID `text` is, if it is one written canonically; else ValueError.

    The trust domain ID (no path) passes: callers of this decide whether they
    need a workload.
    """
    try:
        spiffe_id = SpiffeId(text)
    except PySpiffeError:
        raise ValueError(f"{text!r} is not a SPIFFE ID ({SPIFFE_ID_FORM})") from None
    # The spiffe package lower-cases the scheme and trust domain it reads, and
    # its character checks end in `$`, which also matches before a final
    # newline: only an id that prints back exactly, newline-free, is valid.
    if str(spiffe_id) != text or "\n" in text:
        raise ValueError(f"{text!r} is not a SPIFFE ID ({SPIFFE_ID_FORM})")
    return spiffe_id


def workload_id(uri: str, not_spiffe: str, no_path: str) -> SpiffeId:
    """The SPIFFE ID `uri` is, if it names a workload; else ValueError saying `not_spiffe` or `no_path`.

    The one check of a caller's SPIFFE ID, from a certificate's URI SAN or a
    forwarded header's URI; each words the two failures for where it read it.
    """
    try:
        spiffe_id = parse_spiffe_id(uri)
    except ValueError:
        raise ValueError(not_spiffe) from None
    if not spiffe_id.path:
        raise ValueError(no_path)
    return spiffe_id


def parse_trust_domain(text: str) -> TrustDomain:
    """The trust domain named by `text`, if it is a bare lower-case trust domain name; else ValueError."""
    try:
        trust_domain = TrustDomain(text)
    except PySpiffeError:
        raise ValueError(f"{text!r} is not a trust domain name ({TRUST_DOMAIN_FORM})") from None
    # TrustDomain also takes "TD" (as td) and a whole SPIFFE ID (as its trust
    # domain); neither is what a config entry should say.
    if trust_domain.name != text or "\n" in text:
        raise ValueError(f"{text!r} is not a trust domain name ({TRUST_DOMAIN_FORM})")
    return trust_domain


def is_dns_name(text: str) -> bool:
    """True for a lower-case DNS host name such as billing.internal.example.com."""
    return _DNS_NAME.fullmatch(text) is not None


@dataclass(frozen=True)
class NamedCaller:
    """A client certificate that names a caller: its id, its trust domain in spiffe mode ("" otherwise).

    `issuers` are the other certificates the client presented (DER), for the path length check.
    """

    caller_id: str
    trust_domain: str
    # What the certificate came with, checked per call; not part of who the caller is.
    issuers: frozenset[bytes] = dataclasses.field(default=frozenset(), compare=False)
    valid_from: float = dataclasses.field(default=float("-inf"), compare=False)
    valid_until: float = dataclasses.field(default=float("inf"), compare=False)


@dataclass(frozen=True)
class UnnamedCaller:
    """A client certificate that names no caller: why not, and the SANs it offered, as received."""

    why: str
    presented_sans: tuple[str, ...]


@functools.lru_cache(maxsize=CERTIFICATE_CACHE_SIZE)
def read_caller(source: CallerIdSource, leaf_pem: bytes, chain_pem: bytes) -> NamedCaller | UnnamedCaller:
    """Who a verified client certificate names, by the X509-SVID rules and `source`'s grammar.

    `chain_pem` is the rest of the chain the client presented (may be empty).
    Pure, so it is cached; the outcome is returned, never raised, so that no
    exception object (and its traceback) is kept alive by the cache.
    """
    try:
        presented = svid.read_presented(leaf_pem, chain_pem)
    except ValueError:
        return UnnamedCaller(svid.NOT_DECODABLE, ())
    sans = presented.uris if source is CallerIdSource.SPIFFE else presented.dns_names
    if presented.defect is not None:
        return UnnamedCaller(presented.defect, sans)
    reading = _spiffe_caller(sans) if source is CallerIdSource.SPIFFE else _dns_caller(sans)
    if isinstance(reading, UnnamedCaller):
        return reading
    return dataclasses.replace(
        reading, issuers=presented.issuers, valid_from=presented.valid_from, valid_until=presented.valid_until
    )


def _spiffe_caller(uris: tuple[str, ...]) -> NamedCaller | UnnamedCaller:
    # A certificate naming two workloads is refused rather than guessed at;
    # DNS SANs beside the one URI SAN are fine (sidecars often add them).
    if len(uris) != 1:
        return UnnamedCaller(NOT_ONE_URI_SAN, uris)
    try:
        spiffe_id = workload_id(uris[0], NOT_A_SPIFFE_ID, NO_WORKLOAD_PATH)
    except ValueError as exc:
        return UnnamedCaller(str(exc), uris)
    return NamedCaller(uris[0], spiffe_id.trust_domain.name)


def _dns_caller(dns_names: tuple[str, ...]) -> NamedCaller | UnnamedCaller:
    # URI SANs are not looked at: many ordinary certificates carry them.
    if len(dns_names) != 1:
        return UnnamedCaller(NOT_ONE_DNS_SAN, dns_names)
    if not is_dns_name(dns_names[0]):
        return UnnamedCaller(NOT_A_DNS_NAME, dns_names)
    return NamedCaller(dns_names[0], "")


@dataclass(frozen=True)
class CallerCertRules:
    """How to turn a verified client certificate into a caller id."""

    source: CallerIdSource
    trust_domains: frozenset[str]
    anchors: Callable[[], svid.TrustAnchors] | None = None
    """The CAs of client_ca_file in force, whose path length is enforced; None: no limit."""

    def caller_id(self, auth_context: Mapping[str, Sequence[bytes]]) -> str:
        """The caller id of a TLS peer; raise CallerUnauthenticated if it has none we accept.

        `auth_context` is gRPC's view of the verified peer: `x509_pem_cert` is
        its leaf, and `x509_pem_cert_chain` (absent when the client sent only
        its leaf) the rest of the chain it presented.
        """
        leaf = auth_context.get("x509_pem_cert", ())
        if len(leaf) != 1:
            raise CallerUnauthenticated(NO_CERTIFICATE)
        chain = b"".join(auth_context.get("x509_pem_cert_chain", ()))
        reading = read_caller(self.source, leaf[0], chain)
        if isinstance(reading, UnnamedCaller):
            raise CallerUnauthenticated(reading.why, reading.presented_sans)
        # The handshake checked the dates, but a resumed TLS session (a ticket
        # lives for days) brings back a certificate without checking them again.
        if not reading.valid_from <= time.time() < reading.valid_until:
            raise CallerUnauthenticated(svid.OUTSIDE_VALIDITY, (reading.caller_id,))
        if self.anchors is not None and self.anchors().too_many_intermediates(reading.issuers):
            raise CallerUnauthenticated(svid.TOO_MANY_INTERMEDIATES, (reading.caller_id,))
        if self.source is CallerIdSource.SPIFFE:
            self.check_trust_domain(reading.trust_domain, reading.caller_id)
        if self.anchors is not None:
            self._check_bundle(self.anchors(), reading, leaf[0], chain)
        return reading.caller_id

    def _check_bundle(self, anchors: svid.TrustAnchors, reading: NamedCaller, leaf: bytes, chain: bytes) -> None:
        """With the Workload API's bundles: the caller's chain leads to the bundle that may vouch for its id."""
        if self.source is CallerIdSource.SPIFFE:
            if not anchors.vouches_for(reading.trust_domain, leaf, chain):
                raise CallerUnauthenticated(svid.NOT_FROM_ITS_TRUST_DOMAIN, (reading.caller_id,))
        elif not anchors.vouches_for(anchors.own_trust_domain, leaf, chain):
            raise CallerUnauthenticated(svid.DNS_NOT_FROM_OWN_TRUST_DOMAIN, (reading.caller_id,))

    def check_trust_domain(self, trust_domain: str, caller_id: str, *, forwarded: bool = False) -> None:
        """Raise CallerUnauthenticated unless `trust_domain` (of `caller_id`) is one of identity.trust_domains."""
        if trust_domain not in self.trust_domains:
            # Safe to name: it passed the trust domain grammar.
            raise CallerUnauthenticated(
                f"trust domain {trust_domain} is not trusted", (caller_id,), forwarded=forwarded
            )
