"""What each Twilio API key has signed, as far as this process knows: the latest token expiry per key SID.

Twilio cannot tell synctoken when a key is deleted, so synctoken tells the
operator when deleting one is safe: once every token it signed has expired.
This is kept in memory only (nothing secret, nothing at all, is persisted),
so a restart forgets it; tokens signed before this process started are
bounded instead by the start time plus the longest TTL a caller may ask for.
"""

from __future__ import annotations

import time


class SignedExpiries:
    """The latest `exp` this process has signed with each API key."""

    def __init__(self, started_at: float | None = None) -> None:
        self.started_at = int(time.time() if started_at is None else started_at)
        self._latest: dict[str, int] = {}

    def record(self, key_sid: str, expires_at: int) -> None:
        """Note a token signed by `key_sid` that expires at `expires_at` (Unix seconds).

        On every issued token's path: one lookup and, now and then, one store.
        """
        if expires_at > self._latest.get(key_sid, 0):
            self._latest[key_sid] = expires_at

    def latest(self, key_sid: str) -> int | None:
        """The latest expiry this process signed with `key_sid`, or None if it signed nothing with it."""
        return self._latest.get(key_sid)

    def live_until(self, key_sid: str, max_ttl: int) -> int:
        """When every token `key_sid` may have signed has expired, in Unix seconds.

        The later of what this process signed and what an earlier process may
        have signed just before this one started (unknown, so `max_ttl` long).
        """
        return max(self._latest.get(key_sid, 0), self.started_at + max_ttl)
