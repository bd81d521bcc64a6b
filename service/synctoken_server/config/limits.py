"""A `[[callers]]` entry's rate keys and `[limits] shadow`, read into `policy.limits.CallerLimits`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from synctoken_server.config.reader import TomlReader
from synctoken_server.policy.limits import MAX_BURST, MAX_RATE, CallerLimits, Limit

CALLER_KEYS = frozenset({"rate", "burst", "identity_rate", "identity_burst", "shadow"})
"""The keys a `[[callers]]` entry may use for limits."""
TABLE_KEYS = frozenset({"shadow"})
"""What [limits] may hold."""


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
