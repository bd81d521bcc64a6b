"""Rate limits: token buckets per caller and per (caller, identity), read from each policy entry.

The limits are config (a `[[callers]]` entry's `rate`, `burst`,
`identity_rate`, `identity_burst`, `shadow`; `[limits] shadow` for all) and
are compiled into one `CallerLimits` per caller once per snapshot (read by
`config/limits.py` at load, kept in `rpc/snapshot.py`), already divided
among the worker processes (and the replicas `[limits] replicas` names).
The bucket state lives in one `RateLimiter` per server,
kept across reloads and carried over to the new limits (`reconfigure`), so
a reload changes the rates without handing any caller a fresh burst.

No lock: buckets are only touched on the server's one event-loop thread.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass

MAX_RATE = 1_000_000.0
MAX_BURST = 1_000_000
MAX_BUCKETS = 100_000
"""At most this many buckets per process; see RateLimiter for what happens when all are in use."""


@dataclass(frozen=True)
class Limit:
    """One token bucket's shape: refills at `rate` per second, holds at most `burst`."""

    rate: float
    burst: float

    def share(self, processes: int) -> Limit:
        """The part of this limit for one of `processes` processes, so that together they allow the configured one.

        The processes are every worker of every replica (`[limits] replicas`
        x `--workers`). The burst never drops below one token, or a caller
        could never be served.
        """
        return Limit(self.rate / processes, max(1.0, self.burst / processes))


@dataclass(frozen=True)
class CallerLimits:
    """The limits of one policy entry; None means no limit of that kind."""

    caller: Limit | None = None
    identity: Limit | None = None
    shadow: bool = False
    """Count and log what would be refused; refuse nothing."""

    def share(self, processes: int) -> CallerLimits:
        """The part of these limits for one of `processes` processes."""
        return CallerLimits(
            self.caller.share(processes) if self.caller else None,
            self.identity.share(processes) if self.identity else None,
            self.shadow,
        )


def identity_digest(identity: str) -> str:
    """A short unkeyed digest of an end-user identity, for a QuotaFailure subject that does not echo it."""
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class OverLimit:
    """Why a request is over its limit: which one, and how long until a token is available."""

    subject: str
    """`caller:<id>` or `identity:<caller id>/<digest>`, as sent in QuotaFailure."""
    description: str
    retry_after: float
    """Seconds."""
    shadow: bool


_Key = tuple[str, str | None]
"""(caller id, None) for a caller's bucket; (caller id, identity) for one identity's."""

TABLE_FULL_SUBJECT = "server:buckets"
"""The QuotaFailure subject of a refusal because no bucket could be made: see RateLimiter."""


class _Bucket:
    __slots__ = ("full_at", "key", "stamp", "tokens")

    def __init__(self, key: _Key, tokens: float, stamp: float, full_at: float) -> None:
        self.key = key
        self.tokens = tokens
        """What it held at `stamp`."""
        self.stamp = stamp
        self.full_at = full_at
        """When it will have refilled to its burst under the limit in force: from then on forgetting it is exact."""


def _level(bucket: _Bucket | None, limit: Limit, now: float) -> float:
    """What a bucket holds at `now`: no bucket is a full one."""
    if bucket is None:
        return limit.burst
    return min(limit.burst, bucket.tokens + (now - bucket.stamp) * limit.rate)


