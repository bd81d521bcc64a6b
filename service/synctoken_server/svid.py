"""The X.509-SVID rules: whether a client certificate, and the chain it came with, may name a workload.

The TLS layer has already checked that the certificate chains to a trusted CA.
What it does not know are the SPIFFE X509-SVID rules: a workload's own
certificate is not a CA's, and no workload may sign certificates for others
(BoringSSL accepts a chain through any CA:TRUE certificate that the trusted CA
signed, and ignores a path length set on the trusted CA itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509

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
ISSUER_NOT_CA = "a certificate in the chain it presented is not a CA's (it needs CA:TRUE and keyCertSign)"
ISSUER_IS_WORKLOAD = "a certificate in the chain it presented is a workload's (its SPIFFE ID has a path)"


@dataclass(frozen=True)
class PresentedCertificate:
    """A client's leaf certificate as presented: its URI and DNS SANs, as written, and the rule it breaks, if any."""

    uris: tuple[str, ...]
    dns_names: tuple[str, ...]
    defect: str | None


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
        defect = _leaf_defect(extensions) or next(filter(None, map(_issuer_defect, issuers)), None)
    except _UNDECODABLE as exc:
        raise ValueError(NOT_DECODABLE) from exc
    return PresentedCertificate(uris=uris, dns_names=dns_names, defect=defect)


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


def _issuer_defect(cert: x509.Certificate) -> str | None:
    # Per the X509-SVID spec a signing certificate is CA:TRUE with keyCertSign,
    # and may carry its trust domain's SPIFFE ID (no path), never a workload's.
    extensions = cert.extensions
    constraints = _value(extensions, x509.BasicConstraints)
    usage = _value(extensions, x509.KeyUsage)
    if constraints is None or not constraints.ca or usage is None or not usage.key_cert_sign:
        return ISSUER_NOT_CA
    sans = _value(extensions, x509.SubjectAlternativeName)
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier) if sans else []
    if any(_names_workload(uri) for uri in uris):
        return ISSUER_IS_WORKLOAD
    return None


def _names_workload(uri: str) -> bool:
    # Deliberately looser than the SPIFFE grammar: any spiffe URI with
    # something after the trust domain counts, valid or not.
    return uri[: len(_SPIFFE_SCHEME)].lower() == _SPIFFE_SCHEME and "/" in uri[len(_SPIFFE_SCHEME) :]


def _value(extensions: x509.Extensions, kind: type[E]) -> E | None:
    try:
        return extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
