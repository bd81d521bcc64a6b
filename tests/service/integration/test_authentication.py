"""Caller identity comes from the verified client certificate, and only from it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from support.calls import rpc_error
from support.configs import config_text
from support.constants import BFF_ID, CHAT_ADMIN_ID, DNS_CALLER, SERVICE_A
from support.inprocess import Client, ServerHarness
from support.logcapture import LogSink
from synctoken.v1 import token_service_pb2 as pb

Connect = Callable[[str | None], Client]

REQUEST = pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant())
DNS_IDENTITY = '[identity]\nsource = "dns_san"\n'
# In the audit record, each SAN as received with unicode_escape: a NUL is the four characters \x00.
NUL_URI_SAN = CHAT_ADMIN_ID + "\\x00.anything"
NUL_DNS_SAN = DNS_CALLER + "\\x00.evil.com"


def refused(client: Client, log_sink: LogSink, why: str) -> dict[str, Any]:
    """IssueToken fails UNAUTHENTICATED with CALLER_UNAUTHENTICATED and `why`; return the denial's audit record."""
    start = len(log_sink.lines)
    error, info, _ = rpc_error(lambda: client.issue(REQUEST))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.reason == "CALLER_UNAUTHENTICATED"
    assert error.details() == f"client certificate has no acceptable caller id: {why}"
    assert not info.metadata, "the presented SAN is for the audit log, not the caller"
    [record] = [r for r in log_sink.records(start) if r["event"] == "token.decision"]
    assert (record["outcome"], record["reason"]) == ("denied", "CALLER_UNAUTHENTICATED")
    assert "caller_id" not in record
    assert "token_id" not in record
    return record


class TestTlsRefusals:
    """Peers that fail the TLS handshake never reach an RPC."""

    @pytest.mark.parametrize("cert", [None, "foreign_ca", "expired", "issued_by_plain_leaf"])
    def test_handshake_refused(self, connect: Connect, cert: str | None) -> None:
        """No client certificate, one from another CA, an expired one, or one signed by a CA:FALSE leaf: no connection."""
        with pytest.raises(grpc.RpcError) as caught:
            connect(cert).issue(REQUEST)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


class TestUnauthenticated:
    """Certificates our CA signed that carry no acceptable caller id."""

    @pytest.mark.parametrize(
        ("cert", "why"),
        [
            ("two_uri_sans", "it must have exactly one URI SAN, a SPIFFE ID"),
            ("spiffe_and_https_uri", "it must have exactly one URI SAN, a SPIFFE ID"),
            ("no_san", "it must have exactly one URI SAN, a SPIFFE ID"),
            ("dns_only", "it must have exactly one URI SAN, a SPIFFE ID"),
            ("foreign_trust_domain", "trust domain evil.example is not trusted"),
        ],
    )
    def test_refused(self, connect: Connect, cert: str, why: str) -> None:
        """The RPC fails UNAUTHENTICATED with CALLER_UNAUTHENTICATED and no token."""
        error, info, _ = rpc_error(lambda: connect(cert).issue(REQUEST))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert info.reason == "CALLER_UNAUTHENTICATED"
        assert error.details() == f"client certificate has no acceptable caller id: {why}"

    def test_whoami_refused_too(self, connect: Connect) -> None:
        """GetCallerIdentity also refuses a peer without an acceptable id."""
        error, info, _ = rpc_error(lambda: connect("no_san").whoami())
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert info.reason == "CALLER_UNAUTHENTICATED"

    def test_several_sans_audited(self, connect: Connect, log_sink: LogSink) -> None:
        """A certificate with two URI SANs has both in the audit record, in order."""
        record = refused(connect("two_uri_sans"), log_sink, "it must have exactly one URI SAN, a SPIFFE ID")
        assert record["presented_sans"] == [BFF_ID, CHAT_ADMIN_ID]
        assert "presented_san" not in record


