"""Caller ids from certificates: the SPIFFE ID and DNS grammar, the X509-SVID rules, and the auth context."""

from __future__ import annotations

import dataclasses
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from support.constants import BFF_ID, CHAT_ADMIN_ID, DNS_CALLER
from support.pki import Pki
from synctoken_server.authn import svid
from synctoken_server.authn.callercert import (
    SPIFFE_ID_FORM,
    TRUST_DOMAIN_FORM,
    CallerCertRules,
    CallerIdSource,
    NamedCaller,
    UnnamedCaller,
    is_dns_name,
    parse_spiffe_id,
    parse_trust_domain,
    read_caller,
)
from synctoken_server.dev.pki import CertificateAuthority, LeafSpec
from synctoken_server.errors import CallerUnauthenticated

SPIFFE = CallerIdSource.SPIFFE
DNS_SAN = CallerIdSource.DNS_SAN


def leaf_and_chain(cert_pem: bytes) -> tuple[bytes, bytes]:
    """A presented PEM chain split as gRPC gives it: the leaf, and the rest."""
    leaf, *rest = x509.load_pem_x509_certificates(cert_pem)
    return leaf.public_bytes(Encoding.PEM), b"".join(c.public_bytes(Encoding.PEM) for c in rest)


def auth_context(cert_pem: bytes) -> dict[str, list[bytes]]:
    """gRPC's auth context for a peer that presented `cert_pem`: no chain key when it sent its leaf alone."""
    leaf, chain = leaf_and_chain(cert_pem)
    context = {"x509_pem_cert": [leaf]}
    if chain:
        context["x509_pem_cert_chain"] = [chain]
    return context


class TestParseSpiffeId:
    """parse_spiffe_id accepts only SPIFFE IDs written exactly as the grammar says."""

    @pytest.mark.parametrize(
        ("text", "trust_domain", "path"),
        [
            ("spiffe://example.org/ns/web/sa/bff", "example.org", "/ns/web/sa/bff"),
            ("spiffe://example.org", "example.org", ""),
            ("spiffe://a-b_c.example/Path.With-Case_1", "a-b_c.example", "/Path.With-Case_1"),
            ("spiffe://example.org/...", "example.org", "/..."),
        ],
    )
    def test_valid(self, text: str, trust_domain: str, path: str) -> None:
        """Valid ids parse into trust domain and case-sensitive path, and print back unchanged."""
        spiffe_id = parse_spiffe_id(text)
        assert (spiffe_id.trust_domain.name, spiffe_id.path) == (trust_domain, path)
        assert str(spiffe_id) == text

    @pytest.mark.parametrize(
        "text",
        [
            "https://example.org/a",
            "spiffe:/example.org/a",
            "SPIFFE://example.org/a",
            "spiffe://Example.org/a",
            "spiffe://EXAMPLE.ORG/a",
            "spiffe:///a",
            "spiffe://example.org/",
            "spiffe://example.org//a",
            "spiffe://example.org/a/./b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a%20b",
            "spiffe://user@example.org/a",
            "spiffe://example.org:443/a",
            "spiffe://example.org/a?q=1",
            "spiffe://example.org/a#f",
            "spiffe://example.org/a\x00.anything",
            "spiffe://example.org/a\n",
            "spiffe://example.org\n/a",
            "spiffe://example.org/caf\u00e9",
            "",
        ],
    )
    def test_invalid(self, text: str) -> None:
        """Malformed or non-canonical ids are refused with a message naming them and the grammar."""
        with pytest.raises(ValueError, match="is not a SPIFFE ID") as caught:
            parse_spiffe_id(text)
        assert str(caught.value) == f"{text!r} is not a SPIFFE ID ({SPIFFE_ID_FORM})"


class TestParseTrustDomain:
    """parse_trust_domain accepts a bare lower-case trust domain name only."""

    @pytest.mark.parametrize("text", ["example.org", "a-b_c.d", "localhost", "1.2"])
    def test_valid(self, text: str) -> None:
        """Trust domain names come back unchanged."""
        assert parse_trust_domain(text).name == text

    @pytest.mark.parametrize(
        "text",
        [
            "Example.org",
            "TD",
            "spiffe://example.org",
            "spiffe://example.org/x",
            "example.org/ns",
            "example.org:8443",
            "user@example.org",
            "example.org\n",
            "",
        ],
    )
    def test_invalid(self, text: str) -> None:
        """Upper case, schemes, paths, ports and trailing newlines are refused."""
        with pytest.raises(ValueError, match="is not a trust domain name") as caught:
            parse_trust_domain(text)
        assert str(caught.value) == f"{text!r} is not a trust domain name ({TRUST_DOMAIN_FORM})"


