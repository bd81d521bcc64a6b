"""What a client presented: its leaf certificate's SANs as written, read with cryptography.

gRPC's own SAN properties are C strings, cut short at a NUL byte inside a SAN;
cryptography reads the certificate's bytes as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

NOT_DECODABLE = "its certificate cannot be decoded"


@dataclass(frozen=True)
class PresentedCertificate:
    """A client's leaf certificate as presented: its URI and DNS SANs, as written."""

    uris: tuple[str, ...]
    dns_names: tuple[str, ...]


def read_presented(leaf_pem: bytes) -> PresentedCertificate:
    """Read a verified leaf; raise ValueError if cryptography cannot decode it.

    Such a certificate names nobody, however the TLS library read it.
    """
    try:
        extensions = x509.load_pem_x509_certificate(leaf_pem).extensions
        sans = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return PresentedCertificate(uris=(), dns_names=())
    except (ValueError, x509.UnsupportedGeneralNameType) as exc:
        raise ValueError(NOT_DECODABLE) from exc
    return PresentedCertificate(
        uris=tuple(sans.get_values_for_type(x509.UniformResourceIdentifier)),
        dns_names=tuple(sans.get_values_for_type(x509.DNSName)),
    )