class TestForgedOrMisissued:
    """Certificates our CA signed (or that chain to it) whose one SAN must not be taken at gRPC's word."""

    @pytest.mark.parametrize(
        ("cert", "why", "presented_san"),
        [
            ("nul_in_uri_san", "its URI SAN is not a SPIFFE ID", NUL_URI_SAN),
            ("newline_after_uri_san", "its URI SAN is not a SPIFFE ID", BFF_ID + "\\n"),
            ("upper_case_trust_domain", "its URI SAN is not a SPIFFE ID", "spiffe://EXAMPLE.org/ns/web/sa/bff"),
            (
                "trust_domain_only_uri_san",
                "its SPIFFE ID names a trust domain, not a workload (it has no path)",
                "spiffe://example.org",
            ),
            ("foreign_trust_domain", "trust domain evil.example is not trusted", "spiffe://evil.example/ns/web/sa/bff"),
            ("ca_true_leaf", "it is a CA certificate (CA:TRUE), not a workload's", BFF_ID),
            (
                "key_cert_sign_leaf",
                "its key usage includes keyCertSign, which only a CA certificate may have",
                BFF_ID,
            ),
            ("crl_sign_leaf", "its key usage includes cRLSign, which only a CA certificate may have", BFF_ID),
            (
                "weak_rsa_key",
                (
                    "its key is an RSA key of fewer than 2048 bits, too weak (callers present RSA keys of 2048 bits "
                    "or more and ECDSA keys on P-256 or P-384)"
                ),
                BFF_ID,
            ),
            (
                "issued_by_workload",
                "a certificate in the chain it presented names a workload (a SAN other than its trust domain's SPIFFE ID)",
                CHAT_ADMIN_ID,
            ),
            (
                "issued_by_intermediate_past_path_length",
                "it presented more intermediate CA certificates than the path length of client_ca_file allows",
                CHAT_ADMIN_ID,
            ),
            (
                "issued_by_ca_without_key_cert_sign",
                "a certificate in the chain it presented is not a CA's (it needs CA:TRUE and keyCertSign)",
                CHAT_ADMIN_ID,
            ),
        ],
    )
    def test_refused(self, connect: Connect, log_sink: LogSink, cert: str, why: str, presented_san: str) -> None:
        """UNAUTHENTICATED with no token; the audit record has the SAN as received, escaped, never a cleaned-up one."""
        record = refused(connect(cert), log_sink, why)
        assert record["presented_san"] == presented_san

    def test_undecodable_san(self, connect: Connect, log_sink: LogSink) -> None:
        """A SAN that cryptography cannot decode is UNAUTHENTICATED, not INTERNAL, and nothing of it is echoed."""
        record = refused(
            connect("undecodable_uri_san"), log_sink, "its certificate or the chain it presented cannot be decoded"
        )
        assert "presented_san" not in record

    def test_whoami_audits_presented_san(self, connect: Connect, log_sink: LogSink) -> None:
        """GetCallerIdentity refuses a NUL in the SAN too, and its caller.lookup record shows it escaped."""
        start = len(log_sink.lines)
        error, info, _ = rpc_error(lambda: connect("nul_in_uri_san").whoami())
        assert (error.code(), info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNAUTHENTICATED")
        assert error.details() == "client certificate has no acceptable caller id: its URI SAN is not a SPIFFE ID"
        [record] = [r for r in log_sink.records(start) if r["event"] == "caller.lookup"]
        assert record["presented_san"] == NUL_URI_SAN


class TestChainsUnderCaWithoutPathLength:
    """With a trusted CA that sets no path length, BoringSSL accepts chains through any CA:TRUE certificate."""

    @pytest.fixture
    def open_ca_server(self, harness: ServerHarness) -> Callable[[str], Client]:
        """A server trusting open-ca.pem for client certificates; returns a client factory."""
        d = harness.pki.directory
        server = harness.start(config_text(harness.pki).replace(str(d / "ca.pem"), str(d / "open-ca.pem")))
        return lambda cert: harness.client(server, cert)

    def test_issued_by_workload_refused(self, open_ca_server: Callable[[str], Client], log_sink: LogSink) -> None:
        """A workload's CA:TRUE certificate signing an admin's: the chain verifies, the caller is refused."""
        why = "a certificate in the chain it presented names a workload (a SAN other than its trust domain's SPIFFE ID)"
        record = refused(open_ca_server("issued_by_workload_under_open_ca"), log_sink, why)
        assert record["presented_san"] == CHAT_ADMIN_ID

    def test_issued_by_dns_named_workload_refused(
        self, open_ca_server: Callable[[str], Client], log_sink: LogSink
    ) -> None:
        """A CA:TRUE certificate naming a DNS workload is a workload's too: what it signs is refused."""
        why = "a certificate in the chain it presented names a workload (a SAN other than its trust domain's SPIFFE ID)"
        record = refused(open_ca_server("issued_by_dns_named_workload_under_open_ca"), log_sink, why)
        assert record["presented_san"] == CHAT_ADMIN_ID

    def test_dns_san_mode_issued_by_dns_named_workload_refused(self, harness: ServerHarness, log_sink: LogSink) -> None:
        """In dns_san mode, a DNS-named workload made a CA cannot sign for another DNS caller."""
        d = harness.pki.directory
        text = config_text(harness.pki, identity=DNS_IDENTITY, policy=TestDnsSanSource.POLICY)
        server = harness.start(text.replace(str(d / "ca.pem"), str(d / "open-ca.pem")))
        why = "a certificate in the chain it presented names a workload (a SAN other than its trust domain's SPIFFE ID)"
        record = refused(harness.client(server, "dns_caller_issued_by_dns_named_workload_under_open_ca"), log_sink, why)
        assert record["presented_san"] == DNS_CALLER

    def test_issued_by_intermediate_accepted(self, open_ca_server: Callable[[str], Client]) -> None:
        """A real intermediate CA (CA:TRUE, keyCertSign, only its trust domain's id) is fine."""
        client = open_ca_server("issued_by_intermediate_under_open_ca")
        assert client.whoami().caller_id == CHAT_ADMIN_ID


class TestMetadataIsIgnored:
    """Nothing a caller sends can change who it is."""

    def test_claimed_identity_in_metadata(self, connect: Connect) -> None:
        """A stranger claiming the BFF's id in metadata is still the stranger."""
        client = connect("stranger")
        forged: tuple[tuple[str, str | bytes], ...] = (
            ("x-spiffe-id", BFF_ID),
            ("authorization", f"Bearer {BFF_ID}"),
        )
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.IssueToken(REQUEST, metadata=forged, timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        response = client.stub.GetCallerIdentity(pb.GetCallerIdentityRequest(), metadata=forged, timeout=10)
        assert response.caller_id != BFF_ID

    def test_forwarded_client_cert_refused(self, connect: Connect) -> None:
        """x-forwarded-client-cert on the mTLS listener is neither used nor ignored: the call is refused."""
        client = connect("stranger")
        forged: tuple[tuple[str, str | bytes], ...] = (("x-forwarded-client-cert", f"URI={BFF_ID}"),)
        for call in (
            lambda: client.stub.IssueToken(REQUEST, metadata=forged, timeout=10),
            lambda: client.stub.GetCallerIdentity(pb.GetCallerIdentityRequest(), metadata=forged, timeout=10),
        ):
            error, info, _ = rpc_error(call)
            assert (error.code(), info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "FORWARDED_CLIENT_CERT_UNTRUSTED")


class TestDnsSanSource:
    """With identity.source = "dns_san", the caller is its single DNS SAN."""

    POLICY = f"""
[[callers]]
id = "{DNS_CALLER}"
sync_services = ["{SERVICE_A}"]
default_sync_service = "{SERVICE_A}"
"""

    def test_dns_caller_issues(self, harness: ServerHarness) -> None:
        """A certificate with one DNS SAN in the policy gets a token."""
        server = harness.start(config_text(harness.pki, identity=DNS_IDENTITY, policy=self.POLICY))
        client = harness.client(server, "dns_only")
        assert client.whoami().caller_id == DNS_CALLER
        assert client.issue(REQUEST).token

    @pytest.mark.parametrize(
        ("cert", "why"),
        [("two_dns_sans", "it must have exactly one DNS SAN"), ("bff", "it must have exactly one DNS SAN")],
    )
    def test_refused(self, harness: ServerHarness, cert: str, why: str) -> None:
        """Two DNS SANs, or none, is no caller id."""
        server = harness.start(config_text(harness.pki, identity=DNS_IDENTITY, policy=self.POLICY))
        error, info, _ = rpc_error(lambda: harness.client(server, cert).issue(REQUEST))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error.details() == f"client certificate has no acceptable caller id: {why}"
        assert info.reason == "CALLER_UNAUTHENTICATED"

    @pytest.mark.parametrize(
        ("cert", "why", "presented_san"),
        [
            ("nul_in_dns_san", "its DNS SAN is not a lower-case host name", NUL_DNS_SAN),
            ("ca_true_leaf", "it is a CA certificate (CA:TRUE), not a workload's", None),
        ],
    )
    def test_forged_or_misissued(
        self, harness: ServerHarness, log_sink: LogSink, cert: str, why: str, presented_san: str | None
    ) -> None:
        """A NUL in the DNS SAN, or a CA certificate, is refused; the audit record has the DNS SAN as received."""
        server = harness.start(config_text(harness.pki, identity=DNS_IDENTITY, policy=self.POLICY))
        record = refused(harness.client(server, cert), log_sink, why)
        assert record.get("presented_san") == presented_san
