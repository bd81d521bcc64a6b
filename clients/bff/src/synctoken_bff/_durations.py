"""Durations written as in synctoken's config ("200s", "30m", "1h30m"), for BFF_TOKEN_TTL."""

from __future__ import annotations

import datetime as dt
import re

_PART = re.compile(r"(\d+)(h|m|s)")
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1}


def parse_duration(text: str, what: str) -> dt.timedelta:
    """A positive whole-unit duration such as "90s" or "1h30m"; raise ValueError naming `what` otherwise."""
    parts = _PART.findall(text)
    # Whole units only, each once, largest first: the server's config accepts no more than that.
    if (
        not parts
        or "".join(n + u for n, u in parts) != text
        or [u for _, u in parts] != sorted({u for _, u in parts}, key="hms".index)
    ):
        raise ValueError(f'{what} must be a duration like "200s", "30m" or "1h30m", not {text!r}')
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{what} must be above 0, not {text!r}")
    return dt.timedelta(seconds=seconds)
