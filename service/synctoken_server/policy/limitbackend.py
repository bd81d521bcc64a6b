"""Where rate limits are kept when they are global (Redis), and what happens while it is away; no I/O here.

`RedisSettings` is what `[limits.redis]` says, read by config/limits.py;
`Breaker` decides, from the outcomes of the calls so far, whether the next
call may go to Redis at all. The client that talks to Redis is
limitstore/redisbuckets.py, imported only when a config names Redis.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from synctoken_server.policy.limits import CallerLimits, OverLimit


class OnBackendFailure(enum.Enum):
    """What a request's limit check does while Redis cannot answer (`[limits] on_backend_failure`)."""

    LOCAL = "local"
    """This process's buckets, with its share of each limit: as without Redis."""
    ALLOW = "allow"
    """No limit at all until Redis is back."""
    DENY = "deny"
    """Refuse every limited request with UNAVAILABLE until Redis is back."""


@dataclass(frozen=True)
class RedisSettings:
    """How to reach the Redis that holds the global limits; the password never shows in a repr."""

    url: str
    """As configured, without any password (the loader refuses one): for logs and check-config."""
    host: str = ""
    port: int = 6379
    unix_socket: str = ""
    """A unix socket's path; host and port are unused then."""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: Path | None = None
    """Where the password was read from: what a reload compares."""
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout_ms: int = 50
    """The bound on one call, connecting included: no call waits longer for Redis."""
    batch_window_ms: int = 1
    """How long a limit check may wait for others to share its write to Redis (limitstore/batching.py); 0: never."""
    breaker_failures: int = 3
    """This many failed calls in a row open the breaker."""
    breaker_cooldown_ms: int = 1000
    """How long an open breaker sends no call to Redis; then one call probes."""
    key_prefix: str = "synctoken"
    on_failure: OnBackendFailure = OnBackendFailure.LOCAL


@dataclass(frozen=True, slots=True)
class BackendUnavailable:
    """The global limits could not be checked and `on_backend_failure` is deny: refuse, retry after this long."""

    retry_after: float
    """Seconds."""


class GlobalLimiter(Protocol):
    """Takes from the global buckets (limitstore.redisbuckets.RedisLimiter), or falls back as configured."""

    async def check(
        self,
        limits: CallerLimits,
        local: CallerLimits,
        caller_id: str,
        identity: str,
        digest: Callable[[str], str],
    ) -> OverLimit | BackendUnavailable | None:
        """As RateLimiter.check, under the global `limits`; `local` is this process's share, for the fallback."""
        ...


class Breaker:
    """A circuit breaker: after `failures` failed calls in a row, no call for `cooldown` seconds, then one probe.

    Closed (calls go through) until the failures; open (no call) for the
    cool-down; then half-open, where the first caller gets to probe and every
    other caller is told no until the probe ends: success closes it, failure
    opens it again for another cool-down. So a dead Redis costs one call per
    cool-down, not one per request.
    """

    __slots__ = ("_cooldown", "_failed", "_failures", "_open_until", "_probing")

    def __init__(self, failures: int, cooldown: float) -> None:
        self._failures = failures
        self._cooldown = cooldown
        self._failed = 0
        """Failed calls in a row."""
        self._open_until: float | None = None
        """While open: until when; None while closed."""
        self._probing = False

    @property
    def is_closed(self) -> bool:
        """Whether calls go through as usual."""
        return self._open_until is None

    def allows(self, now: float) -> bool:
        """Whether a call may go to Redis now; a True while not closed makes the caller the probe."""
        if self._open_until is None:
            return True
        if now < self._open_until or self._probing:
            return False
        self._probing = True
        return True

    def retry_after(self, now: float) -> float:
        """Seconds until the next probe may go (0 when closed or due)."""
        return 0.0 if self._open_until is None else max(0.0, self._open_until - now)

    def succeeded(self) -> bool:
        """Record a call that worked; return whether that closed an open breaker."""
        self._failed = 0
        self._probing = False
        if self._open_until is None:
            return False
        self._open_until = None
        return True

    def abandoned(self) -> None:
        """Record that the probe ended without an answer (its RPC was cancelled): the next caller probes."""
        self._probing = False

    def failed(self, now: float) -> bool:
        """Record a failed call; return whether that opened the breaker (from closed)."""
        self._failed += 1
        was_closed = self._open_until is None
        if self._probing or self._failed >= self._failures:
            self._probing = False
            self._open_until = now + self._cooldown
            return was_closed
        return False
