"""The BFF's identity hash key, read from its file as the server reads `[audit] identity_hash_key_file`.

The hash itself is synctoken.audithash's, the server's own: with the same key
file, one user's BFF lines and audit records carry the same value, and
`synctoken audit-hash` finds both.
"""

from __future__ import annotations

from pathlib import Path

from synctoken.audithash import MIN_KEY_BYTES, key_in_file


def key_from_file(path: str, what: str) -> bytes:
    """The key in the file at `path` (all its bytes but one final newline); ValueError naming `what` if unusable."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from None
    key = key_in_file(raw)
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{what}: {path} holds a key of {len(key)} bytes; use at least {MIN_KEY_BYTES}")
    return key
