"""Private audit: end-user identities written as a keyed hash, and the `audit-hash` an operator looks them up with.

HMAC-SHA-256 with a key only the operator holds, so that someone who reads
the log cannot test guesses (user ids are easy to guess; an unkeyed hash
would hide nothing). Truncated to 128 bits, which is plenty to tell users
apart and to find one user's records, and prefixed `h:` so that a hashed
identity is never mistaken for a plain one.
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
        # Config objects get printed in tracebacks and test failures: never the key.
        return "IdentityHasher(key=<hidden>)"


def plain(identity: str) -> str:
    """The identity as it is: the audit log without private mode."""
    return identity
