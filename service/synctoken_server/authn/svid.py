"""The X.509-SVID rules: whether a client certificate, and the chain it came with, may name a workload.

The TLS layer has already checked that the certificate chains to a trusted CA.
What it does not know are the SPIFFE X509-SVID rules: a workload's own
certificate is not a CA's, and no workload may sign certificates for others
(BoringSSL accepts a chain through any CA:TRUE certificate that the trusted CA
signed, and ignores a path length set on the trusted CA itself).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding

from synctoken import tlskeys

E = TypeVar("E", bound=x509.ExtensionType)

_SPIFFE_SCHEME = "spiffe://"
# What cryptography raises for bytes it cannot read as a certificate. BoringSSL
# already refuses duplicate extensions and unknown versions in the handshake;
# they are here so that such a certificate could never end in INTERNAL.
_UNDECODABLE = (ValueError, x509.UnsupportedGeneralNameType, x509.DuplicateExtension, x509.InvalidVersion)

NOT_DECODABLE = "its certificate or the chain it presented cannot be decoded"
CA_LEAF = "it is a CA certificate (CA:TRUE), not a workload's"
KEY_CERT_SIGN_LEAF = "its key usage includes keyCertSign, which only a CA certificate may have"
CRL_SIGN_LEAF = "its key usage includes cRLSign, which only a CA certificate may have"
WEAK_KEY = (
    f"its key is an RSA key of fewer than {tlskeys.MIN_RSA_BITS} bits, too weak (callers present {tlskeys.USABLE_KEYS})"
)
ISSUER_NOT_CA = "a certificate in the chain it presented is not a CA's (it needs CA:TRUE and keyCertSign)"
ISSUER_IS_WORKLOAD = (
    "a certificate in the chain it presented names a workload (a SAN other than its trust domain's SPIFFE ID)"
)
OUTSIDE_VALIDITY = "its certificate has expired or is not valid yet (a resumed TLS session is checked too)"
TOO_MANY_INTERMEDIATES = "it presented more intermediate CA certificates than the path length of client_ca_file allows"
NOT_FROM_ITS_TRUST_DOMAIN = (
    "its certificate does not chain to a CA of its own trust domain's bundle (a trust domain's CA vouches for that "
    "trust domain's IDs only)"
)
DNS_NOT_FROM_OWN_TRUST_DOMAIN = (
    "its certificate does not chain to a CA of the server's own trust domain's bundle (a federated trust domain's "
    "CA does not vouch for DNS names)"
)


@dataclass(frozen=True)
class PresentedCertificate:
    """A client's leaf certificate as presented: its URI and DNS SANs, as written, and the rule it breaks, if any.

    `issuers` are the DER encodings of every other certificate the client sent.
    """

    uris: tuple[str, ...]
    dns_names: tuple[str, ...]
    defect: str | None
    issuers: frozenset[bytes] = frozenset()
    valid_from: float = float("-inf")
    valid_until: float = float("inf")
    """The leaf's validity in Unix seconds: checked on every call (a resumed TLS session skips the handshake)."""


@dataclass(frozen=True)
class TrustAnchors:
    """The CAs of client_ca_file: their DER encodings, and how many intermediates below them they allow."""

    certificates: frozenset[bytes]
    max_intermediates: int | None
    """None when some CA sets no path length. BoringSSL does not enforce a
    trust anchor's own path length, so it is enforced here."""
    by_trust_domain: Mapping[str, frozenset[bytes]] | None = field(default=None, compare=False)
    """The Workload API's bundles: trust domain name -> its CAs (DER). None for client_ca_file, which names none.

    The handshake verifies a chain against every bundle at once; SPIFFE trusts each bundle for its own trust
    domain only, so a caller's chain must also lead to a CA of the bundle of the trust domain it names
    (`vouches_for`): else a federated partner's CA could sign certificates naming our own workloads."""
    own_trust_domain: str = field(default="", compare=False)
    """The server's SVID's trust domain, with by_trust_domain: the one whose CAs vouch for callers named by a
    DNS SAN (a DNS name belongs to no trust domain, and a partner's CA must not name our DNS callers)."""

    @classmethod
    def from_pem(cls, bundle: bytes) -> TrustAnchors:
        """Read a PEM bundle of CA certificates (already known to parse)."""
        return cls.of(x509.load_pem_x509_certificates(bundle))

    @classmethod
    def of(cls, cas: list[x509.Certificate]) -> TrustAnchors:
        """The anchors that are these CA certificates."""
        lengths = [_value(ca.extensions, x509.BasicConstraints) for ca in cas]
        limits = [c.path_length if c is not None else None for c in lengths]
        allowed = (
            None if any(limit is None for limit in limits) else max(limit for limit in limits if limit is not None)
        )
        return cls(frozenset(ca.public_bytes(Encoding.DER) for ca in cas), allowed)

    def vouches_for(self, trust_domain: str, leaf_pem: bytes, chain_pem: bytes) -> bool:
        """Whether the bundle of `trust_domain` holds a CA that the verified leaf chains to (always, without bundles).

        `chain_pem` is the rest of the chain the client presented, as for read_presented.
        """
        if self.by_trust_domain is None:
            return True
        authorities = self.by_trust_domain.get(trust_domain)
        return authorities is not None and _chains_to(leaf_pem, chain_pem, authorities)

    def too_many_intermediates(self, issuers: frozenset[bytes]) -> bool:
        """True when the client presented more intermediates (certificates that are not anchors) than allowed."""
        return self.max_intermediates is not None and len(issuers - self.certificates) > self.max_intermediates


