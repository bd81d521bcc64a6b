"""Caller identity comes from the verified client certificate, and only from it."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from support import BFF_ID, DNS_CALLER, SERVICE_A, Client, ServerHarness, config_text, rpc_error
from synctoken.v1 import token_service_pb2 as pb

Connect = Callable[[str | None], Client]

REQUEST = pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant())


class TestTlsRefusals:
    """Peers that fail the TLS handshake never reach an RPC."""

    @pytest.mark.parametrize("cert", [None, "foreign_ca", "expired"])
    def test_handshake_refused(self, connect: Connect, cert: str | None) -> None:
        """No client certificate, one from another CA, or an expired one: the connection fails."""
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


class TestMetadataIsIgnored:
    """Nothing a caller sends can change who it is."""

    def test_claimed_identity_in_metadata(self, connect: Connect) -> None:
        """A stranger claiming the BFF's id in metadata is still the stranger."""
        client = connect("stranger")
        forged: tuple[tuple[str, str | bytes], ...] = (
            ("x-forwarded-client-cert", f"URI={BFF_ID}"),
            ("x-spiffe-id", BFF_ID),
            ("authorization", f"Bearer {BFF_ID}"),
        )
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.IssueToken(REQUEST, metadata=forged, timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        response = client.stub.GetCallerIdentity(pb.GetCallerIdentityRequest(), metadata=forged, timeout=10)
        assert response.caller_id != BFF_ID


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
        text = config_text(harness.pki, identity='[identity]\nsource = "dns_san"\n', policy=self.POLICY)
        server = harness.start(text)
        client = harness.client(server, "dns_only")
        assert client.whoami().caller_id == DNS_CALLER
        assert client.issue(REQUEST).token

    @pytest.mark.parametrize(
        ("cert", "why"),
        [("two_dns_sans", "it must have exactly one DNS SAN"), ("bff", "it must have exactly one DNS SAN")],
    )
    def test_refused(self, harness: ServerHarness, cert: str, why: str) -> None:
        """Two DNS SANs, or none, is no caller id."""
        text = config_text(harness.pki, identity='[identity]\nsource = "dns_san"\n', policy=self.POLICY)
        server = harness.start(text)
        error, info, _ = rpc_error(lambda: harness.client(server, cert).issue(REQUEST))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error.details() == f"client certificate has no acceptable caller id: {why}"
        assert info.reason == "CALLER_UNAUTHENTICATED"
