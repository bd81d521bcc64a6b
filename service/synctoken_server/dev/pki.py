"""Throwaway X.509 certificates for `synctoken dev` and for tests.

Never for production: keys are made in memory, written unencrypted, and the
CA signs whatever it is asked to.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from synctoken_server.dev import files

_ONE_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class KeyPair:
    """A certificate (then the chain above it, up to but not including the CA) and its private key, as PEM."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the certificate, and the key readable by its owner only, each whole or not at all."""
        files.put(cert_path, self.cert_pem, 0o644)
        files.put(key_path, self.key_pem, 0o600)


@dataclass(frozen=True)
class LeafSpec:
    """What goes into a leaf certificate; tests vary it to make bad ones."""

    common_name: str
    dns_names: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    server: bool = False
    not_before: dt.datetime | None = None
    not_after: dt.datetime | None = None
    # What makes a certificate a CA's: each flag alone is a defect in a leaf.
    ca: bool = False
    key_cert_sign: bool = False
    crl_sign: bool = False
    # A KeyUsage of digitalSignature alone, as the X509-SVID standard requires of a leaf (SPIRE's have it).
    digital_signature: bool = False
    # The subjectAltName extension's DER, verbatim, in place of the names
    # above: for SAN bytes that cryptography's str-typed names cannot carry.
    san_der: bytes | None = None


class CertificateAuthority:
    """A self-signed CA that issues leaf certificates."""

    def __init__(self, common_name: str, *, days: int = 30, path_length: int | None = 0) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self._name = name
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _ONE_DAY)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(_key_usage(digital_signature=False, key_cert_sign=True, crl_sign=True), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        """The CA that `cert_pem` and `key_pem` wrote, to issue more; ValueError says what is wrong with them."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the key is not an EC key, as this module makes")  # noqa: TRY004 - a bad file, not a bug
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
            raise ValueError("the key does not match the certificate")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ValueError("the certificate is not a CA's (no CA:TRUE)")
        ca = cls.__new__(cls)  # not __init__: that makes a new key
        ca._key, ca._cert, ca._name = key, cert, cert.subject  # noqa: SLF001 - our own class
        return ca

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, to be trusted by peers."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The CA's private key (unencrypted PKCS#8), to keep beside `cert_pem` and `load` later."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def not_after(self) -> dt.datetime:
        """When the CA certificate expires: nothing it signs is trusted after that."""
        return self._cert.not_valid_after_utc

    def issue(
        self, spec: LeafSpec, *, issuer: KeyPair | None = None, key: CertificateIssuerPrivateKeyTypes | None = None
    ) -> KeyPair:
        """Sign a new leaf certificate described by `spec`.

        With `issuer`, that certificate's key signs instead of the CA's, and the
        new certificate's PEM is followed by the issuer's chain, as a client
        presents it: to make chains through a workload or an intermediate.
        `key` is the new certificate's key (default: a new P-256 key).
        """
        signer_name, signer_key, chain_pem = self._name, self._key, b""
        if issuer is not None:
            signer_name = x509.load_pem_x509_certificates(issuer.cert_pem)[0].subject
            loaded = serialization.load_pem_private_key(issuer.key_pem, password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise TypeError("issue() makes EC keys only")
            signer_key, chain_pem = loaded, issuer.cert_pem
        if key is None:
            key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in spec.dns_names]
        sans += [x509.UniformResourceIdentifier(u) for u in spec.uris]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in spec.ip_addresses]
        usage = ExtendedKeyUsageOID.SERVER_AUTH if spec.server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec.common_name)]))
            .issuer_name(signer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(spec.not_before or now - dt.timedelta(minutes=5))
            .not_valid_after(spec.not_after or now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=spec.ca, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if spec.key_cert_sign or spec.crl_sign or spec.digital_signature:
            usages = _key_usage(digital_signature=True, key_cert_sign=spec.key_cert_sign, crl_sign=spec.crl_sign)
            builder = builder.add_extension(usages, critical=True)
        if spec.san_der is not None:
            raw = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, spec.san_der)
            builder = builder.add_extension(raw, critical=False)
        elif sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(signer_key, hashes.SHA256())
        return KeyPair(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM) + chain_pem,
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )


def _key_usage(*, digital_signature: bool, key_cert_sign: bool, crl_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )
