"""SPIFFE ID parsing and DNS names: the value objects caller ids are made of."""

from __future__ import annotations

import pytest

from synctoken_server.errors import CallerUnauthenticated
from synctoken_server.identity import (
    SPIFFE_ID_FORM,
    TRUST_DOMAIN_FORM,
    CallerIdentityRules,
    IdentitySource,
    is_dns_name,
    parse_spiffe_id,
    parse_trust_domain,
)


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
