"""An X509SVIDResponse made into the TLS set the server serves (process/workloadcerts.svid_material)."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509
from spiffe._proto import workload_pb2

from support.constants import TRUST_DOMAIN
from support.pki import Pki
from support.workloadagent import Svid, issue_svid, pem_to_der
from synctoken_server.dev.pki import CertificateAuthority, KeyPair
from synctoken_server.process.workloadcerts import svid_material

SERVER_ID = f"spiffe://{TRUST_DOMAIN}/synctoken"


def now() -> dt.datetime:
    """The time now: not the module's import time, which may be long before the test runs."""
    return dt.datetime.now(dt.UTC)


def response(svid: Svid, federated: dict[str, bytes] | None = None) -> workload_pb2.X509SVIDResponse:
    """The agent's answer carrying `svid` and the federated bundles (trust domain name -> CA PEM)."""
    wire = svid.wire()
    message = workload_pb2.X509SVID(
        spiffe_id=wire["spiffe_id"],
        x509_svid=base64.b64decode(wire["chain"]),
        x509_svid_key=base64.b64decode(wire["key"]),
        bundle=base64.b64decode(wire["bundle"]),
    )
    bundles = {f"spiffe://{td}": pem_to_der(pem) for td, pem in (federated or {}).items()}
    return workload_pb2.X509SVIDResponse(svids=[message], federated_bundles=bundles)


def test_first_svid_and_every_bundle(pki: Pki) -> None:
    """The chain and key are the SVID's; the client CAs are the own bundle and each federated one."""
    svid = issue_svid(pki.ca, SERVER_ID, server=True)
    partner = CertificateAuthority("partner CA")
    material, spiffe_id, domains = svid_material(response(svid, {"partner.example": partner.cert_pem}), now())
    assert (spiffe_id, domains) == (SERVER_ID, ["example.org", "partner.example"])
    assert material.files is None
    assert material.serial == f"{svid.serial:X}"
    assert material.client_cas == 2
    assert x509.load_pem_x509_certificates(material.cert_chain_pem)[0].serial_number == svid.serial


def test_same_bundles_same_bytes(pki: Pki) -> None:
    """The CA bundle's bytes do not depend on the order bundles arrive in, so a resent answer changes nothing."""
    svid = issue_svid(pki.ca, SERVER_ID, server=True)
    cas = {f"td{i}.example": CertificateAuthority(f"CA {i}").cert_pem for i in range(4)}
    forward, _, _ = svid_material(response(svid, cas), now())
    backward, _, _ = svid_material(response(svid, dict(reversed(cas.items()))), now())
    assert forward.same_contents(backward)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda _pki: workload_pb2.X509SVIDResponse(), "the answer holds no X509-SVID"),
        (
            lambda pki: response(
                issue_svid(
                    pki.ca, SERVER_ID, not_before=now() - dt.timedelta(days=2), not_after=now() - dt.timedelta(days=1)
                )
            ),
            "the X509-SVID cannot serve: its certificate expired at",
        ),
        (
            lambda pki: response(issue_svid(pki.ca, SERVER_ID, crl_sign=True)),
            "the X509-SVID or a bundle does not parse",
        ),
    ],
    ids=["no svid", "expired", "crl sign leaf"],
)
def test_unusable_answers(pki: Pki, make: object, problem: str) -> None:
    """An answer that cannot serve is a ValueError saying why (and never holding the key)."""
    with pytest.raises(ValueError, match="^" + problem) as caught:
        svid_material(make(pki), now())  # type: ignore[operator]
    assert "PRIVATE KEY" not in str(caught.value)


def test_unparsable_federated_bundle(pki: Pki) -> None:
    """A federated bundle that is not DER certificates makes the whole answer unusable."""
    answer = response(issue_svid(pki.ca, SERVER_ID, server=True))
    answer.federated_bundles["spiffe://partner.example"] = b"not a certificate"
    with pytest.raises(ValueError, match="does not parse"):
        svid_material(answer, now())


def test_bundles_kept_per_trust_domain(pki: Pki) -> None:
    """Each bundle's CAs are kept under its trust domain, for the caller-id check to use that one's only."""
    svid = issue_svid(pki.ca, SERVER_ID, server=True)
    partner = CertificateAuthority("partner CA")
    material, _, _ = svid_material(response(svid, {"partner.example": partner.cert_pem}), now())
    assert material.anchors.by_trust_domain == {
        "example.org": frozenset({pem_to_der(pki.ca.cert_pem)}),
        "partner.example": frozenset({pem_to_der(partner.cert_pem)}),
    }


def test_federated_bundle_for_the_own_trust_domain_is_refused(pki: Pki) -> None:
    """A 'federated' bundle under the SVID's own trust domain would be rival CAs for our IDs: the answer is unusable."""
    svid = issue_svid(pki.ca, SERVER_ID, server=True)
    rival = CertificateAuthority("rival CA")
    with pytest.raises(ValueError, match=r"^a federated bundle is for the X509-SVID.s own trust domain example\.org$"):
        svid_material(response(svid, {TRUST_DOMAIN: rival.cert_pem}), now())


def test_key_of_another_certificate_said_in_the_answers_words(pki: Pki) -> None:
    """A key that does not match its SVID is said so, without naming tls.cert_file (there are no files)."""
    svid, other = (issue_svid(pki.ca, SERVER_ID, server=True) for _ in range(2))
    mismatched = Svid(SERVER_ID, KeyPair(svid.pair.cert_pem, other.pair.key_pem), svid.bundle_pem)
    with pytest.raises(ValueError, match=r"^the X509-SVID cannot serve: its key does not match its certificate$"):
        svid_material(response(mismatched), now())
