"""The suite's PKI: a CA, a server certificate and client certificates, good ones and bad ones named after their defect."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from support.constants import BFF_ID, CHAT_ADMIN_ID, CHAT_WORKER_ID, DNS_CALLER, STRANGER_ID, TRUST_DOMAIN
from synctoken_server.dev.pki import CertificateAuthority, KeyPair, LeafSpec


@dataclass
class Pki:
    """The suite's certificates; bad ones are named after their defect."""

    ca: CertificateAuthority
    directory: Path
    server: KeyPair
    clients: dict[str, KeyPair]

    def credentials(self, client: str | None) -> grpc.ChannelCredentials:
        """Channel credentials trusting our CA, presenting `client`'s certificate (or none)."""
        if client is None:
            return grpc.ssl_channel_credentials(root_certificates=self.ca.cert_pem)
        pair = self.clients[client]
        return grpc.ssl_channel_credentials(self.ca.cert_pem, pair.key_pem, pair.cert_pem)

    def files(self, client: str) -> tuple[Path, Path]:
        """Paths of `client`'s certificate and key, for grpcurl."""
        return self.directory / f"{client}.pem", self.directory / f"{client}-key.pem"


def presented_certificate(
    port: int, ca_pem: str, client: tuple[Path, Path] | None = None, host: str = "127.0.0.1"
) -> x509.Certificate:
    """The certificate a TLS server on `host`:`port` presents on a new connection (verified against `ca_pem`)."""
    context = ssl.create_default_context(cadata=ca_pem)
    if client is not None:
        context.load_cert_chain(*client)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _uri_san_der(uri: bytes) -> bytes:
    """A subjectAltName of one URI, as DER: GeneralNames { [6] IA5String }, for bytes cryptography will not write."""
    name = bytes([0x86, len(uri)]) + uri
    return bytes([0x30, len(name)]) + name


def build_pki(directory: Path) -> Pki:
    """CAs, a localhost server certificate, and good and bad client certificates.

    Besides the suite's CA (ca.pem, path length 0, like many private CAs) there
    is one without a path length (open-ca.pem), as most public and many
    corporate CAs are, for the tests of chains through other certificates.
    """
    ca = CertificateAuthority("synctoken test CA")
    open_ca = CertificateAuthority("synctoken test CA without a path length", path_length=None)
    foreign_ca = CertificateAuthority("someone else's CA")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    # Certificates that can sign others, for leaves issued other than by a CA.
    workload_signer = LeafSpec("worker acting as a CA", uris=(CHAT_WORKER_ID,), ca=True, key_cert_sign=True)
    workload_ca = ca.issue(workload_signer)
    open_workload_ca = open_ca.issue(workload_signer)
    ca_without_key_cert_sign = ca.issue(LeafSpec("CA:TRUE, no key usage", ca=True))
    # A workload named by a DNS SAN, wrongly made a CA: in dns_san mode that is how every workload is named.
    open_dns_workload_ca = open_ca.issue(
        LeafSpec("evil acting as a CA", dns_names=("evil.internal.example.com",), ca=True, key_cert_sign=True)
    )
    intermediate = LeafSpec(
        "intermediate CA", uris=(f"spiffe://{TRUST_DOMAIN}",), ca=True, key_cert_sign=True, crl_sign=True
    )
    open_intermediate = open_ca.issue(
        LeafSpec("intermediate CA", uris=(f"spiffe://{TRUST_DOMAIN}",), ca=True, key_cert_sign=True, crl_sign=True)
    )
    chat_worker = ca.issue(LeafSpec("worker", uris=(CHAT_WORKER_ID,)))
    admin = LeafSpec("admin", uris=(CHAT_ADMIN_ID,))
    clients = {
        "bff": ca.issue(LeafSpec("bff", uris=(BFF_ID,))),
        "chat_worker": chat_worker,
        "chat_admin": ca.issue(admin),
        "stranger": ca.issue(LeafSpec("stranger", uris=(STRANGER_ID,))),
        "foreign_trust_domain": ca.issue(LeafSpec("evil", uris=("spiffe://evil.example/ns/web/sa/bff",))),
        "two_uri_sans": ca.issue(LeafSpec("two", uris=(BFF_ID, CHAT_ADMIN_ID))),
        "spiffe_and_https_uri": ca.issue(LeafSpec("mixed", uris=(BFF_ID, "https://bff.example.org"))),
        "no_san": ca.issue(LeafSpec(BFF_ID)),
        "dns_only": ca.issue(LeafSpec("billing", dns_names=(DNS_CALLER,))),
        "two_dns_sans": ca.issue(LeafSpec("two dns", dns_names=(DNS_CALLER, "other.internal.example.com"))),
        "foreign_ca": foreign_ca.issue(LeafSpec("bff", uris=(BFF_ID,))),
        "expired": ca.issue(
            LeafSpec("bff", uris=(BFF_ID,), not_before=long_ago, not_after=long_ago + dt.timedelta(days=1))
        ),
        # gRPC's peer_spiffe_id and peer_dns stop at the NUL: "admin" and "billing...".
        "nul_in_uri_san": ca.issue(LeafSpec("admin", uris=(f"{CHAT_ADMIN_ID}\x00.anything",))),
        "nul_in_dns_san": ca.issue(LeafSpec("billing", dns_names=(f"{DNS_CALLER}\x00.evil.com",))),
        "newline_after_uri_san": ca.issue(LeafSpec("bff", uris=(f"{BFF_ID}\n",))),
        "upper_case_trust_domain": ca.issue(LeafSpec("bff", uris=("spiffe://EXAMPLE.org/ns/web/sa/bff",))),
        "trust_domain_only_uri_san": ca.issue(LeafSpec("td", uris=(f"spiffe://{TRUST_DOMAIN}",))),
        # A byte over 0x7f in an IA5String: BoringSSL reads it as Latin-1, cryptography refuses it.
        "undecodable_uri_san": ca.issue(LeafSpec("bff", san_der=_uri_san_der(BFF_ID.encode() + b"\xff"))),
        "ca_true_leaf": ca.issue(LeafSpec("bff", uris=(BFF_ID,), ca=True)),
        "key_cert_sign_leaf": ca.issue(LeafSpec("bff", uris=(BFF_ID,), key_cert_sign=True)),
        "crl_sign_leaf": ca.issue(LeafSpec("bff", uris=(BFF_ID,), crl_sign=True)),
        # gRPC handshakes with it; synctoken refuses it, as it refuses such a key of its own.
        "weak_rsa_key": ca.issue(LeafSpec("bff", uris=(BFF_ID,)), key=KEY_KINDS["rsa-1024"]()),
        "issued_by_workload": ca.issue(admin, issuer=workload_ca),
        "issued_by_ca_without_key_cert_sign": ca.issue(admin, issuer=ca_without_key_cert_sign),
        "issued_by_plain_leaf": ca.issue(admin, issuer=chat_worker),
        "issued_by_workload_under_open_ca": open_ca.issue(admin, issuer=open_workload_ca),
        "issued_by_intermediate_under_open_ca": open_ca.issue(admin, issuer=open_intermediate),
        "issued_by_dns_named_workload_under_open_ca": open_ca.issue(admin, issuer=open_dns_workload_ca),
        "dns_caller_issued_by_dns_named_workload_under_open_ca": open_ca.issue(
            LeafSpec("billing", dns_names=(DNS_CALLER,)), issuer=open_dns_workload_ca
        ),
        # ca.pem has path length 0, which BoringSSL does not enforce on a trust anchor.
        "issued_by_intermediate_past_path_length": ca.issue(admin, issuer=ca.issue(intermediate)),
    }
    server = ca.issue(LeafSpec("localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1",), server=True))
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    (directory / "open-ca.pem").write_bytes(open_ca.cert_pem)
    server.write(directory / "server.pem", directory / "server-key.pem")
    for name, pair in clients.items():
        pair.write(*(directory / f"{name}.pem", directory / f"{name}-key.pem"))
    return Pki(ca=ca, directory=directory, server=server, clients=clients)


