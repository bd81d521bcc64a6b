"""Durations written as in synctoken's config ("200s", "30m", "1h30m"), for BFF_TOKEN_TTL."""

from __future__ import annotations

import datetime as dt

from synctoken.client import parse_duration as parse_config_duration


def parse_duration(text: str, what: str) -> dt.timedelta:
    """A positive duration such as "90s" or "1h30m"; raise ValueError naming `what` otherwise.

    The grammar is the client library's, which is the server config's: whole units, each once, largest first.
    """
    try:
        duration = parse_config_duration(text)
    except ValueError:
        raise ValueError(f'{what} must be a duration like "200s", "30m" or "1h30m", not {text!r}') from None
    if duration <= dt.timedelta(0):
        raise ValueError(f"{what} must be above 0, not {text!r}")
    return duration
