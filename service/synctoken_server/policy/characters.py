"""Which characters an identity or endpoint id may hold: visible, assigned, NFC text, spaces only inside.

Both strings go into the token and on into Twilio's consoles, logs and UIs, where
an invisible or look-alike character makes one identity pass for another.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator

import regex

from synctoken_server.errors import FieldViolation

# Characters that render as nothing although they are neither control, format
# nor separator: Unicode's own list, plus three it leaves out that show blank
# all the same. U+2800 is the empty Braille cell; U+1D159 the notehead that
# prints no ink; U+16FE4 a filler, like the Hangul fillers Unicode does list.
_BLANK = "\u2800\U0001d159\U00016fe4"
_INVISIBLE = regex.compile(r"[\p{Default_Ignorable_Code_Point}" + _BLANK + "]")
_NONCHARACTER = regex.compile(r"\p{Noncharacter_Code_Point}")
# The categories str.isprintable() says no to (every C and Z but U+0020), and why.
_CATEGORY_REASONS = {
    "Cc": "a control character",
    "Cf": "a format character",
    "Cs": "a surrogate",
    "Co": "a private-use character",
    "Cn": f"unassigned in Unicode {unicodedata.unidata_version}",
    "Zs": "a space other than U+0020",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}
_SPACE_AT_END = "must not begin or end with a space"


def describe(char: str) -> str:
    """A character as people look it up: U+00A0 NO-BREAK SPACE, or just U+000A for one with no name."""
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X} {name}" if name else f"U+{ord(char):04X}"


def text_violations(field: str, text: str, limit: int) -> Iterator[FieldViolation]:
    """What is wrong with `text` as the value of `field`: length, characters, ends and normal form."""
    if len(text) > limit:
        yield FieldViolation(field, f"is {len(text)} characters; the limit is {limit}")
    # The hot path, at C speed: printable ASCII holds no refused character and
    # is NFC already, so only its ends need a look.
    if text.isascii() and text.isprintable():
        if text and (text[0] == " " or text[-1] == " "):
            yield FieldViolation(field, _SPACE_AT_END)
        return
    refused = _first_refused(text)
    if refused is not None:
        char, why = refused
        yield FieldViolation(field, f"must not contain {describe(char)} ({why})")
    if text[0] == " " or text[-1] == " ":
        yield FieldViolation(field, _SPACE_AT_END)
    if not unicodedata.is_normalized("NFC", text):
        culprit = describe(_first_not_nfc(text))
        yield FieldViolation(field, f"must be in Unicode normalization form NFC; {culprit} is not")


def _first_refused(text: str) -> tuple[str, str] | None:
    """The first character no identity may hold, and why; None if there is none."""
    invisible = _INVISIBLE.search(text)
    end = len(text) if invisible is None else invisible.start()
    # isprintable() is False exactly for the C and Z categories (bar U+0020), by
    # Python's own Unicode data, which may be older than regex's: a character
    # Python cannot name or normalize is refused as unassigned.
    if not text[:end].isprintable():
        char = next(c for c in text[:end] if not c.isprintable())
    elif invisible is not None:
        char = invisible[0]
    else:
        return None
    if _NONCHARACTER.match(char):
        return char, "a noncharacter"
    why = _CATEGORY_REASONS.get(unicodedata.category(char))
    if why is None:
        why = "renders as blank space" if char in _BLANK else "an invisible character"
    return char, why


def _first_not_nfc(text: str) -> str:
    """The character at which `text` (not NFC) stops being NFC: what a caller must fix."""
    # A prefix that is not NFC stays so whatever follows, so bisect for the
    # shortest such prefix: a linear scan would be quadratic in a 4 KiB request.
    lo, hi = 1, len(text)
    while lo < hi:
        mid = (lo + hi) // 2
        if unicodedata.is_normalized("NFC", text[:mid]):
            lo = mid + 1
        else:
            hi = mid
    return text[lo - 1]
