"""Global rate limits: the token buckets kept in Redis, so every process and replica shares one limit.

Imported only when a config sets `[limits] backend = "redis"`: without it,
no Redis client is loaded.

Each bucket is one key holding a GCRA "theoretical arrival time" (TAT, in
microseconds of Redis's own clock): the token bucket in one number. A bucket
of `burst` tokens refilling at `rate` per second, with T = 1/rate, holds
burst - (TAT - now)/T tokens; a request may take one when TAT - now <=
(burst - 1)·T, and taking moves TAT to max(TAT, now) + T. The key expires at
TAT, when the bucket is full again: a missing key is a full bucket, so
expiry forgets nothing. One Lua script checks the caller's key and the
identity's together and writes either both or neither, atomically, with the
time taken from Redis (`TIME`) so that replicas need no clock agreement.

Keys are `<prefix>:{<caller id>}:caller` and `<prefix>:{<caller id>}:identity:<digest>`:
the `{...}` hash tag puts both keys of one call in one Redis Cluster slot (a
script may only touch keys of one slot), and the identity is only ever its
digest (the keyed `h:` hash with private audit on), as in QuotaFailure.

Every call is bounded (`timeout`, connecting included) and never retried
(scriptclient.py, the one command of the request path, pipelined): a request
waits for Redis at most that long. A circuit breaker
(policy/limitbackend.py) stops calling a Redis that keeps failing; meanwhile,
and for any failed call, `on_backend_failure` decides: this process's share
of the limit in its local buckets, no limit, or a refusal. A connection that
stalls or breaks, or an opening that fails, after every call waiting on it has
given up (its RPC cancelled first) is one failure too: else, with RPC
deadlines shorter than the timeout, the breaker would never open.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from synctoken_server.limitstore.scriptclient import AUTH_REFUSALS, OpeningRefused, ResponseError, ScriptClient
from synctoken_server.metrics import Metrics
from synctoken_server.policy.limitbackend import BackendUnavailable, Breaker, OnBackendFailure, RedisSettings
from synctoken_server.policy.limits import CallerLimits, OverLimit, RateLimiter

_log = structlog.get_logger("synctoken.limits")
_FAILURES = (ResponseError, OSError, TimeoutError)
"""What a call to Redis may fail with (scriptclient.ScriptClient's errors): each one counted, then the fallback."""

# KEYS: one to two bucket keys; ARGV: each key's emission interval T (µs) and burst.
# Returns {0, 0} when every bucket had a token (and each gave one), else
# {i, µs} for the first key i without one and how long until it has.
GCRA_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end -- only Redis < 5 needs it; a no-op after
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local after = {}
for i = 1, #KEYS do
  local interval, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now) or now
  if tat < now then tat = now end
  local wait = tat - now - (burst - 1) * interval
  if wait > 0 then return {i, math.ceil(wait)} end
  after[i] = tat + interval
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.17g', after[i]), 'PX', math.ceil((after[i] - now) / 1000))
end
return {0, 0}
"""

_CALLER_DESCRIPTION = "the caller's rate limit"
_IDENTITY_DESCRIPTION = "the caller's rate limit for one identity"
_MICROSECONDS = 1_000_000
_ECHO_PREFIX = 8
"""How much of the password found in an error's text means the text quotes it."""


