"""decide(): the pure policy decision, tested without a server."""

from __future__ import annotations

import unicodedata

import pytest
import regex
from google.protobuf import duration_pb2

from synctoken.v1 import token_service_pb2 as pb
from synctoken_server.errors import CallerNotAllowed, IdentityNotAllowed, InvalidRequest, ServiceNotAllowed
from synctoken_server.policy.characters import _first_refused, text_violations
from synctoken_server.policy.patterns import IdentityPattern
from synctoken_server.policy.rules import CallerRule, Grant, Policy, decide

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
        assert grant == Grant(
            rule="spiffe://t/team/*", identity="alice", service_sid=SVC_2, endpoint_id="", ttl=3600, region=""
        )

    def test_explicit(self) -> None:
        """Explicit service, TTL, endpoint and region are carried through."""
        request = pb.IssueTokenRequest(
            identity="alice",
            sync=pb.SyncGrant(service_sid=SVC_2, endpoint_id="dev-1"),
            ttl=duration_pb2.Duration(seconds=7200),
            region="au1",
        )
        grant = decide(POLICY, "spiffe://t/team/svc/x", request)
        assert grant == Grant(
            rule="spiffe://t/team/svc/*",
            identity="alice",
            service_sid=SVC_2,
            endpoint_id="dev-1",
            ttl=7200,
            region="au1",
        )

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


UNASSIGNED = f"unassigned in Unicode {unicodedata.unidata_version}"
# One or more of every kind of character refused, each with the message that names it.
REFUSED = [
    ("\x00", "U+0000 (a control character)"),
    ("\n", "U+000A (a control character)"),
    ("\x7f", "U+007F (a control character)"),
    ("\x85", "U+0085 (a control character)"),
    ("\u00ad", "U+00AD SOFT HYPHEN (a format character)"),
    ("\u200b", "U+200B ZERO WIDTH SPACE (a format character)"),
    ("\u200d", "U+200D ZERO WIDTH JOINER (a format character)"),
    ("\u202e", "U+202E RIGHT-TO-LEFT OVERRIDE (a format character)"),
    ("\u2066", "U+2066 LEFT-TO-RIGHT ISOLATE (a format character)"),
    ("\ufeff", "U+FEFF ZERO WIDTH NO-BREAK SPACE (a format character)"),
    ("\u180e", "U+180E MONGOLIAN VOWEL SEPARATOR (a format character)"),
    ("\U000e0041", "U+E0041 TAG LATIN CAPITAL LETTER A (a format character)"),
    ("\u00a0", "U+00A0 NO-BREAK SPACE (a space other than U+0020)"),
    ("\u1680", "U+1680 OGHAM SPACE MARK (a space other than U+0020)"),
    ("\u2002", "U+2002 EN SPACE (a space other than U+0020)"),
    ("\u2007", "U+2007 FIGURE SPACE (a space other than U+0020)"),
    ("\u202f", "U+202F NARROW NO-BREAK SPACE (a space other than U+0020)"),
    ("\u205f", "U+205F MEDIUM MATHEMATICAL SPACE (a space other than U+0020)"),
    ("\u3000", "U+3000 IDEOGRAPHIC SPACE (a space other than U+0020)"),
    ("\u2028", "U+2028 LINE SEPARATOR (a line separator)"),
    ("\u2029", "U+2029 PARAGRAPH SEPARATOR (a paragraph separator)"),
    ("\ue000", "U+E000 (a private-use character)"),
    ("\uf8ff", "U+F8FF (a private-use character)"),
    ("\U000f0000", "U+F0000 (a private-use character)"),
    ("\U0010fffd", "U+10FFFD (a private-use character)"),
    ("\u0378", f"U+0378 ({UNASSIGNED})"),
    ("\u2065", f"U+2065 ({UNASSIGNED})"),
    ("\U0003fffd", f"U+3FFFD ({UNASSIGNED})"),
    ("\U000e0080", f"U+E0080 ({UNASSIGNED})"),
    ("\U00050000", f"U+50000 ({UNASSIGNED})"),
    ("\ufdd0", "U+FDD0 (a noncharacter)"),
    ("\ufdef", "U+FDEF (a noncharacter)"),
    ("\ufffe", "U+FFFE (a noncharacter)"),
    ("\uffff", "U+FFFF (a noncharacter)"),
    ("\U0001fffe", "U+1FFFE (a noncharacter)"),
    ("\U0010ffff", "U+10FFFF (a noncharacter)"),
    ("\u3164", "U+3164 HANGUL FILLER (an invisible character)"),
    ("\u115f", "U+115F HANGUL CHOSEONG FILLER (an invisible character)"),
    ("\u1160", "U+1160 HANGUL JUNGSEONG FILLER (an invisible character)"),
    ("\uffa0", "U+FFA0 HALFWIDTH HANGUL FILLER (an invisible character)"),
    ("\u034f", "U+034F COMBINING GRAPHEME JOINER (an invisible character)"),
    ("\u17b4", "U+17B4 KHMER VOWEL INHERENT AQ (an invisible character)"),
    ("\u180b", "U+180B MONGOLIAN FREE VARIATION SELECTOR ONE (an invisible character)"),
    ("\ufe00", "U+FE00 VARIATION SELECTOR-1 (an invisible character)"),
    ("\ufe0f", "U+FE0F VARIATION SELECTOR-16 (an invisible character)"),
    ("\U000e0100", "U+E0100 VARIATION SELECTOR-17 (an invisible character)"),
    ("\U000e01ef", "U+E01EF VARIATION SELECTOR-256 (an invisible character)"),
    ("\u2800", "U+2800 BRAILLE PATTERN BLANK (renders as blank space)"),
    ("\U0001d159", "U+1D159 MUSICAL SYMBOL NULL NOTEHEAD (renders as blank space)"),
    ("\U00016fe4", "U+16FE4 KHITAN SMALL SCRIPT FILLER (renders as blank space)"),
]


