"""get_token's cache: a bounded LRU of tokens that is never read past a token's refresh_after, with single flight.

Single flight means that concurrent requests for the same arguments share one
RPC: threads wait on the first thread's call (TokenCache), tasks await one
shared task (AsyncTokenCache). A failure is shared too, and never cached.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from synctoken.client._types import IssuedToken

DEFAULT_CACHE_SIZE = 10_000

Clock = Callable[[], dt.datetime]
"""Now, as an aware datetime; tests inject their own to step past refresh_after without sleeping."""


def utc_now() -> dt.datetime:
    """The default clock."""
    return dt.datetime.now(dt.UTC)


class CacheKey(NamedTuple):
    """The arguments of a get_token call: equal keys get the same token."""

    identity: str
    service_sid: str
    endpoint_id: str
    ttl: dt.timedelta | None
    region: str


class _Lru:
    """Tokens by key, least recently used first; not thread-safe (its owners lock around it)."""

    def __init__(self, capacity: int, clock: Clock) -> None:
        if capacity < 0:
            raise ValueError(f"cache_size must be 0 (no caching) or more, not {capacity}")
        self._capacity = capacity
        self._clock = clock
        self._tokens: OrderedDict[CacheKey, IssuedToken] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tokens)

    def fresh(self, key: CacheKey) -> IssuedToken | None:
        """The token for `key` if its refresh_after is still ahead; a stale one is dropped."""
        token = self._tokens.get(key)
        if token is None:
            return None
        if self._clock() >= token.refresh_after:
            del self._tokens[key]
            return None
        self._tokens.move_to_end(key)
        return token

    def put(self, key: CacheKey, token: IssuedToken) -> None:
        """Keep `token` unless it is already due for refresh (a 3-minute token is due the moment it is made)."""
        if self._capacity == 0 or self._clock() >= token.refresh_after:
            return
        self._tokens[key] = token
        self._tokens.move_to_end(key)
        while len(self._tokens) > self._capacity:
            self._tokens.popitem(last=False)


class _Flight:
    """One RPC in progress, that other threads wait for."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._token: IssuedToken | None = None
        self._error: BaseException | None = None

    def finish(self, token: IssuedToken | None, error: BaseException | None) -> None:
        self._token, self._error = token, error
        self._done.set()

    def wait(self) -> IssuedToken:
        # No timeout of its own: the leader's RPC has a deadline, and finish() runs whatever happens to it.
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._token is not None  # noqa: S101 - finish() sets one or the other
        return self._token


class TokenCache:
    """The cache for TokenClient: safe to share between threads."""

    def __init__(self, capacity: int = DEFAULT_CACHE_SIZE, clock: Clock = utc_now) -> None:
        self._lru = _Lru(capacity, clock)
        self._flights: dict[CacheKey, _Flight] = {}
        # Held only to look up and update the LRU and the flights, never during an RPC.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru)

    def get(self, key: CacheKey, fetch: Callable[[], IssuedToken]) -> IssuedToken:
        """The cached token for `key`, or the one `fetch` returns, fetching at most once at a time per key."""
        with self._lock:
            token = self._lru.fresh(key)
            if token is not None:
                return token
            flight = self._flights.get(key)
            leading = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leading:
            return flight.wait()
        try:
            token = fetch()
        except BaseException as exc:
            self._land(key, flight, None, exc)
            raise
        self._land(key, flight, token, None)
        return token

    def _land(self, key: CacheKey, flight: _Flight, token: IssuedToken | None, error: BaseException | None) -> None:
        # Stored and unregistered at once: a thread arriving now finds the token, not a finished flight.
        with self._lock:
            del self._flights[key]
            if token is not None:
                self._lru.put(key, token)
        flight.finish(token, error)


class AsyncTokenCache:
    """The cache for AsyncTokenClient: for the tasks of one event loop."""

    def __init__(self, capacity: int = DEFAULT_CACHE_SIZE, clock: Clock = utc_now) -> None:
        self._lru = _Lru(capacity, clock)
        self._flights: dict[CacheKey, asyncio.Task[IssuedToken]] = {}

    def __len__(self) -> int:
        return len(self._lru)

    async def get(self, key: CacheKey, fetch: Callable[[], Awaitable[IssuedToken]]) -> IssuedToken:
        """The cached token for `key`, or the one `fetch` returns, fetching at most once at a time per key."""
        token = self._lru.fresh(key)
        if token is not None:
            return token
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(self._fetch(key, fetch))
            flight.add_done_callback(_retrieve)
            self._flights[key] = flight
        # Shielded: a caller that is cancelled (its own timeout) does not cancel the others' RPC.
        return await asyncio.shield(flight)

    async def _fetch(self, key: CacheKey, fetch: Callable[[], Awaitable[IssuedToken]]) -> IssuedToken:
        try:
            token = await fetch()
        finally:
            del self._flights[key]
        self._lru.put(key, token)
        return token


def _retrieve(flight: asyncio.Task[IssuedToken]) -> None:
    # When every waiter was cancelled, nobody reads a failure; read it here so that
    # asyncio does not log "exception was never retrieved" with its traceback.
    if not flight.cancelled():
        flight.exception()