class RedisLimiter:
    """The global buckets in Redis, with the breaker and the fallback around every call."""

    def __init__(
        self,
        settings: RedisSettings,
        local: RateLimiter,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._client = ScriptClient(settings, GCRA_SCRIPT, unheard=self._failed)
        self._local = local
        """The local buckets, used only while Redis cannot answer (on_backend_failure = local)."""
        self._metrics = metrics
        self._clock = clock
        self._timeout = settings.timeout_ms / 1000
        self._breaker = Breaker(settings.breaker_failures, settings.breaker_cooldown_ms / 1000)
        self._failing = False
        """Whether the last call failed: only the first failure of a run is logged."""
        self._prefix = settings.key_prefix

    @property
    def breaker_closed(self) -> bool:
        """Whether calls go to Redis (False while the breaker is open or probing)."""
        return self._breaker.is_closed

    async def start(self) -> None:
        """Ask Redis once, so that a wrong password or an unreachable server is logged at start-up, not later."""
        _log.info(
            "rate_limit.backend",
            backend="redis",
            url=self._settings.url,
            timeout_ms=self._settings.timeout_ms,
            batch_window_ms=self._settings.batch_window_ms,
            on_backend_failure=self._settings.on_failure.value,
        )
        started = time.perf_counter()
        try:
            await self._client.ping()
        except _FAILURES as exc:
            self._answered(started, exc)
            return
        self._answered(started, None)

    async def close(self) -> None:
        """Close the connections."""
        await self._client.close()

    def keys(self, caller_id: str, digest: str) -> tuple[str, str]:
        """The caller's key and the identity's (by the identity's digest)."""
        tagged = f"{self._prefix}:{{{caller_id}}}"
        return f"{tagged}:caller", f"{tagged}:identity:{digest}"

    async def check(
        self,
        limits: CallerLimits,
        local: CallerLimits,
        caller_id: str,
        identity: str,
        digest: Callable[[str], str],
    ) -> OverLimit | BackendUnavailable | None:
        """Take a token from each global bucket that applies (both or neither), or say which one is empty.

        `limits` are the configured (global) ones, `local` this process's share,
        used when Redis cannot answer and on_backend_failure is local.
        """
        now = self._clock()
        if not self._breaker.allows(now):
            return self._fallback(local, caller_id, identity, digest, now)
        probe = not self._breaker.is_closed
        named = digest(identity)
        caller_key, identity_key = self.keys(caller_id, named)
        keys: list[str] = []
        args: list[str] = []
        for limit, key in ((limits.caller, caller_key), (limits.identity, identity_key)):
            if limit is not None:
                keys.append(key)
                args += [repr(_MICROSECONDS / limit.rate), repr(limit.burst)]
        started = time.perf_counter()
        try:
            refused, wait = _pair(await self._client.run(keys, args))
        except _FAILURES as exc:
            self._answered(started, exc)
            return self._fallback(local, caller_id, identity, digest, self._clock())
        except BaseException:
            # Cancelled (the RPC went away): no verdict on Redis, but a probe left unfinished would keep
            # every later call from Redis for good.
            if probe:
                self._breaker.abandoned()
            raise
        self._answered(started, None)
        if not refused:
            return None
        # The script names the bucket by its place in KEYS: the caller's comes first when it has a limit.
        if refused == 1 and limits.caller is not None:
            return OverLimit(f"caller:{caller_id}", _CALLER_DESCRIPTION, wait / _MICROSECONDS, limits.shadow)
        subject = f"identity:{caller_id}/{named}"
        return OverLimit(subject, _IDENTITY_DESCRIPTION, wait / _MICROSECONDS, limits.shadow)

    def _answered(self, started: float, failure: BaseException | None) -> None:
        """One call's latency counted; its failure counted and logged, or its success told to the breaker."""
        self._metrics.backend_latency.observe(time.perf_counter() - started)
        if failure is not None:
            self._failed(failure)
            return
        if self._breaker.succeeded():
            _log.info("rate_limit.backend_recovered", backend="redis", url=self._settings.url)
        self._failing = False

    def _failed(self, exc: BaseException) -> None:
        """A failed call, or a failure no call was left to hear: counted, told to the breaker, logged.

        The second (every caller had given up first, as with RPC deadlines shorter than the timeout)
        comes from the script client, for a connection or an opening that failed.
        """
        kind, problem = _describe(exc, self._settings.timeout_ms, self._settings.password)
        self._metrics.backend_errors.labels(kind).inc()
        opened = self._breaker.failed(self._clock())
        if not self._failing:
            self._failing = True
            # An authentication failure will not go away by itself: an error, not a warning.
            log = _log.error if kind == "auth" else _log.warning
            log(
                "rate_limit.backend_failed",
                backend="redis",
                url=self._settings.url,
                kind=kind,
                problem=problem,
                on_backend_failure=self._settings.on_failure.value,
            )
        if opened:
            _log.warning(
                "rate_limit.backend_breaker_open",
                backend="redis",
                url=self._settings.url,
                cooldown_ms=self._settings.breaker_cooldown_ms,
                on_backend_failure=self._settings.on_failure.value,
            )

    def _fallback(
        self, local: CallerLimits, caller_id: str, identity: str, digest: Callable[[str], str], now: float
    ) -> OverLimit | BackendUnavailable | None:
        on_failure = self._settings.on_failure
        self._metrics.backend_fallbacks.labels(on_failure.value).inc()
        if on_failure is OnBackendFailure.LOCAL:
            return self._local.check(local, caller_id, identity, digest)
        if on_failure is OnBackendFailure.ALLOW:
            return None
        # Not before the next call may try Redis again: a sooner retry would be refused the same way.
        return BackendUnavailable(max(self._breaker.retry_after(now), self._timeout))


def _pair(reply: object) -> tuple[int, int]:
    """The script's {i, µs} reply as two integers."""
    if type(reply) is list and [type(item) for item in reply] == [int, int]:
        return reply[0], reply[1]
    msg = f"the limits script answered {reply!r}, not two integers"
    raise ResponseError(msg)


def _describe(exc: BaseException, timeout_ms: int, password: str | None) -> tuple[str, str]:
    """A bounded `kind` label for the error counter, and what happened in words (never a password).

    A reply to the opening commands (AUTH among them) is only ever its error code (OpeningRefused):
    whatever answers at the URL may quote the command it refused, escaped or cut in any way. Other
    replies are quoted, and as a second net a text holding the password's start (Redis itself cuts
    each echoed argument at 128 characters) is left out whole.
    """
    kind, problem = _classify(exc, timeout_ms)
    if password and password[:_ECHO_PREFIX] in problem:
        problem = f"{type(exc).__name__} (its text is left out: it quotes the password)"
    return kind, problem


_CREDENTIALS = "Redis refused the credentials: check limits.redis.password_file and the URL's user name"


def _classify(exc: BaseException, timeout_ms: int) -> tuple[str, str]:
    if isinstance(exc, OpeningRefused):
        if exc.refused_login:
            return "auth", f"{_CREDENTIALS} ({exc})"
        code = exc.code or "an error code Redis does not use"
        return (
            "error",
            f"Redis refused {exc.command} ({code}; the rest of its reply is left out: it may quote the command)",
        )
    if isinstance(exc, ResponseError) and str(exc).startswith(AUTH_REFUSALS):
        return "auth", f"{_CREDENTIALS} ({type(exc).__name__}: {exc})"
    if isinstance(exc, TimeoutError):
        return "timeout", f"no answer within {timeout_ms}ms"
    if isinstance(exc, OSError):
        return "connection", f"{type(exc).__name__}: {exc}"
    return "error", f"{type(exc).__name__}: {exc}"
