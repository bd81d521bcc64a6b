"""Identity patterns: RE2 syntax, Python re.ASCII semantics, refused where RE2 or this service cannot honour them."""

from __future__ import annotations

import re
import string

import pytest

from synctoken_server.policy.patterns import IdentityPattern, PatternError, _fold_ascii

ASCII_LETTERS = frozenset(string.ascii_letters)
# Every code point a str can hold as UTF-8, so every one an identity can hold.
EVERY_CHARACTER = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
NOT_ASCII_LETTERS = "".join(c for c in EVERY_CHARACTER if c not in ASCII_LETTERS)


def matches(pattern: str, text: str) -> bool:
    """Whether the whole of `text` matches `pattern`."""
    return IdentityPattern.compile(pattern).matches(text)


class TestAsciiSemantics:
    """Classes and case folding mean what they mean under Python's re.ASCII."""

    @pytest.mark.parametrize(
        ("pattern", "text", "expected"),
        [
            (r"user-\d+", "user-123", True),
            (r"user-\d+", "user-\u0661\u0662\u0663", False),  # Arabic-Indic digits
            (r"user-\d+", "user-\uff11\uff12", False),  # fullwidth digits
            (r"user-\d+", "user-\u0967", False),  # Devanagari one
            (r"[\w.-]+@example\.com", "bob@example.com", True),
            (r"[\w.-]+@example\.com", "b\u043eb@example.com", False),  # Cyrillic o
            (r"[\w.-]+@example\.com", "\u0430lice@example.com", False),  # Cyrillic a
            (r"[\w.-]+@example\.com", "jos\u00e9@example.com", False),
            (r"\w+", "\u00b2", False),  # superscript two
            (r"a\sb", "a\u00a0b", False),
            (r"[[:alpha:]]+", "caf\u00e9", False),
            (r"\bab\b", "ab", True),
            ("(?i)[a-z]+", "ABCxyz", True),
            ("(?i)[a-z]+", "\u212a", False),  # KELVIN SIGN folds to k in Unicode
            ("(?i)[a-z]+", "\u017f", False),  # LATIN SMALL LETTER LONG S folds to s
            ("(?i)k", "K", True),
            ("(?i)k", "\u212a", False),
            ("(?i)s", "\u017f", False),
            ("(?i)\u00e9", "\u00c9", False),  # non-ASCII letters do not fold either
            ("(?i)\u00e9", "\u00e9", True),
            ("(?i)stra\u00dfe", "STRA\u00dfE", True),
            ("(?i)stra\u00dfe", "STRA\u1e9eE", False),  # capital sharp s
            ("(?i)\u03c3", "\u03a3", False),  # Greek sigma
            ("(?i)[^k]", "\u212a", True),  # not k, since it folds to nothing ASCII
            ("(?i)[^k]", "K", False),
            (r"(?i)\x4b", "k", True),
            (r"(?i)\113", "k", True),
            (r"(?i)[\x41-\x5a]", "q", True),
            ("(?i)[a-]", "A", True),
            ("(?i)[a-]", "-", True),
            ("(?i)[]a]", "A", True),
            ("(?i)[^]a]", "A", False),
            ("(?i)[[:lower:]]", "Q", True),
            ("(?i)[[:lower:]]", "\u212a", False),
            (r"(?i)\p{Ll}", "Q", True),
            (r"(?i)\p{Ll}", "\u00c9", False),
            (r"(?i)\Qa.b\E", "A.B", True),
            (r"(?i)\Qa.b\E", "AxB", False),
            (r"\Qa.b\E", "a.b", True),
            (r"\Qa.b\E", "axb", False),
            (r"x\Q.*", "x.*", True),  # \Q runs to the end when no \E closes it
            (r"x\Q.*", "xyz", False),
            ("(?i:ab)c", "ABc", True),
            ("(?i:ab)c", "abC", False),
            ("a(?i)b", "aB", True),
            ("a(?i)b", "AB", False),
            ("(?i)a(?-i)b", "Ab", True),
            ("(?i)a(?-i)b", "AB", False),
            ("(?i)(?:a|(?-i)b)c", "BC", False),  # a flag set inside a group ends with it...
            ("(?i)(?:a(?-i)|b)c", "bC", True),  # ...and lasts across its alternatives
            ("(?i)(?:a(?-i)|b)c", "BC", False),
            ("(?:[kK]|x)", "\u212a", False),  # RE2 alone folds a [kK] class met by alternatives
            ("[sS]|[tT]", "\u017f", False),
            ("x[sS]|x[tT]", "x\u017f", False),
            ("(?:[kK]|x)", "K", True),
            ("(?i)(?P<name>ab)", "AB", True),
            ("(?is)a.b", "A\nB", True),
        ],
    )
    def test_case(self, pattern: str, text: str, expected: bool) -> None:
        """Only ASCII characters are in \\d \\w \\s [[:alpha:]], and only ASCII letters fold."""
        assert matches(pattern, text) is expected

    @pytest.mark.parametrize(
        "pattern",
        [
            "(?i)[a-z]+",
            "(?i)k",
            "(?i)s",
            "(?i)\u00e9",
            "(?i)[^k]",
            "(?i)user-\\d+",
            "(?i:ab)c",
            "a(?i:b(?-i:c)d)e",
            "(?i)[\u00e0-\u00ff]+",
            "(?i)stra\u00dfe",
            r"[\w.-]+@example\.com",
            r"(?i)[\x41-\x5a]+",
            r"(?i)[^\W\d_]+",
            "(?i)[k-m]",
            "(?i)a{2}",
            "(?:[kK]|[sS])+",
        ],
    )
    def test_agrees_with_python_re_ascii(self, pattern: str) -> None:
        """Where the syntaxes agree, every answer is the one Python's re gives with re.ASCII."""
        compiled = IdentityPattern.compile(pattern)
        python = re.compile(pattern, re.ASCII)
        texts = [
            *"aAkKsSzZ\u212a\u017f\u00e9\u00c9\u00df\u1e9e\u03c3\u03a3\u03c2\u0131\u0130\u00ff\u0178-_1\u0661",
            *[
                "ab",
                "AB",
                "aBc",
                "ABc",
                "abcde",
                "aBcDe",
                "ABCDE",
                "user-12",
                "USER-12",
                "Aa",
                "stra\u00dfe",
                "STRASSE",
            ],
        ]
        for text in texts:
            assert compiled.matches(text) is (python.fullmatch(text) is not None), text

    @pytest.mark.parametrize(
        "pattern",
        [
            "(?i)[a-z]",
            "(?i)[A-Z]",
            "(?i)[[:upper:]]",
            r"(?i)[\x41-\x5a]",
            "(?i)(?:" + "|".join(string.ascii_lowercase) + ")",
            "(?:" + "|".join(f"[{c}{c.upper()}]" for c in string.ascii_lowercase) + ")",
            "[a-zA-Z]",
        ],
    )
    def test_only_ascii_letters_match_a_letter(self, pattern: str) -> None:
        """Brute force over every code point: a pattern for one ASCII letter, any case, matches the 52 and nothing else.

        RE2's own folding adds U+017F and U+212A, and a future Unicode may add
        more; this fails if any other code point at all gets through.
        """
        assert all(matches(pattern, c) for c in ASCII_LETTERS)
        assert not matches(f"(?s).*(?:{pattern}).*", NOT_ASCII_LETTERS)

    def test_negated_class_takes_every_other_code_point(self) -> None:
        """Brute force: (?i)[^a-z] matches every code point but the 52 ASCII letters."""
        assert matches("(?i)[^a-z]*", NOT_ASCII_LETTERS)
        assert not any(matches("(?i)[^a-z]", c) for c in ASCII_LETTERS)

    def test_flags_are_rewritten_not_passed_on(self) -> None:
        """No i flag reaches RE2; the ASCII letters it governed become both-case classes."""
        assert _fold_ascii("(?i)ab(?-i:c)(?is:d)") == r"(?)[aA\x{D800}][bB\x{D800}](?:c)(?s:[dD\x{D800}])"

    def test_pattern_is_kept_as_written(self) -> None:
        """GetCallerIdentity and check-config show the configured text, not the rewrite."""
        assert IdentityPattern.compile("(?i)user-[0-9]+").pattern == "(?i)user-[0-9]+"


