"""The suite's PKI: a CA, a server certificate and client certificates, good ones and bad ones named after their defect."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

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
