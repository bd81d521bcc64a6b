"""A `[[callers]]` entry's rate keys and `[limits]`, read into `policy.limits.CallerLimits` and the limits' backend.

`[limits] backend` says where the buckets are: "local" (each process its
own, with its share of every limit) or "redis" (global, in the Redis that
`[limits.redis]` names: limitstore/redisbuckets.py). `[limits.redis]` and
`on_backend_failure` are read and checked whatever the backend, so that a
table kept for later is known to be right, and used only with "redis".
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from synctoken_server.config.reader import TomlReader
from synctoken_server.durations import format_milliseconds, parse_milliseconds
from synctoken_server.policy.limitbackend import OnBackendFailure, RedisSettings
from synctoken_server.policy.limits import MAX_BURST, MAX_RATE, CallerLimits, Limit

CALLER_KEYS = frozenset({"rate", "burst", "identity_rate", "identity_burst", "shadow"})
"""The keys a `[[callers]]` entry may use for limits."""
TABLE_KEYS = frozenset({"shadow", "replicas", "backend", "on_backend_failure", "redis"})
"""What [limits] may hold."""
REDIS_KEYS = frozenset(
    {
        "url",
        "password_file",
        "ca_file",
        "cert_file",
        "key_file",
        "timeout",
        "batch_window",
        "breaker_failures",
        "breaker_cooldown",
        "key_prefix",
    }
)
"""What [limits.redis] may hold."""

BACKENDS = ("local", "redis")
MAX_REPLICAS = 1000
_DEFAULT_TIMEOUT = "50ms"
_TIMEOUT_MS = (1, 5000)
_DEFAULT_BATCH_WINDOW = "1ms"
_BATCH_WINDOW_MS = (0, 10)
_DEFAULT_COOLDOWN = "1s"
_COOLDOWN_MS = (10, 600_000)
_MAX_BREAKER_FAILURES = 1000
_DEFAULT_PREFIX = "synctoken"
_SCHEMES = ("redis://host:port/db", "rediss://host:port/db", "unix:///path?db=0")


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
    table = r.table(data, "limits", TABLE_KEYS, required=False)
    return r.get(table, "limits", "shadow", bool, default=False)


def read_replicas(r: TomlReader, data: Mapping[str, Any]) -> int:
    """`[limits] replicas`: how many replicas serve the same callers, so each process's local buckets hold its share.

    A replica cannot count the others, so the operator says it: each process's
    local share is then limit / (replicas x workers). It matters where local
    buckets stand for a global limit: the local backend, and the Redis
    backend's fallback while Redis is away.
    """
    table = r.table(data, "limits", TABLE_KEYS, required=False)
    replicas = r.get(table, "limits", "replicas", int, 1)
    if not 1 <= replicas <= MAX_REPLICAS:
        raise r.fail("limits.replicas", f"{replicas} is not between 1 and {MAX_REPLICAS}")
    return replicas


def read_backend(r: TomlReader, data: Mapping[str, Any]) -> RedisSettings | None:
    """`[limits] backend` and `[limits.redis]`: the Redis that holds the global limits, or None (local buckets)."""
    table = r.table(data, "limits", TABLE_KEYS, required=False)
    backend = r.get(table, "limits", "backend", str, "local")
    if backend not in BACKENDS:
        raise r.fail("limits.backend", f"{backend!r} is not one of {', '.join(BACKENDS)}")
    text = r.get(table, "limits", "on_backend_failure", str, OnBackendFailure.LOCAL.value)
    try:
        on_failure = OnBackendFailure(text)
    except ValueError:
        choices = ", ".join(choice.value for choice in OnBackendFailure)
        raise r.fail("limits.on_backend_failure", f"{text!r} is not one of {choices}") from None
    if "redis" not in table:
        r.note("limits.redis", None)
        if backend == "redis":
            raise r.fail("limits.redis", 'missing table: backend = "redis" needs [limits.redis] with its url')
        return None
    redis = table["redis"]
    if not isinstance(redis, dict):
        raise r.fail("limits.redis", "must be a table")
    r.reject_unknown(redis, "limits.redis", REDIS_KEYS)
    settings = _redis(r, redis, on_failure)
    return settings if backend == "redis" else None


def _redis(r: TomlReader, table: Mapping[str, Any], on_failure: OnBackendFailure) -> RedisSettings:
    key = "limits.redis"
    settings = _url(r, table)
    paths = _tls_files(r, table, tls=settings.tls)
    password = _password(r, table)
    if settings.username is not None and password is None:
        # AUTH needs a password: without one the client would not log in, and Redis would serve it
        # as its default user, not the one the URL names.
        raise r.fail(
            f"{key}.password_file",
            f"missing: the URL names the user {settings.username!r}, and Redis logs a user in only with its password",
        )
    password_file = r.path(table["password_file"]) if password is not None else None
    timeout = _milliseconds(r, table, "timeout", _DEFAULT_TIMEOUT, _TIMEOUT_MS)
    # Unset, the window is 0 where the default would not fit the timeout: a timeout valid before the window
    # existed must not make the config fail over a key the operator never wrote.
    fits = 2 * parse_milliseconds(_DEFAULT_BATCH_WINDOW) < timeout
    window = _milliseconds(r, table, "batch_window", _DEFAULT_BATCH_WINDOW if fits else "0ms", _BATCH_WINDOW_MS)
    if window and 2 * window >= timeout:
        # A check waits in the window only with more than twice the window left before its deadline.
        raise r.fail(f"{key}.batch_window", f"must be less than half of limits.redis.timeout ({timeout}ms), or 0ms")
    cooldown = _milliseconds(r, table, "breaker_cooldown", _DEFAULT_COOLDOWN, _COOLDOWN_MS)
    failures = r.get(table, key, "breaker_failures", int, 3)
    if not 1 <= failures <= _MAX_BREAKER_FAILURES:
        raise r.fail(f"{key}.breaker_failures", f"{failures} is not between 1 and {_MAX_BREAKER_FAILURES}")
    prefix = r.get(table, key, "key_prefix", str, _DEFAULT_PREFIX)
    if not prefix or any(c in "{}" or c.isspace() or not c.isprintable() for c in prefix):
        raise r.fail(f"{key}.key_prefix", "must be non-empty, printable, without spaces or braces")
    return RedisSettings(
        url=settings.url,
        host=settings.host,
        port=settings.port,
        unix_socket=settings.unix_socket,
        db=settings.db,
        username=settings.username,
        password=password,
        password_file=password_file,
        tls=settings.tls,
        ca_file=paths.get("ca_file"),
        cert_file=paths.get("cert_file"),
        key_file=paths.get("key_file"),
        timeout_ms=timeout,
        batch_window_ms=window,
        breaker_failures=failures,
        breaker_cooldown_ms=cooldown,
        key_prefix=prefix,
        on_failure=on_failure,
    )


def _tls_files(r: TomlReader, table: Mapping[str, Any], *, tls: bool) -> dict[str, Path]:
    """`ca_file`, `cert_file` and `key_file`, each readable (rediss:// only), by name."""
    key = "limits.redis"
    paths = {}
    for name in ("ca_file", "cert_file", "key_file"):
        r.note(f"{key}.{name}", None)
        if name not in table:
            continue
        if not tls:
            raise r.fail(f"{key}.{name}", "applies only to a rediss:// url (Redis over TLS)")
        value = r.get(table, key, name, str)
        r.read_file(f"{key}.{name}", value, private=name == "key_file")
        paths[name] = r.path(value)
    if ("cert_file" in table) != ("key_file" in table):
        raise r.fail(f"{key}.cert_file", "set cert_file and key_file together (the client certificate and its key)")
    return paths


def _password(r: TomlReader, table: Mapping[str, Any]) -> str | None:
    """The password in `password_file`: its one line, without the newline; never echoed."""
    path = "limits.redis.password_file"
    r.note(path, None)
    if "password_file" not in table:
        return None
    raw = r.read_file(path, r.get(table, "limits.redis", "password_file", str), private=True, echo=False)
    try:
        password = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise r.fail(path, "the password file is not UTF-8 text") from None
    if not password or "\n" in password:
        raise r.fail(path, "the password file must hold one non-empty line")
    return password


def _url(r: TomlReader, table: Mapping[str, Any]) -> RedisSettings:
    """`url`, checked before it is recorded: a URL holding a password is refused and never echoed."""
    path = "limits.redis.url"
    text = table.get("url")
    if text is None:
        raise r.fail(path, f"missing: where Redis is ({', '.join(_SCHEMES)})")
    if not isinstance(text, str):
        raise r.fail(path, "must be a string")
    try:
        url = urllib.parse.urlsplit(text)
        password, username, port = url.password, url.username, url.port
    except ValueError:
        raise r.fail(path, f"not a URL like {', '.join(_SCHEMES)}") from None
    # redis-py's from_url also takes the password as ?password=: refused the same way, before any
    # message below could quote the URL.
    if password is not None or "password" in urllib.parse.parse_qs(url.query, keep_blank_values=True):
        raise r.fail(
            path,
            "the URL holds a password, and the URL is shown by check-config and in logs: "
            "put the password in limits.redis.password_file",
        )
    if url.scheme not in ("redis", "rediss", "unix") or url.fragment:
        raise r.fail(path, f"{text!r} is not a URL like {', '.join(_SCHEMES)}")
    user = urllib.parse.unquote(username) if username else None
    if url.scheme == "unix":
        if not url.path or url.netloc:
            raise r.fail(path, f"{text!r}: a unix socket URL is unix:///absolute/path (optionally ?db=N)")
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        if set(query) - {"db"} or len(query.get("db", [])) > 1:
            raise r.fail(path, f"{text!r}: the only query a unix socket URL may have is ?db=N")
        db = _db(r, path, text, query.get("db", ["0"])[0])
        r.note(path, text)
        return RedisSettings(url=text, unix_socket=url.path, db=db, username=user)
    if not url.hostname or url.query:
        raise r.fail(path, f"{text!r} is not a URL like {', '.join(_SCHEMES)}")
    db = _db(r, path, text, url.path.removeprefix("/") or "0")
    r.note(path, text)
    return RedisSettings(
        url=text, host=url.hostname, port=port or 6379, db=db, username=user, tls=url.scheme == "rediss"
    )


def _db(r: TomlReader, path: str, text: str, value: str) -> int:
    if not value.isdigit() or not value.isascii():
        raise r.fail(path, f"{text!r}: the database is a number (redis://host:6379/0)")
    return int(value)


def _milliseconds(r: TomlReader, table: Mapping[str, Any], name: str, default: str, bounds: tuple[int, int]) -> int:
    path = f"limits.redis.{name}"
    text = r.get(table, "limits.redis", name, str, default)
    try:
        value = parse_milliseconds(text)
    except ValueError as exc:
        raise r.fail(path, str(exc)) from None
    low, high = bounds
    if not low <= value <= high:
        raise r.fail(path, f"{text} is not between {format_milliseconds(low)} and {format_milliseconds(high)}")
    r.note(path, format_milliseconds(value))
    return value


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
