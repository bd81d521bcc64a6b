"""End-user identities as synctoken's private audit writes them: a keyed hash, `h:` and 128 bits in hex.

HMAC-SHA-256 with a key only the operator holds, so that someone who reads
the log cannot test guesses (user ids are easy to guess; an unkeyed hash
would hide nothing). Truncated to 128 bits, which is plenty to tell users
apart and to find one user's records, and prefixed `h:` so that a hashed
identity is never mistaken for a plain one.

Here, in the client distribution, because two programs write it: the server
(its audit log and `synctoken audit-hash`) and the BFF (its own log lines),
and with one key file both must write the same value for one user.
"""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "h:"
MIN_KEY_BYTES = 32
"""As long as the hash's own block of security: a shorter key is the weak point."""
_HEX_DIGITS = 32


class IdentityHasher:
    """Turns an identity into its `h:` form under one key; the key never leaves this object."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __call__(self, identity: str) -> str:
        """`h:` and the first 128 bits of HMAC-SHA-256(key, identity as UTF-8), in hex."""
        digest = hmac.new(self._key, identity.encode("utf-8"), hashlib.sha256).hexdigest()
        return PREFIX + digest[:_HEX_DIGITS]

    def __repr__(self) -> str:
        # Settings and config objects get printed in tracebacks and test failures: never the key.
        return "IdentityHasher(key=<hidden>)"


def key_in_file(raw: bytes) -> bytes:
    """The key a key file's bytes hold: all of them but one final newline (`openssl rand -hex 32 > file` adds one).

    The caller checks its length against MIN_KEY_BYTES, to say in its own terms which file is short.
    """
    return raw.removesuffix(b"\n").removesuffix(b"\r")
