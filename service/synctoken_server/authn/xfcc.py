r"""Envoy's x-forwarded-client-cert (XFCC) header: a strict parser, and the caller's SPIFFE ID from it.

The format (Envoy's docs, "x-forwarded-client-cert"): elements separated by
commas, one per proxy that forwarded the request, the last one added by the
nearest proxy; each element is key=value pairs separated by semicolons; a
value may be double-quoted, and inside quotes `\"` is a quote, `\\` a
backslash, and commas and semicolons are plain text. Keys are By, Hash,
Cert, Chain, Subject, URI and DNS; they are compared without regard to case.

Anything else is an error rather than a guess: an unterminated quote, text
after a closing quote, a quote inside an unquoted value, a pair without
`=`, an empty element, a key that is not letters. A header a proxy wrote is
never ambiguous, so a header that is must not have come from the proxy.
"""

from __future__ import annotations

from collections.abc import Iterator

HEADER = "x-forwarded-client-cert"


class XfccError(ValueError):
    """The header is not in Envoy's format; the message says where, without repeating the header."""


Element = tuple[tuple[str, str], ...]
"""One proxy's pairs, keys upper-cased, in order."""


def parse(header: str) -> tuple[Element, ...]:
    """Every element of an XFCC header value, in order (the nearest proxy's last)."""
    return tuple(_elements(header))


def _elements(header: str) -> Iterator[Element]:
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(header)
    while True:
        key, i = _key(header, i)
        value, i = _value(header, i)
        pairs.append((key, value))
        if i == n:
            yield tuple(pairs)
            return
        separator = header[i]
        i += 1
        if separator == ",":
            yield tuple(pairs)
            pairs = []
        if i == n:
            raise XfccError(f"ends with {separator!r}: an empty pair or element")


def _key(header: str, start: int) -> tuple[str, int]:
    end = header.find("=", start)
    if end == -1:
        raise XfccError(f"a pair without '=' at offset {start}")
    key = header[start:end]
    if not key.isascii() or not key.isalpha():
        raise XfccError(f"a key that is not letters at offset {start}")
    return key.upper(), end + 1


def _value(header: str, start: int) -> tuple[str, int]:
    """The value starting at `start`, and the offset of the separator after it (or the end)."""
    if header.startswith('"', start):
        return _quoted(header, start + 1)
    i = start
    while i < len(header) and header[i] not in ",;":
        if header[i] == '"':
            raise XfccError(f"a quote inside an unquoted value at offset {i}")
        i += 1
    return header[start:i], i


def _quoted(header: str, start: int) -> tuple[str, int]:
    chars: list[str] = []
    i = start
    while i < len(header):
        char = header[i]
        if char == "\\":
            if i + 1 == len(header):
                break
            chars.append(header[i + 1])
            i += 2
            continue
        if char == '"':
            i += 1
            if i < len(header) and header[i] not in ",;":
                raise XfccError(f"text after a closing quote at offset {i}")
            return "".join(chars), i
        chars.append(char)
        i += 1
    raise XfccError(f"an unterminated quote from offset {start - 1}")


def nearest_uri(header: str) -> str:
    """The one URI in the element the nearest proxy added (the last); XfccError if there is not exactly one."""
    elements = parse(header)
    uris = [value for key, value in elements[-1] if key == "URI"]
    if len(uris) != 1:
        raise XfccError(f"the nearest proxy's element has {len(uris)} URI values, not one")
    return uris[0]
