"""Rate limits: token buckets per caller and per (caller, identity), read from each policy entry.

The limits are config (a `[[callers]]` entry's `rate`, `burst`,
`identity_rate`, `identity_burst`, `shadow`; `[limits] shadow` for all) and
are compiled into `Limits` once per snapshot, already divided among the
worker processes. The bucket state lives in one `RateLimiter` per server,
kept across reloads, so a reload changes the rates without handing every
caller a fresh burst.

No lock: buckets are only touched on the server's one event-loop thread.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from synctoken_server.configfile import TomlReader

MAX_RATE = 1_000_000.0
MAX_BURST = 1_000_000
MAX_BUCKETS = 100_000
"""Beyond this many buckets the least recently used is dropped, whatever its state: memory stays bounded."""

CALLER_KEYS = frozenset({"rate", "burst", "identity_rate", "identity_burst", "shadow"})
"""The keys a `[[callers]]` entry may use for limits."""


@dataclass(frozen=True)
class Limit:
    """One token bucket's shape: refills at `rate` per second, holds at most `burst`."""

    rate: float
    burst: float

    def share(self, workers: int) -> Limit:
        """The part of this limit for one of `workers` processes, so that together they allow the configured one.

        The burst never drops below one token, or a caller could never be served.
        """
        return Limit(self.rate / workers, max(1.0, self.burst / workers))


@dataclass(frozen=True)
class CallerLimits:
    """The limits of one policy entry; None means no limit of that kind."""

    caller: Limit | None = None
    identity: Limit | None = None
    shadow: bool = False
    """Count and log what would be refused; refuse nothing."""

    def share(self, workers: int) -> CallerLimits:
        """The part of these limits for one of `workers` processes."""
        return CallerLimits(
            self.caller.share(workers) if self.caller else None,
            self.identity.share(workers) if self.identity else None,
            self.shadow,
        )


def read_caller_limits(r: TomlReader, data: Mapping[str, Any], key: str, *, shadow: bool) -> CallerLimits | None:
    """The limits of the `[[callers]]` entry `data` (at `key`); `shadow` is the global default."""
    caller = _limit(r, data, key, "rate", "burst")
    identity = _limit(r, data, key, "identity_rate", "identity_burst")
    shadow = r.get(data, key, "shadow", bool, shadow)
    if caller is None and identity is None:
        if "shadow" in data:
            raise r.fail(f"{key}.shadow", "applies only with rate or identity_rate")
        return None
    return CallerLimits(caller, identity, shadow)


def read_global_shadow(r: TomlReader, data: Mapping[str, Any]) -> bool:
    """`[limits] shadow`: the default for every caller entry."""
    table = r.table(data, "limits", {"shadow"}, required=False)
    return r.get(table, "limits", "shadow", bool, default=False)


def _limit(r: TomlReader, data: Mapping[str, Any], key: str, rate_key: str, burst_key: str) -> Limit | None:
    if rate_key not in data:
        if burst_key in data:
            raise r.fail(f"{key}.{burst_key}", f"needs {key}.{rate_key}")
        return None
    rate = data[rate_key]
    # TOML has both; a rate of 2 (int) and 0.5 (float) are both natural to write.
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise r.fail(f"{key}.{rate_key}", "must be a number (tokens per second, e.g. 5 or 0.5)")
    if not 0 < rate <= MAX_RATE:
        raise r.fail(f"{key}.{rate_key}", f"{rate} is not above 0 and at most {MAX_RATE:g} per second")
    r.note(f"{key}.{rate_key}", rate)
    # By default a caller may use one second's worth at once (and always at least one token).
    burst = r.get(data, key, burst_key, int, max(1, math.ceil(rate)))
    if not 1 <= burst <= MAX_BURST:
        raise r.fail(f"{key}.{burst_key}", f"{burst} is not between 1 and {MAX_BURST}")
    return Limit(float(rate), float(burst))


def identity_digest(identity: str) -> str:
    """A short unkeyed digest of an end-user identity, for a QuotaFailure subject that does not echo it."""
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Refusal:
    """Why a request is over its limit: which one, and how long until a token is available."""

    subject: str
    """`caller:<id>` or `identity:<caller id>/<digest>`, as sent in QuotaFailure."""
    description: str
    retry_after: float
    """Seconds."""
    shadow: bool


class _Bucket:
    __slots__ = ("full_at", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.full_at = stamp
        """When it will have refilled to its burst, at the rate it last had: from then on it can go."""


class RateLimiter:
    """The token buckets of one server process.

    A bucket that has refilled to its burst is the same as no bucket, so
    such buckets are dropped as they are met at the old end (least recently
    used): memory follows the callers and identities active within about
    burst/rate seconds, and is capped at `max_buckets` in any case (the
    least recently used goes first, whatever its state).
    """

    def __init__(self, clock: Callable[[], float], max_buckets: int = MAX_BUCKETS) -> None:
        self._clock = clock
        self._max = max_buckets
        self._buckets: OrderedDict[tuple[str, str | None], _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(
        self, limits: CallerLimits, caller_id: str, identity: str, digest: Callable[[str], str] = identity_digest
    ) -> Refusal | None:
        """Take a token from each bucket that applies, or say which one is empty.

        Nothing is taken unless every bucket has a token: a refused request
        does not eat into the other limit. Shadow mode does the same, so its
        count of what would be refused is what enforcing would refuse.
        `digest` names the identity in a refusal.
        """
        now = self._clock()
        self._sweep(now)
        buckets: list[tuple[_Bucket, Limit, str | None]] = []
        if limits.caller is not None:
            buckets.append((self._bucket((caller_id, None), limits.caller, now), limits.caller, None))
        if limits.identity is not None:
            buckets.append((self._bucket((caller_id, identity), limits.identity, now), limits.identity, identity))
        for bucket, limit, for_identity in buckets:
            if bucket.tokens < 1:
                retry_after = (1 - bucket.tokens) / limit.rate
                if for_identity is None:
                    return Refusal(f"caller:{caller_id}", "the caller's rate limit", retry_after, limits.shadow)
                subject = f"identity:{caller_id}/{digest(for_identity)}"
                return Refusal(subject, "the caller's rate limit for one identity", retry_after, limits.shadow)
        for bucket, limit, _ in buckets:
            bucket.tokens -= 1
            bucket.full_at = now + (limit.burst - bucket.tokens) / limit.rate
        return None

    def _bucket(self, key: tuple[str, str | None], limit: Limit, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(limit.burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            # min(): a reload may have lowered the burst below what the bucket holds.
            bucket.tokens = min(limit.burst, bucket.tokens + (now - bucket.stamp) * limit.rate)
            bucket.stamp = now
        return bucket

    def _sweep(self, now: float) -> None:
        # A few per call, from the least recently used end: the cost stays flat
        # however many went idle at once, and idle ones are gone soon enough.
        for _ in range(_SWEEP_PER_CALL):
            if not self._buckets:
                return
            key, bucket = next(iter(self._buckets.items()))
            if now < bucket.full_at:
                return
            del self._buckets[key]


_SWEEP_PER_CALL = 2