class TestDnsName:
    """is_dns_name accepts lower-case host names only."""

    @pytest.mark.parametrize("name", ["billing.internal.example.com", "a", "x-1.y"])
    def test_valid(self, name: str) -> None:
        """Ordinary host names pass."""
        assert is_dns_name(name)

    @pytest.mark.parametrize(
        "name",
        [
            "",
            "Billing.example",
            "-a.example",
            "a..b",
            "*.example.com",
            "a" * 64 + ".b",
            "billing.example.com\x00.evil.com",
            "billing.example.com\n",
        ],
    )
    def test_invalid(self, name: str) -> None:
        """Upper case, wildcards, empty or over-long labels, a NUL or a newline fail."""
        assert not is_dns_name(name)


class TestReadPresented:
    """svid.read_presented: the SANs as written, and the first X509-SVID rule the certificate breaks."""

    @pytest.mark.parametrize(
        ("cert", "defect"),
        [
            ("bff", None),
            ("issued_by_intermediate_under_open_ca", None),
            ("ca_true_leaf", svid.CA_LEAF),
            ("key_cert_sign_leaf", svid.KEY_CERT_SIGN_LEAF),
            ("crl_sign_leaf", svid.CRL_SIGN_LEAF),
            ("weak_rsa_key", svid.WEAK_KEY),
            ("issued_by_workload", svid.ISSUER_IS_WORKLOAD),
            ("issued_by_workload_under_open_ca", svid.ISSUER_IS_WORKLOAD),
            ("issued_by_ca_without_key_cert_sign", svid.ISSUER_NOT_CA),
            ("issued_by_plain_leaf", svid.ISSUER_NOT_CA),
        ],
    )
    def test_defects(self, pki: Pki, cert: str, defect: str | None) -> None:
        """Leaves must not be CAs, and whatever the client presented above its leaf must be a CA but no workload."""
        assert svid.read_presented(*leaf_and_chain(pki.clients[cert].cert_pem)).defect == defect

    def test_sans_as_written(self, pki: Pki) -> None:
        """A NUL inside a SAN is kept, not cut: the leaf is read by cryptography, not from gRPC's C strings."""
        presented = svid.read_presented(*leaf_and_chain(pki.clients["nul_in_uri_san"].cert_pem))
        assert presented.uris == (f"{CHAT_ADMIN_ID}\x00.anything",)
        assert presented.dns_names == ()

    def test_leaf_in_chain_is_skipped(self, pki: Pki) -> None:
        """A chain that repeats the leaf (gRPC's client-side view) is judged on the certificates above it."""
        leaf, chain = leaf_and_chain(pki.clients["issued_by_intermediate_under_open_ca"].cert_pem)
        assert svid.read_presented(leaf, leaf + chain).defect is None

    @pytest.mark.parametrize(
        "san_der",
        [
            pytest.param(bytes.fromhex("3005 8603 61ff62"), id="uri-with-byte-ff"),
            pytest.param(bytes.fromhex("3004 a302 3000"), id="x400-address"),
            pytest.param(bytes.fromhex("3005 8610 616263"), id="truncated"),
        ],
    )
    def test_undecodable(self, pki: Pki, san_der: bytes) -> None:
        """A SAN extension that cryptography cannot decode is a ValueError with a fixed message."""
        pair = pki.ca.issue(LeafSpec("undecodable", san_der=san_der))
        with pytest.raises(ValueError, match=f"^{re.escape(svid.NOT_DECODABLE)}$"):
            svid.read_presented(*leaf_and_chain(pair.cert_pem))

    def test_not_pem(self) -> None:
        """Bytes that are no certificate at all are a ValueError too."""
        with pytest.raises(ValueError, match=f"^{re.escape(svid.NOT_DECODABLE)}$"):
            svid.read_presented(b"not a certificate", b"")