class RateLimiter:
    """The token buckets of one server process.

    Only buckets that have refilled to their burst are ever forgotten: such
    a bucket is the same as no bucket, so forgetting it hands out nothing.
    They are found in the order they refill (a heap on `full_at`), a few per
    call, so memory follows the callers and identities active within about
    burst/rate seconds. At most `max_buckets` (at least 2) are kept. When
    that many are all still refilling, a request that needs a new bucket is
    refused (RATE_LIMITED, subject `server:buckets`, retry when the first
    one will have refilled) rather than served from a fresh one: evicting a
    live bucket, or letting a new identity go by its caller's limit alone,
    would let a caller that pushes enough identities through reset any
    user's limit. Buckets that already exist keep working.
    """

    def __init__(self, clock: Callable[[], float], max_buckets: int = MAX_BUCKETS) -> None:
        if max_buckets < _BUCKETS_PER_REQUEST:
            raise ValueError(f"max_buckets must be at least {_BUCKETS_PER_REQUEST}, not {max_buckets}")
        self._clock = clock
        self._max = max_buckets
        self._buckets: dict[_Key, _Bucket] = {}
        self._refills: list[tuple[float, int, _Bucket]] = []
        """A heap with one entry per bucket, at or before its `full_at` (taking only moves `full_at` later)."""
        self._order = itertools.count()
        """Breaks ties in the heap, so that it never compares buckets."""

    def __len__(self) -> int:
        return len(self._buckets)

    def check(
        self, limits: CallerLimits, caller_id: str, identity: str, digest: Callable[[str], str] = identity_digest
    ) -> OverLimit | None:
        """Take a token from each bucket that applies, or say which one is empty.

        Both buckets are looked at before either is touched: a refused
        request takes nothing from the other limit and creates no bucket.
        Shadow mode does the same, so its count of what would be refused is
        what enforcing would refuse. `digest` names the identity in a refusal.
        """
        now = self._clock()
        self._reclaim(now, _SWEEP_PER_CALL)
        caller, per_identity = limits.caller, limits.identity
        caller_key: _Key = (caller_id, None)
        identity_key: _Key = (caller_id, identity)
        caller_bucket = identity_bucket = None
        caller_level = identity_level = 0.0
        if caller is not None:
            caller_bucket = self._buckets.get(caller_key)
            caller_level = _level(caller_bucket, caller, now)
            if caller_level < 1:
                retry_after = (1 - caller_level) / caller.rate
                return OverLimit(f"caller:{caller_id}", "the caller's rate limit", retry_after, limits.shadow)
        if per_identity is not None:
            identity_bucket = self._buckets.get(identity_key)
            identity_level = _level(identity_bucket, per_identity, now)
            if identity_level < 1:
                retry_after = (1 - identity_level) / per_identity.rate
                subject = f"identity:{caller_id}/{digest(identity)}"
                return OverLimit(subject, "the caller's rate limit for one identity", retry_after, limits.shadow)
        new = (caller is not None and caller_bucket is None) + (per_identity is not None and identity_bucket is None)
        if new and not self._room_for(new, now):
            # Every bucket is still refilling, so none can go: see the class docstring.
            retry_after = max(0.0, self._refills[0][0] - now)
            return OverLimit(TABLE_FULL_SUBJECT, "the server's table of rate limits", retry_after, limits.shadow)
        if caller is not None:
            self._take(caller_bucket, caller_key, caller, caller_level, now)
        if per_identity is not None:
            self._take(identity_bucket, identity_key, per_identity, identity_level, now)
        return None

    def reconfigure(
        self,
        before: Callable[[str], CallerLimits | None],
        after: Callable[[str], CallerLimits | None],
    ) -> None:
        """Carry every bucket over to new limits: `before` and `after` give a caller id's limits, old and new.

        Each bucket is brought up to now under the limit it had, so the time
        before the reload refills at the old rate and the time after at the
        new one; a lowered burst caps what it holds and a raised one adds
        nothing (it is reached by refilling). Its refill time is worked out
        again under the new limit, so it is forgotten neither early nor late.
        A bucket whose limit is gone, or whose limit changed and that is full
        under the old limit or the new, is dropped: it is the same as no
        bucket (so a full one starts with the new burst, as a new caller does,
        whether or not the sweep had already met it). Work is per bucket, and
        none when no limit in use changed. Called on the event loop, between
        two RPCs.
        """
        now = self._clock()
        # Per caller id: (old, new) for its caller bucket, then for its identity buckets.
        changes: dict[str, tuple[Limit | None, Limit | None, Limit | None, Limit | None]] = {}
        for caller_id, _ in self._buckets:
            if caller_id not in changes:
                old, new = before(caller_id) or _NO_LIMITS, after(caller_id) or _NO_LIMITS
                changes[caller_id] = (old.caller, new.caller, old.identity, new.identity)
        if all(change[0] == change[1] and change[2] == change[3] for change in changes.values()):
            return  # the common reload: no limit in use changed, so every bucket is right as it is
        kept: dict[_Key, _Bucket] = {}
        for key, bucket in self._buckets.items():
            change = changes[key[0]]
            old_limit, new_limit = (change[0], change[1]) if key[1] is None else (change[2], change[3])
            if new_limit is None:
                continue
            if old_limit == new_limit:
                kept[key] = bucket  # its tokens, stamp and refill time hold as they are
                continue
            # No old limit: the bucket was made under limits older than `before`; credit it nothing.
            level = bucket.tokens if old_limit is None else _level(bucket, old_limit, now)
            if old_limit is not None and level >= old_limit.burst:
                continue  # full, so the same as no bucket, whether or not the sweep had met it yet
            tokens = min(new_limit.burst, level)
            if tokens >= new_limit.burst:
                continue
            bucket.tokens, bucket.stamp = tokens, now
            bucket.full_at = now + (new_limit.burst - tokens) / new_limit.rate
            kept[key] = bucket
        self._buckets = kept
        self._refills = [(bucket.full_at, next(self._order), bucket) for bucket in kept.values()]
        heapq.heapify(self._refills)

    def _take(self, bucket: _Bucket | None, key: _Key, limit: Limit, level: float, now: float) -> None:
        tokens = level - 1
        full_at = now + (limit.burst - tokens) / limit.rate
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(key, tokens, now, full_at)
            heapq.heappush(self._refills, (full_at, next(self._order), bucket))
        else:
            # Later than before, so its heap entry (at the old time) is still early enough.
            bucket.tokens, bucket.stamp, bucket.full_at = tokens, now, full_at

    def _room_for(self, new: int, now: float) -> bool:
        """Whether `new` more buckets fit, once the buckets that have refilled are forgotten."""
        if len(self._buckets) + new <= self._max:
            return True
        self._reclaim(now, _RECLAIM_WHEN_FULL, until=self._max - new)
        return len(self._buckets) + new <= self._max

    def _reclaim(self, now: float, budget: int, until: int = 0) -> None:
        # From the earliest refill time, a bounded number per call: the cost
        # stays flat however many went idle at once, and idle ones go soon enough.
        refills, buckets = self._refills, self._buckets
        for _ in range(budget):
            if not refills or refills[0][0] > now or len(buckets) <= until:
                return
            _, _, bucket = heapq.heappop(refills)
            if bucket.full_at <= now:
                del buckets[bucket.key]
            else:  # taken from since its entry was made: file it again at its real time
                heapq.heappush(refills, (bucket.full_at, next(self._order), bucket))


_NO_LIMITS = CallerLimits()
_SWEEP_PER_CALL = 2
_BUCKETS_PER_REQUEST = 2
"""A caller's and an identity's: the table must hold at least that many, or such a request could never go through."""
_RECLAIM_WHEN_FULL = 16
"""How many refill-time entries one request may look at to find room: bounded work when the table is full."""