def read_presented(leaf_pem: bytes, chain_pem: bytes) -> PresentedCertificate:
    """Read a verified leaf and the rest of the chain its peer presented (empty if none).

    Raise ValueError if cryptography cannot decode either: such a certificate
    names nobody, however the TLS library read it.
    """
    try:
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        # gRPC leaves the leaf out of a server's view of the client's chain,
        # and puts it in on the client side; skip it wherever it is.
        issuers = [c for c in x509.load_pem_x509_certificates(chain_pem) if c != leaf] if chain_pem else []
        extensions = leaf.extensions
        sans = _value(extensions, x509.SubjectAlternativeName)
        uris = tuple(sans.get_values_for_type(x509.UniformResourceIdentifier)) if sans else ()
        dns_names = tuple(sans.get_values_for_type(x509.DNSName)) if sans else ()
        defect = (
            _leaf_defect(extensions)
            or _key_defect(leaf.public_key())
            or next(filter(None, map(_issuer_defect, issuers)), None)
        )
    except _UNDECODABLE as exc:
        raise ValueError(NOT_DECODABLE) from exc
    return PresentedCertificate(
        uris=uris,
        dns_names=dns_names,
        defect=defect,
        issuers=frozenset(c.public_bytes(Encoding.DER) for c in issuers),
        valid_from=leaf.not_valid_before_utc.timestamp(),
        valid_until=leaf.not_valid_after_utc.timestamp(),
    )


@functools.lru_cache(maxsize=1024)
def _chains_to(leaf_pem: bytes, chain_pem: bytes, authorities: frozenset[bytes]) -> bool:
    # The handshake checked the chain's signatures, dates and constraints against the union of the bundles;
    # this only asks at whose CA a chain of signatures from the leaf, through the certificates the client
    # presented, can end. Certificates the client added beside its path (another trust domain's genuine
    # intermediate, say) lead nowhere unless they signed the certificate below them. Pure, so cached like
    # read_caller; each presented certificate is tried as an issuer once.
    try:
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        presented = x509.load_pem_x509_certificates(chain_pem) if chain_pem else []
        cas = [x509.load_der_x509_certificate(der) for der in authorities]
    except _UNDECODABLE:
        return False
    unused = [c for c in presented if c != leaf]
    below = [leaf]
    while below:
        cert = below.pop()
        if any(_signed(cert, ca) for ca in cas):
            return True
        issuers = [c for c in unused if _signed(cert, c)]
        unused = [c for c in unused if c not in issuers]
        below += issuers
    return False


def _signed(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer` signed `cert` (its name is cert's issuer name and its key verifies the signature)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _leaf_defect(extensions: x509.Extensions) -> str | None:
    constraints = _value(extensions, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        return CA_LEAF
    usage = _value(extensions, x509.KeyUsage)
    if usage is not None and usage.key_cert_sign:
        return KEY_CERT_SIGN_LEAF
    if usage is not None and usage.crl_sign:
        return CRL_SIGN_LEAF
    return None


def _key_defect(key: PublicKeyTypes) -> str | None:
    # gRPC handshakes with a 1024-bit RSA key; synctoken's rule for keys (synctoken.tlskeys, which it applies
    # to its own) refuses one. Other kinds it refuses cannot complete a handshake with gRPC at all.
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < tlskeys.MIN_RSA_BITS:
        return WEAK_KEY
    return None


def _issuer_defect(cert: x509.Certificate) -> str | None:
    # Per the X509-SVID spec a signing certificate is CA:TRUE with keyCertSign,
    # and may carry its trust domain's SPIFFE ID (no path). Any other name
    # (a workload's SPIFFE ID, a DNS name, an address...) marks a workload's
    # certificate that was wrongly made a CA: in dns_san mode every workload
    # is named by a DNS SAN, so a DNS-named CA could sign for any of them.
    extensions = cert.extensions
    constraints = _value(extensions, x509.BasicConstraints)
    usage = _value(extensions, x509.KeyUsage)
    if constraints is None or not constraints.ca or usage is None or not usage.key_cert_sign:
        return ISSUER_NOT_CA
    sans = _value(extensions, x509.SubjectAlternativeName)
    if sans is not None and not all(_names_trust_domain(name) for name in sans):
        return ISSUER_IS_WORKLOAD
    return None


def _names_trust_domain(name: x509.GeneralName) -> bool:
    # Deliberately strict: only spiffe://<something> with nothing after it.
    if not isinstance(name, x509.UniformResourceIdentifier):
        return False
    uri = name.value
    return uri.startswith(_SPIFFE_SCHEME) and "/" not in uri[len(_SPIFFE_SCHEME) :]


def _value(extensions: x509.Extensions, kind: type[E]) -> E | None:
    try:
        return extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
