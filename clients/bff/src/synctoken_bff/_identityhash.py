"""End-user identities in the BFF's log as a keyed hash: the formula of synctoken's private audit.

`h:` and the first 32 hex digits of HMAC-SHA-256(key, identity as UTF-8),
as synctoken_server.audit.privacy writes them (the BFF depends on the client
library only, so the formula is repeated here; a test holds the two equal).
With the same key file as the server's `[audit] identity_hash_key_file`,
one user's BFF lines and audit records carry the same value, and
`synctoken audit-hash` finds both.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

PREFIX = "h:"
MIN_KEY_BYTES = 32
_HEX_DIGITS = 32


class IdentityHasher:
    """Turns an identity into its `h:` form under one key; the key never leaves this object."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __call__(self, identity: str) -> str:
        """`h:` and the first 128 bits of HMAC-SHA-256(key, identity as UTF-8), in hex."""
        return PREFIX + hmac.new(self._key, identity.encode("utf-8"), hashlib.sha256).hexdigest()[:_HEX_DIGITS]

    def __repr__(self) -> str:
        # Settings get printed in tracebacks and test failures: never the key.
        return "IdentityHasher(key=<hidden>)"


def key_from_file(path: str, what: str) -> bytes:
    """The key in the file at `path`: all its bytes but one final newline, as the server reads its key file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from None
    key = raw.removesuffix(b"\n").removesuffix(b"\r")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{what}: {path} holds a key of {len(key)} bytes; use at least {MIN_KEY_BYTES}")
    return key