class TestReadCaller:
    """read_caller: the outcome for one certificate, computed once and cached."""

    @pytest.mark.parametrize(
        ("cert", "source", "outcome"),
        [
            ("bff", SPIFFE, NamedCaller(BFF_ID, "example.org")),
            ("dns_only", DNS_SAN, NamedCaller(DNS_CALLER, "")),
            (
                "nul_in_uri_san",
                SPIFFE,
                UnnamedCaller("its URI SAN is not a SPIFFE ID", (f"{CHAT_ADMIN_ID}\x00.anything",)),
            ),
            (
                "nul_in_dns_san",
                DNS_SAN,
                UnnamedCaller("its DNS SAN is not a lower-case host name", (f"{DNS_CALLER}\x00.evil.com",)),
            ),
            ("ca_true_leaf", SPIFFE, UnnamedCaller(svid.CA_LEAF, (BFF_ID,))),
            ("ca_true_leaf", DNS_SAN, UnnamedCaller(svid.CA_LEAF, ())),
            ("undecodable_uri_san", SPIFFE, UnnamedCaller(svid.NOT_DECODABLE, ())),
            (
                "two_uri_sans",
                SPIFFE,
                UnnamedCaller("it must have exactly one URI SAN, a SPIFFE ID", (BFF_ID, CHAT_ADMIN_ID)),
            ),
            ("bff", DNS_SAN, UnnamedCaller("it must have exactly one DNS SAN", ())),
            ("dns_only", SPIFFE, UnnamedCaller("it must have exactly one URI SAN, a SPIFFE ID", ())),
        ],
    )
    def test_outcomes(self, pki: Pki, cert: str, source: CallerIdSource, outcome: NamedCaller | UnnamedCaller) -> None:
        """Each certificate names a caller in a mode, or is refused with a fixed reason and its SANs as written."""
        assert read_caller(source, *leaf_and_chain(pki.clients[cert].cert_pem)) == outcome

    @pytest.mark.parametrize(
        ("spec", "source", "caller_id"),
        [
            (LeafSpec("bff", uris=(BFF_ID,), dns_names=("bff.example.org", "bff")), SPIFFE, BFF_ID),
            (LeafSpec("billing", uris=(BFF_ID, CHAT_ADMIN_ID), dns_names=(DNS_CALLER,)), DNS_SAN, DNS_CALLER),
        ],
    )
    def test_other_san_kind_ignored(self, pki: Pki, spec: LeafSpec, source: CallerIdSource, caller_id: str) -> None:
        """DNS SANs beside the one URI SAN are fine in spiffe mode; URI SANs are ignored in dns_san mode."""
        outcome = read_caller(source, *leaf_and_chain(pki.ca.issue(spec).cert_pem))
        assert outcome == NamedCaller(caller_id, "example.org" if source is SPIFFE else "")

    def test_parsed_once(self, pki: Pki) -> None:
        """A certificate seen again is not parsed again: the outcome comes from the cache."""
        leaf, chain = leaf_and_chain(pki.ca.issue(LeafSpec("new", uris=(BFF_ID,))).cert_pem)
        before = read_caller.cache_info()
        first = read_caller(SPIFFE, leaf, chain)
        second = read_caller(SPIFFE, bytes(leaf), bytes(chain))
        after = read_caller.cache_info()
        assert first is second
        assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
        assert after.maxsize == 1024