KEY_KINDS: dict[str, Callable[[], CertificateIssuerPrivateKeyTypes]] = {
    "rsa-1024": lambda: rsa.generate_private_key(65537, 1024),  # noqa: S505 - a weak key, on purpose
    "rsa-2048": lambda: rsa.generate_private_key(65537, 2048),
    "ecdsa-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ecdsa-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ecdsa-p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ecdsa-secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),
    "ecdsa-brainpoolp256r1": lambda: ec.generate_private_key(ec.BrainpoolP256R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "ed448": ed448.Ed448PrivateKey.generate,
    "dsa": lambda: dsa.generate_private_key(2048),
}
"""Keys cryptography makes, by a name for test ids; openssl makes the RSA-PSS ones (issue_with_key)."""


def openssl(*args: str) -> None:
    """Run the openssl command: it makes keys that cryptography cannot (RSA-PSS, rare curves)."""
    command = shutil.which("openssl")
    assert command is not None, "openssl is required (Debian's openssl package; make test installs it)"
    subprocess.run([command, *args], check=True, capture_output=True, timeout=60)


def issue_with_key(ca: CertificateAuthority, spec: LeafSpec, kind: str, directory: Path) -> KeyPair:
    """A leaf certificate for `spec` from `ca`, with a new key of `kind`, as PKCS#8.

    `kind`: a KEY_KINDS name, or two that openssl makes: "rsa-pss" (an RSA-PSS
    key and certificate; of `spec`, only its name and URIs are used) and
    "rsa-pss-key-rsa-certificate" (an RSA-PSS key file beside an ordinary RSA
    certificate for the same key, which cryptography writes).
    """
    if kind in KEY_KINDS:
        return ca.issue(spec, key=KEY_KINDS[kind]())
    key_path = directory / "pss-key.pem"
    openssl("genpkey", "-algorithm", "RSA-PSS", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key_path))
    key_pem = key_path.read_bytes()
    if kind == "rsa-pss-key-rsa-certificate":
        key = serialization.load_pem_private_key(key_pem, password=None)
        assert isinstance(key, rsa.RSAPrivateKey)  # cryptography reads an RSA-PSS key as plain RSA
        return KeyPair(ca.issue(spec, key=key).cert_pem, key_pem)
    assert kind == "rsa-pss", f"no key kind {kind!r}"
    ca_path, ca_key_path, request, cert = (directory / n for n in ("ca.pem", "ca-key.pem", "pss.csr", "pss.pem"))
    ca_path.write_bytes(ca.cert_pem)
    ca_key_path.write_bytes(ca.key_pem)
    ca_key_path.chmod(0o600)
    names = ",".join(f"URI:{uri}" for uri in spec.uris)
    openssl("req", "-new", "-key", str(key_path), "-subj", f"/CN={spec.common_name}", "-out", str(request),
            "-addext", f"subjectAltName={names}", "-addext", "extendedKeyUsage=clientAuth",
            "-addext", "keyUsage=critical,digitalSignature", "-addext", "basicConstraints=critical,CA:FALSE")  # fmt: skip
    serial = hex(x509.random_serial_number())
    openssl("x509", "-req", "-in", str(request), "-CA", str(ca_path), "-CAkey", str(ca_key_path),
            "-set_serial", serial, "-copy_extensions", "copyall", "-days", "1", "-out", str(cert))  # fmt: skip
    return KeyPair(cert.read_bytes(), key_pem)