def violations(caller: str, request: pb.IssueTokenRequest) -> list[tuple[str, str]]:
    """The (field, description) pairs decide() refuses `request` with."""
    with pytest.raises(InvalidRequest) as caught:
        decide(POLICY, caller, request)
    return [(v.field, v.description) for v in caught.value.violations]


class TestCharacterRules:
    """Identities and endpoint ids hold visible, assigned, NFC text, with spaces only inside."""

    @pytest.mark.parametrize(("char", "named"), REFUSED)
    def test_refused_in_identity(self, char: str, named: str) -> None:
        """Each refused character is reported by code point, name and kind."""
        assert violations("spiffe://t/team/x", ask(f"a{char}b")) == [("identity", f"must not contain {named}")]

    @pytest.mark.parametrize(("char", "named"), REFUSED)
    def test_refused_in_endpoint_id(self, char: str, named: str) -> None:
        """The endpoint id goes into the token too, so the same rules hold for it."""
        request = pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant(endpoint_id=f"dev{char}1"))
        assert violations("spiffe://t/team/x", request) == [("sync.endpoint_id", f"must not contain {named}")]

    @pytest.mark.parametrize(
        ("char", "named"), [("\ud800", "U+D800 (a surrogate)"), ("\udfff", "U+DFFF (a surrogate)")]
    )
    def test_surrogates(self, char: str, named: str) -> None:
        """Surrogates, which protobuf's UTF-8 check already keeps out of requests, are refused by the rules too."""
        assert [v.description for v in text_violations("identity", f"a{char}b", 256)] == [f"must not contain {named}"]

    def test_first_refused_character_is_named(self) -> None:
        """With several refused characters, the first is named."""
        assert violations("spiffe://t/team/x", ask("a\u3164b\u00a0c")) == [
            ("identity", "must not contain U+3164 HANGUL FILLER (an invisible character)")
        ]

    @pytest.mark.parametrize("identity", [" alice", "alice ", " ", "  a  ", "\u00e9 "])
    def test_no_space_at_either_end(self, identity: str) -> None:
        """A leading or trailing U+0020 is refused: two identities must not differ by an invisible space."""
        assert violations("spiffe://t/team/x", ask(identity)) == [("identity", "must not begin or end with a space")]

    @pytest.mark.parametrize(
        ("identity", "named"),
        [
            ("e\u0301", "U+0301 COMBINING ACUTE ACCENT"),
            ("cafe\u0301", "U+0301 COMBINING ACUTE ACCENT"),
            ("A\u030a", "U+030A COMBINING RING ABOVE"),
            ("\u1100\u1161", "U+1161 HANGUL JUNGSEONG A"),
            ("\u212a", "U+212A KELVIN SIGN"),
            ("\u2126", "U+2126 OHM SIGN"),
            ("\u0958", "U+0958 DEVANAGARI LETTER QA"),
            ("x\u0301\u0327", "U+0327 COMBINING CEDILLA"),  # out of canonical order
        ],
    )
    def test_nfc_only(self, identity: str, named: str) -> None:
        """Text not in NFC is refused, naming where it stops being NFC: one identity, one spelling."""
        assert violations("spiffe://t/team/x", ask(identity)) == [
            ("identity", f"must be in Unicode normalization form NFC; {named} is not")
        ]

    def test_every_rule_at_once(self) -> None:
        """A refused character, a trailing space and NFD are three violations, reported together."""
        assert violations("spiffe://t/team/x", ask("\u00a0e\u0301 ")) == [
            ("identity", "must not contain U+00A0 NO-BREAK SPACE (a space other than U+0020)"),
            ("identity", "must not begin or end with a space"),
            ("identity", "must be in Unicode normalization form NFC; U+0301 COMBINING ACUTE ACCENT is not"),
        ]

    @pytest.mark.parametrize(
        "identity", ["Ana Mar\u00eda", "a  b", "\u00c5ngstr\u00f6m", "\U0001f600", "\U0001f44d\U0001f3fd", "\u00b2"]
    )
    def test_visible_text_passes(self, identity: str) -> None:
        """Inner spaces, precomposed letters, emoji and modifiers are all visible, assigned NFC text."""
        assert decide(POLICY, "spiffe://t/team/x", ask(identity)).identity == identity

    def test_every_code_point(self) -> None:
        """Brute force: a code point is refused exactly when it is C*, Z* bar U+0020, default-ignorable, or blank."""
        everything = "".join(map(chr, range(0x110000)))
        # Planes 4 to 13 are wholly unassigned, so one rule covers them (U+50000
        # stands for them in REFUSED); checking them one by one would take seconds.
        assert {unicodedata.category(c) for c in everything[0x40000:0xE0000]} == {"Cn"}
        codes = [*range(0x40000), *range(0xE0000, 0x110000)]
        ignorable = {m.start() for m in regex.finditer(r"\p{Default_Ignorable_Code_Point}", everything)}
        blank = {0x2800, 0x1D159, 0x16FE4}
        expected = {
            code
            for code in codes
            if (unicodedata.category(everything[code])[0] in "CZ" and code != 0x20)
            or code in ignorable
            or code in blank
        }

        def is_refused(char: str) -> bool:
            if char.isascii():  # through the fast path, as requests take it
                return any(v.description.startswith("must not contain") for v in text_violations("identity", char, 256))
            return _first_refused(char) is not None

        assert {code for code in codes if is_refused(everything[code])} == expected
