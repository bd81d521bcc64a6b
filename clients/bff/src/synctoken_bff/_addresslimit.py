"""A token bucket per client address, for the demo authenticator's new identities.

Without it a client that drops its cookie gets a fresh identity on every
request, so synctoken's per-identity limits never bite and one client can
spend the BFF's whole caller limit. A browser that keeps its cookie takes
one identity and never comes back here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# One host usually holds a whole IPv6 /64: counting its addresses apart would not limit it.
_IPV6_PREFIX = 64
# How many idle buckets each call drops at most: the cost stays flat however many went idle at once.
_SWEEP_PER_CALL = 4


@dataclass(frozen=True)
class NewIdentityLimit:
    """`burst` new identities per client address at once, then one more every `every`."""

    burst: int = 10
    every: dt.timedelta = dt.timedelta(minutes=1)
    max_addresses: int = 10_000
    """Buckets kept at most, the least recently used going first: memory stays bounded under a flood."""

    def __post_init__(self) -> None:
        if self.burst < 1 or self.every <= dt.timedelta(0) or self.max_addresses < 1:
            msg = f"{self!r}: burst and max_addresses must be at least 1 and every above 0"
            raise ValueError(msg)


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class AddressLimiter:
    """Takes one token per new identity from the bucket of the request's address."""

    def __init__(self, limit: NewIdentityLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self._burst = float(limit.burst)
        self._rate = 1 / limit.every.total_seconds()
        self._max = limit.max_addresses
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, address: str | None) -> float | None:
        """None if `address` may have a new identity now (and one is counted), else the seconds until it may."""
        now = self._clock()
        self._sweep(now)
        key = _client_key(address)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self._burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
            bucket.stamp = now
        if bucket.tokens < 1:
            return (1 - bucket.tokens) / self._rate
        bucket.tokens -= 1
        return None

    def _sweep(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket: drop it, from the least recently used end.
        for _ in range(_SWEEP_PER_CALL):
            if not self._buckets:
                return
            key, bucket = next(iter(self._buckets.items()))
            if bucket.tokens + (now - bucket.stamp) * self._rate < self._burst:
                return
            del self._buckets[key]


def _client_key(address: str | None) -> str:
    """The bucket's key: the IPv4 address, or the /64 of an IPv6 one; anything else as it is."""
    if not address:
        return ""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, _IPV6_PREFIX), strict=False))
    return str(ip)
