"""SPIFFE ID parsing and DNS names: the value objects caller ids are made of."""

from __future__ import annotations

import pytest

from synctoken_server.errors import CallerUnauthenticated
from synctoken_server.identity import CallerIdentityRules, IdentitySource, SpiffeId, is_dns_name


class TestSpiffeId:
    """SpiffeId.parse follows the SPIFFE ID standard."""

    @pytest.mark.parametrize(
        ("text", "trust_domain", "path"),
        [
            ("spiffe://example.org/ns/web/sa/bff", "example.org", "/ns/web/sa/bff"),
            ("spiffe://example.org", "example.org", ""),
            ("spiffe://a-b_c.example/Path.With-Case_1", "a-b_c.example", "/Path.With-Case_1"),
        ],
    )
    def test_valid(self, text: str, trust_domain: str, path: str) -> None:
        """Valid ids parse into trust domain and case-sensitive path, and print back unchanged."""
        spiffe_id = SpiffeId.parse(text)
        assert (spiffe_id.trust_domain, spiffe_id.path) == (trust_domain, path)
        assert str(spiffe_id) == text

    @pytest.mark.parametrize(
        "text",
        [
            "https://example.org/a",
            "spiffe:/example.org/a",
            "SPIFFE://example.org/a",
            "spiffe://Example.org/a",
            "spiffe:///a",
            "spiffe://example.org/",
            "spiffe://example.org//a",
            "spiffe://example.org/a/./b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a%20b",
            "spiffe://user@example.org/a",
            "spiffe://example.org:443/a",
            "spiffe://example.org/a?q=1",
        ],
    )
    def test_invalid(self, text: str) -> None:
        """Malformed ids are refused with a message naming them."""
        with pytest.raises(ValueError, match="is not a SPIFFE ID"):
            SpiffeId.parse(text)


class TestDnsName:
    """is_dns_name accepts lower-case host names only."""

    @pytest.mark.parametrize("name", ["billing.internal.example.com", "a", "x-1.y"])
    def test_valid(self, name: str) -> None:
        """Ordinary host names pass."""
        assert is_dns_name(name)

    @pytest.mark.parametrize("name", ["", "Billing.example", "-a.example", "a..b", "*.example.com", "a" * 64 + ".b"])
    def test_invalid(self, name: str) -> None:
        """Upper case, wildcards, empty labels and over-long labels fail."""
        assert not is_dns_name(name)


class TestCallerIdentityRules:
    """Turning grpc's auth context into a caller id."""

    SPIFFE = CallerIdentityRules(IdentitySource.SPIFFE, frozenset({"example.org"}))

    def test_spiffe(self) -> None:
        """A single peer_spiffe_id in a trusted domain is the caller id."""
        assert self.SPIFFE.caller_id({"peer_spiffe_id": [b"spiffe://example.org/a"]}) == "spiffe://example.org/a"

    @pytest.mark.parametrize(
        "context",
        [
            {},
            {"peer_spiffe_id": [b"spiffe://example.org/a", b"spiffe://example.org/b"]},
            {"peer_spiffe_id": [b"spiffe://example.org/a/../b"]},
            {"peer_spiffe_id": [b"\xff"]},
            {"peer_spiffe_id": [b"spiffe://other.org/a"]},
            {"peer_dns": [b"a.example.org"]},
        ],
    )
    def test_spiffe_refusals(self, context: dict[str, list[bytes]]) -> None:
        """Missing, doubled, malformed or foreign SPIFFE ids are refused."""
        with pytest.raises(CallerUnauthenticated):
            self.SPIFFE.caller_id(context)

    def test_dns(self) -> None:
        """In dns_san mode the single peer_dns value is the caller id; URI SANs are ignored."""
        rules = CallerIdentityRules(IdentitySource.DNS_SAN, frozenset())
        context = {"peer_dns": [b"a.example.org"], "peer_spiffe_id": [b"spiffe://example.org/x"]}
        assert rules.caller_id(context) == "a.example.org"
