"""Private audit: end-user identities written as a keyed hash (see synctoken.audithash, which the BFF shares).

The formula lives in the client distribution, a dependency of the server,
so that the server's audit and the BFF's log lines cannot drift apart.
"""

from __future__ import annotations

from synctoken.audithash import MIN_KEY_BYTES, PREFIX, IdentityHasher

__all__ = ["MIN_KEY_BYTES", "PREFIX", "IdentityHasher", "plain"]


def plain(identity: str) -> str:
    """The identity as it is: the audit log without private mode."""
    return identity
