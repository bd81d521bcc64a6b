r"""Identity patterns: RE2 (linear time, so no pattern can freeze the event loop) with Python's re.ASCII semantics.

RE2's \d \w \s \b and [[:alpha:]] are ASCII already, but its case folding is
Unicode's: (?i)k matches U+212A KELVIN SIGN, (?i)s matches U+017F LONG S, (?i)é
matches É. Python's re.ASCII folds ASCII letters only, and that is what a pattern
written for ASCII identities means. RE2 also folds where no (?i) was written: it
reads a class of exactly [Kk] as "k, any case", and where such a class meets
other alternatives it widens that to the Unicode folds, so even (?:[kK]|x)
matches U+212A. So `_fold_ascii` rewrites the pattern before RE2 sees it: no
(?i) is passed on (each ASCII letter it governed becomes a class of both
cases), and every class gets a member no UTF-8 text can hold, so that none is
ever exactly [Kk].
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

import re2

_LETTERS = frozenset(string.ascii_letters)
# A surrogate: valid UTF-8 never encodes one, so as an extra class member it
# changes no match, but it keeps RE2 from reading the class as a folded letter.
_NEVER = r"\x{D800}"
# An escape outside a class, as RE2 reads one: hex, octal, a Unicode class, or one character.
_ESCAPE = re.compile(r"\\(?:x\{[0-9A-Fa-f]+\}|x[0-9A-Fa-f]{2}|[0-7]{1,3}|[pP]\{[^}]*\}|[pP].|.)", re.DOTALL)
_PERL_CLASS = frozenset(r"dDsSwW")
# (?flags) or (?flags: where flags are RE2's i, m, s and U, optionally negated after '-'.
_FLAGS = re.compile(r"\(\?([A-Za-z]*)(?:-([A-Za-z]*))?([:)])")
# Python reads {,3} as "up to three times"; RE2 reads it as the literal text "{,3}".
_PYTHON_ONLY_REPEAT = re.compile(r"\{,\d+\}")
# What RE2's terse messages mean, for the features people bring from Python's re.
_HINTS = (
    (re.compile(r"invalid escape sequence: \\[1-9]|invalid perl operator: \(\?P$"), "RE2 has no backreferences"),
    (re.compile(r"invalid escape sequence: \\Z"), "identities are matched whole, so no end anchor is needed"),
    (re.compile(r"invalid perl operator: \(\?<?[=!]"), "RE2 has no lookahead or lookbehind"),
    (re.compile(r"invalid repetition size"), "RE2 repeats at most 1000 times"),
    (re.compile(r"pattern too large"), "it needs more than RE2's 8 MiB memory budget"),
)


class PatternError(ValueError):
    """A pattern RE2 cannot compile, or one this service refuses; the message says why."""


def _options() -> re2.Options:
    options = re2.Options()
    # RE2 would print "E0000 ... Error parsing" lines to stderr for every bad
    # pattern; the ConfigError that follows says it once, with the key.
    options.log_errors = False
    # Only whether the whole identity matches is asked, so RE2 can use its DFA.
    options.never_capture = True
    return options


_OPTIONS = _options()


def _compile(pattern: str) -> Callable[[bytes], object]:
    try:
        return re2.compile(pattern, _OPTIONS).fullmatch
    except re2.error as exc:
        why = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        hint = next((f" ({hint})" for known, hint in _HINTS if known.match(why)), "")
        raise PatternError(f"not a valid RE2 pattern: {why}{hint}") from None


@dataclass(frozen=True)
class IdentityPattern:
    """A compiled identity pattern; `pattern` is the text as configured."""

    pattern: str
    _fullmatch: Callable[[bytes], object] = field(repr=False, compare=False)

    @classmethod
    def compile(cls, pattern: str) -> IdentityPattern:
        """Compile `pattern` as RE2 syntax with ASCII semantics, or raise PatternError."""
        # RE2 checks the pattern as written first, so its messages quote the
        # user's text, and the rewriter below only ever sees valid syntax.
        _compile(pattern)
        return cls(pattern, _compile(_fold_ascii(pattern)))

    def matches(self, text: str) -> bool:
        """True if `text`, all of it, matches; in time linear in len(text). No surrogates: decide refuses them first."""
        # Bytes, because the binding's str path maps offsets back in Python:
        # three times slower for the same answer.
        return self._fullmatch(text.encode("utf-8")) is not None


def _fold_ascii(pattern: str) -> str:
    """`pattern` with every (?i) removed and the ASCII letters it governed made [xX]-style classes."""
    out: list[str] = []
    fold = False
    outer: list[bool] = []  # fold as it was outside each open group, restored at its ')'
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i = _escape(pattern, i, out, fold=fold)
        elif c == "[":
            end, last_item = _class_end(pattern, i)
            text = pattern[i:end]
            out.append(_class(text, last_item, fold=fold))
            i = end
        elif pattern.startswith(("(?P<", "(?<"), i):
            end = pattern.index(">", i) + 1
            out.append(pattern[i:end])
            outer.append(fold)
            i = end
        elif (flags := _FLAGS.match(pattern, i)) is not None:
            on, off, closer = flags[1], flags[2] or "", flags[3]
            if closer == ":":
                outer.append(fold)
            # RE2 applies the flags in order, so an i after '-' wins.
            fold = "i" not in off and ("i" in on or fold)
            off = off.replace("i", "")
            out.append(f"(?{on.replace('i', '')}{'-' + off if off else ''}{closer}")
            i = flags.end()
        elif c == "(":
            outer.append(fold)
            out.append(c)
            i += 1
        elif c == ")":
            fold = outer.pop()
            out.append(c)
            i += 1
        elif c == "{" and (loose := _PYTHON_ONLY_REPEAT.match(pattern, i)) is not None:
            raise PatternError(f"{loose[0]} is literal text in RE2, not a repetition; write {{0,{loose[0][2:]}")
        else:
            out.append(_both_cases(c) if fold else c)
            i += 1
    return "".join(out)


def _escape(pattern: str, i: int, out: list[str], *, fold: bool) -> int:
    """Copy the escape at pattern[i] to `out`, folded if `fold`; return where the next token starts."""
    if pattern.startswith("\\Q", i):
        # \Q...\E: literal text up to \E or the end, as RE2 reads it.
        end = pattern.find("\\E", i + 2)
        stop, after = (len(pattern), len(pattern)) if end < 0 else (end, end + 2)
        if fold:
            out.extend(_both_cases(c) if c in _LETTERS else re2.escape(c) for c in pattern[i + 2 : stop])
        else:
            out.append(pattern[i:after])
        return after
    if pattern.startswith("\\C", i):
        raise PatternError(r"\C (any byte) can match half of a character; use . instead")
    match = _ESCAPE.match(pattern, i)
    if match is None:  # a trailing backslash; RE2 has already refused it
        raise PatternError("not a valid RE2 pattern: trailing \\")
    text = match[0]
    kind = text[1]
    if not fold or kind in "bBAz" or kind in _PERL_CLASS:
        # Assertions, and \d \s \w and their negations, which hold both cases of every letter or neither.
        out.append(text)
    elif kind in "pP":
        out.append(_class(f"[{text}]", text, fold=fold))
    else:
        char = _escaped_char(text)
        out.append(_both_cases(char) if char in _LETTERS else text)
    return match.end()


def _escaped_char(text: str) -> str:
    r"""The character a one-character escape (\x41, \x{41}, \101, \n, \.) stands for."""
    if text.startswith("\\x"):
        return chr(int(text[2:].strip("{}"), 16))
    if text[1].isdigit():
        return chr(int(text[1:], 8))
    # \a \f \n \r \t \v are controls and any other escape is punctuation: never a letter.
    return text[1]


def _both_cases(char: str) -> str:
    return f"[{char.lower()}{char.upper()}{_NEVER}]" if char in _LETTERS else char


def _class_end(pattern: str, start: int) -> tuple[int, str]:
    """Where the class opening at pattern[start] ends, and its last item's text; read as RE2's ParseCharClass does."""
    i = start + 1
    if pattern.startswith("^", i):
        i += 1
    first = True  # ']' first in a class is a literal
    last_item = ""
    while i < len(pattern) and (pattern[i] != "]" or first):
        first = False
        item = i
        if pattern.startswith("[:", i) and (close := pattern.find(":]", i + 2)) >= 0:
            i = close + 2
        elif pattern.startswith("\\", i) and pattern[i + 1 : i + 2] in {"p", "P", *_PERL_CLASS}:
            i = _class_char_end(pattern, i)
        else:
            i = _class_char_end(pattern, i)
            if pattern.startswith("-", i) and i + 1 < len(pattern) and pattern[i + 1] != "]":
                i = _class_char_end(pattern, i + 1)
        last_item = pattern[item:i]
    return i + 1, last_item


def _class_char_end(pattern: str, i: int) -> int:
    if pattern[i] != "\\":
        return i + 1
    match = _ESCAPE.match(pattern, i)
    return len(pattern) if match is None else match.end()


def _class(text: str, last_item: str, *, fold: bool) -> str:
    """The class `text` rewritten: with `fold`, plus the other case of each ASCII letter it holds (or excludes)."""
    negated = text.startswith("[^")
    extra = ""
    if fold:
        members = re2.compile(text, _OPTIONS)
        held = {c for c in _LETTERS if (members.fullmatch(c) is not None) != negated}
        extra = "".join(sorted(c.swapcase() for c in held if c.swapcase() not in held))
    if not negated:
        extra += _NEVER
    if not extra:
        return text
    # Added before the closing ']', or before a final literal '-' so that it stays a literal.
    cut = len(text) - (2 if last_item == "-" else 1)
    return text[:cut] + extra + text[cut:]