class TestLinearTime:
    """Patterns that make a backtracking engine take exponential time are answered at once."""

    @pytest.mark.parametrize("length", [29, 256])
    def test_nested_repetition(self, length: int) -> None:
        """([a-z0-9]+\\.?)+@... against a long near-miss: Python's re takes minutes; RE2 does not backtrack."""
        pattern = IdentityPattern.compile(r"([a-z0-9]+\.?)+@corp\.example")
        assert not pattern.matches("a" * (length - 1) + "-")
        assert pattern.matches("first.last@corp.example")


class TestRefused:
    """Patterns RE2 cannot run, or that would not mean what they say, are refused with the reason."""

    @pytest.mark.parametrize(
        ("pattern", "message"),
        [
            ("user-[0-9", "not a valid RE2 pattern: missing ]: [0-9"),
            (r"(a)\1", r"not a valid RE2 pattern: invalid escape sequence: \1 (RE2 has no backreferences)"),
            ("(?P<n>a)(?P=n)", "not a valid RE2 pattern: invalid perl operator: (?P (RE2 has no backreferences)"),
            ("(?=a)a", "not a valid RE2 pattern: invalid perl operator: (?= (RE2 has no lookahead or lookbehind)"),
            ("a(?!b)", "not a valid RE2 pattern: invalid perl operator: (?! (RE2 has no lookahead or lookbehind)"),
            ("(?<=a)b", "not a valid RE2 pattern: invalid perl operator: (?<= (RE2 has no lookahead or lookbehind)"),
            ("a{1001}", "not a valid RE2 pattern: invalid repetition size: {1001} (RE2 repeats at most 1000 times)"),
            (
                "(a{100}){100}",
                "not a valid RE2 pattern: invalid repetition size: {100} (RE2 repeats at most 1000 times)",
            ),
            (
                r"\pL{1000}",
                "not a valid RE2 pattern: pattern too large - compile failed (it needs more than RE2's 8 MiB memory budget)",
            ),
            (
                r"user\Z",
                r"not a valid RE2 pattern: invalid escape sequence: \Z (identities are matched whole, so no end anchor is needed)",
            ),
            (r"a\Cb", r"\C (any byte) can match half of a character; use . instead"),
            ("user-[0-9]{,3}", "{,3} is literal text in RE2, not a repetition; write {0,3}"),
        ],
    )
    def test_refused(self, pattern: str, message: str) -> None:
        """Each refusal says what RE2 (or this service) objects to."""
        with pytest.raises(PatternError) as caught:
            IdentityPattern.compile(pattern)
        assert str(caught.value) == message

    def test_refusal_prints_nothing(self, capfd: pytest.CaptureFixture[str]) -> None:
        """RE2's own error log stays off: the config error is the one message."""
        with pytest.raises(PatternError):
            IdentityPattern.compile("user-[0-9")
        assert capfd.readouterr() == ("", "")