class TestCallerCertRules:
    """Turning gRPC's auth context into a caller id."""

    SPIFFE_RULES = CallerCertRules(SPIFFE, frozenset({"example.org"}))

    def test_spiffe(self, pki: Pki) -> None:
        """The leaf's one SPIFFE ID, in a trusted domain, is the caller id."""
        assert self.SPIFFE_RULES.caller_id(auth_context(pki.clients["bff"].cert_pem)) == BFF_ID

    def test_grpc_properties_are_not_used(self, pki: Pki) -> None:
        """peer_spiffe_id (which gRPC cuts at a NUL) has no say: the certificate itself is read."""
        context = auth_context(pki.clients["nul_in_uri_san"].cert_pem)
        context["peer_spiffe_id"] = [CHAT_ADMIN_ID.encode()]
        with pytest.raises(CallerUnauthenticated) as caught:
            self.SPIFFE_RULES.caller_id(context)
        assert caught.value.message == "client certificate has no acceptable caller id: its URI SAN is not a SPIFFE ID"

    @pytest.mark.parametrize("context", [{}, {"peer_spiffe_id": [BFF_ID.encode()]}, {"x509_pem_cert": []}])
    def test_no_certificate(self, context: dict[str, list[bytes]]) -> None:
        """Without x509_pem_cert there is no caller, whatever else the context says."""
        with pytest.raises(CallerUnauthenticated) as caught:
            self.SPIFFE_RULES.caller_id(context)
        assert (
            caught.value.message
            == "client certificate has no acceptable caller id: gRPC passed on no client certificate"
        )
        assert caught.value.audit == {}

    def test_untrusted_domain(self, pki: Pki) -> None:
        """A valid SPIFFE ID from a trust domain not configured is refused, naming the domain."""
        with pytest.raises(CallerUnauthenticated) as caught:
            self.SPIFFE_RULES.caller_id(auth_context(pki.clients["foreign_trust_domain"].cert_pem))
        assert (
            caught.value.message
            == "client certificate has no acceptable caller id: trust domain evil.example is not trusted"
        )
        assert caught.value.audit == {"presented_san": "spiffe://evil.example/ns/web/sa/bff"}

    def test_fresh_error_each_time(self, pki: Pki) -> None:
        """A cached refusal raises a new error on every call, with the SAN escaped for the audit record only."""
        context = auth_context(pki.clients["nul_in_uri_san"].cert_pem)
        errors = []
        for _ in range(2):
            with pytest.raises(CallerUnauthenticated) as caught:
                self.SPIFFE_RULES.caller_id(context)
            errors.append(caught.value)
        assert errors[0] is not errors[1]
        assert errors[1].audit == {"presented_san": CHAT_ADMIN_ID + "\\x00.anything"}
        assert errors[1].metadata == {}
        assert "\x00" not in errors[1].message

    def test_dns(self, pki: Pki) -> None:
        """In dns_san mode the one DNS SAN is the caller id."""
        rules = CallerCertRules(DNS_SAN, frozenset())
        assert rules.caller_id(auth_context(pki.clients["dns_only"].cert_pem)) == DNS_CALLER


class TestTrustAnchors:
    """The path length of client_ca_file's CAs, which BoringSSL leaves to us."""

    @pytest.mark.parametrize(
        ("lengths", "allowed"), [((0,), 0), ((1,), 1), ((0, 2), 2), ((None,), None), ((0, None), None)]
    )
    def test_max_intermediates(self, lengths: tuple[int | None, ...], allowed: int | None) -> None:
        """The largest path length of the bundle's CAs; unlimited if any CA sets none."""
        bundle = b"".join(CertificateAuthority(f"ca {i}", path_length=n).cert_pem for i, n in enumerate(lengths))
        assert svid.TrustAnchors.from_pem(bundle).max_intermediates == allowed

    def test_anchors_sent_by_the_client_do_not_count(self) -> None:
        """A client that also sends the root has not presented an intermediate."""
        ca = CertificateAuthority("root", path_length=0)
        root_der = x509.load_pem_x509_certificate(ca.cert_pem).public_bytes(Encoding.DER)
        anchors = svid.TrustAnchors.from_pem(ca.cert_pem)
        assert not anchors.too_many_intermediates(frozenset({root_der}))
        assert anchors.too_many_intermediates(frozenset({root_der, b"an intermediate"}))


class TestValidityOnEveryCall:
    """A resumed TLS session skips the handshake's date check, so the caller id check does it on every call."""

    def test_expired_certificate_refused(self, pki: Pki) -> None:
        """An expired certificate in the auth context (as after a session resumption) names no caller."""
        with pytest.raises(CallerUnauthenticated) as caught:
            TestCallerCertRules.SPIFFE_RULES.caller_id(auth_context(pki.clients["expired"].cert_pem))
        assert caught.value.message == f"client certificate has no acceptable caller id: {svid.OUTSIDE_VALIDITY}"


