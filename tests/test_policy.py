"""decide(): the pure policy decision, tested without a server."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2

from synctoken.v1 import token_service_pb2 as pb
from synctoken_server.errors import CallerNotAllowed, IdentityNotAllowed, InvalidRequest, ServiceNotAllowed
from synctoken_server.patterns import IdentityPattern
from synctoken_server.policy import CallerRule, Grant, Policy, decide

SVC_1 = "IS" + "1" * 32
SVC_2 = "IS" + "2" * 32


def rule(caller: str, **overrides: object) -> CallerRule:
    """A caller rule with plain defaults."""
    fields: dict[str, object] = {
        "caller": caller,
        "sync_services": (SVC_1,),
        "default_sync_service": SVC_1,
        "identity_pattern": None,
        "allowed_identity_characters": frozenset(),
        "default_ttl": 3600,
        "max_ttl": 7200,
    }
    return CallerRule(**(fields | overrides))  # type: ignore[arg-type]


POLICY = Policy(
    [
        rule("spiffe://t/team/*", sync_services=(SVC_2,), default_sync_service=SVC_2),
        rule("spiffe://t/team/svc/*", sync_services=(SVC_1, SVC_2)),
        rule("spiffe://t/team/svc/exact", identity_pattern=IdentityPattern.compile("u[0-9]+")),
        rule("spiffe://t/mail", allowed_identity_characters=frozenset("@.")),
        rule("spiffe://t/names", identity_pattern=IdentityPattern.compile(r"(?i)[a-z]+(-\d+)?")),
    ]
)


def ask(identity: str = "alice", service: str = "", **kwargs: object) -> pb.IssueTokenRequest:
    """A request with a Sync grant."""
    return pb.IssueTokenRequest(identity=identity, sync=pb.SyncGrant(service_sid=service), **kwargs)  # type: ignore[arg-type]


class TestRuleLookup:
    """Which rule applies to a caller."""

    @pytest.mark.parametrize(
        ("caller", "matched"),
        [
            ("spiffe://t/team/svc/exact", "spiffe://t/team/svc/exact"),
            ("spiffe://t/team/svc/other", "spiffe://t/team/svc/*"),
            ("spiffe://t/team/svc/a/b", "spiffe://t/team/svc/*"),
            ("spiffe://t/team/x", "spiffe://t/team/*"),
            ("spiffe://t/mail", "spiffe://t/mail"),
        ],
    )
    def test_most_specific_wins(self, caller: str, matched: str) -> None:
        """Exact beats prefix; a longer prefix beats a shorter one."""
        found = POLICY.rule_for(caller)
        assert found is not None
        assert found.caller == matched

    @pytest.mark.parametrize(
        "caller",
        ["spiffe://t/team", "spiffe://t/team/", "spiffe://t/teams/x", "spiffe://t/mail/x", "spiffe://u/team/x", ""],
    )
    def test_no_match(self, caller: str) -> None:
        """A prefix needs a non-empty remainder after its slash; nothing else matches loosely."""
        assert POLICY.rule_for(caller) is None


class TestDecide:
    """Grants and refusals."""

    def test_defaults(self) -> None:
        """An empty service and unset TTL take the rule's defaults."""
        grant = decide(POLICY, "spiffe://t/team/x", ask())
        assert grant == Grant(identity="alice", service_sid=SVC_2, endpoint_id="", ttl=3600, region="")

    def test_explicit(self) -> None:
        """Explicit service, TTL, endpoint and region are carried through."""
        request = pb.IssueTokenRequest(
            identity="alice",
            sync=pb.SyncGrant(service_sid=SVC_2, endpoint_id="dev-1"),
            ttl=duration_pb2.Duration(seconds=7200),
            region="au1",
        )
        grant = decide(POLICY, "spiffe://t/team/svc/x", request)
        assert grant == Grant(identity="alice", service_sid=SVC_2, endpoint_id="dev-1", ttl=7200, region="au1")

    def test_unknown_caller_first(self) -> None:
        """An unknown caller is refused before its request is looked at."""
        with pytest.raises(CallerNotAllowed):
            decide(POLICY, "spiffe://t/nobody", pb.IssueTokenRequest())

    def test_service_not_allowed(self) -> None:
        """A service outside the caller's list is refused."""
        with pytest.raises(ServiceNotAllowed):
            decide(POLICY, "spiffe://t/team/x", ask(service=SVC_1))

    @pytest.mark.parametrize(("identity", "allowed"), [("u1", True), ("u123", True), ("u", False), ("xu1", False)])
    def test_identity_pattern_is_full_match(self, identity: str, allowed: bool) -> None:
        """The identity pattern must match the whole identity."""
        if allowed:
            assert decide(POLICY, "spiffe://t/team/svc/exact", ask(identity)).identity == identity
        else:
            with pytest.raises(IdentityNotAllowed):
                decide(POLICY, "spiffe://t/team/svc/exact", ask(identity))

    @pytest.mark.parametrize(
        ("identity", "allowed"),
        [
            ("Sam", True),
            ("sam-12", True),
            ("\u017fam", False),  # LONG S: RE2 alone would fold it onto s
            ("sam-\u0661\u0662", False),  # Arabic-Indic digits are no \d
            ("s\u00e4m", False),
        ],
    )
    def test_identity_pattern_has_ascii_semantics(self, identity: str, allowed: bool) -> None:
        """\\d is 0-9 and (?i) folds ASCII letters only, as with Python's re.ASCII."""
        if allowed:
            assert decide(POLICY, "spiffe://t/names", ask(identity)).identity == identity
        else:
            with pytest.raises(IdentityNotAllowed):
                decide(POLICY, "spiffe://t/names", ask(identity))

    @pytest.mark.parametrize("char", list("!*'();:@&=+$,/?%#[]"))
    def test_every_reserved_character_refused(self, char: str) -> None:
        """Each URI-reserved character Twilio warns about is refused by default."""
        with pytest.raises(InvalidRequest) as caught:
            decide(POLICY, "spiffe://t/team/x", ask(f"a{char}b"))
        assert [v.field for v in caught.value.violations] == ["identity"]

    def test_allowed_characters_only(self) -> None:
        """A rule's allowed characters are allowed; other reserved ones still are not."""
        assert decide(POLICY, "spiffe://t/mail", ask("a.b@example.com")).identity == "a.b@example.com"
        with pytest.raises(InvalidRequest):
            decide(POLICY, "spiffe://t/mail", ask("a+b@example.com"))

    @pytest.mark.parametrize("identity", ["José", "用户", "a b", "a-b_c.d~e"])
    def test_plain_identities_pass(self, identity: str) -> None:
        """Non-ASCII letters, spaces and unreserved punctuation are fine."""
        assert decide(POLICY, "spiffe://t/team/x", ask(identity)).identity == identity

    def test_length_limit_is_in_characters(self) -> None:
        """256 characters pass even when they are many more UTF-8 bytes."""
        assert decide(POLICY, "spiffe://t/team/x", ask("é" * 256)).identity == "é" * 256
        with pytest.raises(InvalidRequest):
            decide(POLICY, "spiffe://t/team/x", ask("é" * 257))

    @pytest.mark.parametrize(("seconds", "ok"), [(180, True), (7200, True), (7201, False), (179, False)])
    def test_ttl_bounds(self, seconds: int, ok: bool) -> None:
        """TTL between 3 minutes and the caller's max, inclusive."""
        request = ask(ttl=duration_pb2.Duration(seconds=seconds))
        if ok:
            assert decide(POLICY, "spiffe://t/team/x", request).ttl == seconds
        else:
            with pytest.raises(InvalidRequest):
                decide(POLICY, "spiffe://t/team/x", request)