class TestEachBundleForItsOwnTrustDomain:
    """With the Workload API's bundles, a caller's chain must lead to a CA of the trust domain its ID names."""

    OURS = CertificateAuthority("example.org CA", path_length=1)
    PARTNER = CertificateAuthority("partner.example CA", path_length=1)
    INTERMEDIATE = OURS.issue(
        LeafSpec("example.org intermediate", uris=("spiffe://example.org",), ca=True, key_cert_sign=True)
    )

    @classmethod
    def rules(cls) -> CallerCertRules:
        """Both trust domains accepted as callers, each with its own bundle, as svid_material builds them."""
        cas = [x509.load_pem_x509_certificate(ca.cert_pem) for ca in (cls.OURS, cls.PARTNER)]
        ders = [ca.public_bytes(Encoding.DER) for ca in cas]
        anchors = dataclasses.replace(
            svid.TrustAnchors.of(cas),
            by_trust_domain={"example.org": frozenset(ders[:1]), "partner.example": frozenset(ders[1:])},
            own_trust_domain="example.org",
        )
        return CallerCertRules(SPIFFE, frozenset({"example.org", "partner.example"}), lambda: anchors)

    def test_dns_callers_by_the_own_trust_domain_only(self) -> None:
        """In dns_san mode a DNS name is vouched for by the server's own trust domain's CAs, not a partner's."""
        rules = dataclasses.replace(self.rules(), source=DNS_SAN, trust_domains=frozenset())
        ours = self.OURS.issue(LeafSpec("billing", dns_names=(DNS_CALLER,)))
        assert rules.caller_id(auth_context(ours.cert_pem)) == DNS_CALLER
        with pytest.raises(CallerUnauthenticated) as caught:
            rules.caller_id(auth_context(self.PARTNER.issue(LeafSpec("billing", dns_names=(DNS_CALLER,))).cert_pem))
        assert caught.value.message.endswith(svid.DNS_NOT_FROM_OWN_TRUST_DOMAIN)

    def test_own_and_partner_callers(self) -> None:
        """Each trust domain's CA names its own workloads, directly or through an intermediate it signed."""
        rules = self.rules()
        partner = "spiffe://partner.example/ns/web/sa/bff"
        assert rules.caller_id(auth_context(self.OURS.issue(LeafSpec("bff", uris=(BFF_ID,))).cert_pem)) == BFF_ID
        through = self.OURS.issue(LeafSpec("bff", uris=(BFF_ID,)), issuer=self.INTERMEDIATE)
        assert rules.caller_id(auth_context(through.cert_pem)) == BFF_ID
        assert rules.caller_id(auth_context(self.PARTNER.issue(LeafSpec("p", uris=(partner,))).cert_pem)) == partner

    def test_partner_ca_cannot_name_our_workload(self) -> None:
        """The partner's CA signing a certificate for one of our IDs names nobody."""
        impostor = self.PARTNER.issue(LeafSpec("bff", uris=(BFF_ID,)))
        with pytest.raises(CallerUnauthenticated) as caught:
            self.rules().caller_id(auth_context(impostor.cert_pem))
        assert caught.value.message.endswith(svid.NOT_FROM_ITS_TRUST_DOMAIN)

    def test_our_intermediate_presented_beside_the_path_does_not_help(self) -> None:
        """Our genuine (public) intermediate sent along with a partner-signed leaf signed nothing of it."""
        impostor = self.PARTNER.issue(LeafSpec("bff", uris=(BFF_ID,)))
        context = auth_context(impostor.cert_pem + self.INTERMEDIATE.cert_pem)
        assert "x509_pem_cert_chain" in context
        with pytest.raises(CallerUnauthenticated):
            self.rules().caller_id(context)

    def test_a_trust_domain_without_a_bundle(self) -> None:
        """A trust domain accepted as callers but with no bundle from the agent vouches for nobody."""
        ours = x509.load_pem_x509_certificate(self.OURS.cert_pem)
        anchors = dataclasses.replace(
            svid.TrustAnchors.of([ours]), by_trust_domain={"example.org": frozenset({ours.public_bytes(Encoding.DER)})}
        )
        rules = CallerCertRules(SPIFFE, frozenset({"example.org", "partner.example"}), lambda: anchors)
        partner = self.PARTNER.issue(LeafSpec("p", uris=("spiffe://partner.example/ns/web/sa/bff",)))
        with pytest.raises(CallerUnauthenticated) as caught:
            rules.caller_id(auth_context(partner.cert_pem))
        assert caught.value.message.endswith(svid.NOT_FROM_ITS_TRUST_DOMAIN)
