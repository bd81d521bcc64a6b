"""Human durations such as "1h30m", and moments in UTC, as written in the config and in messages."""

from __future__ import annotations

import datetime as dt
import re

_DURATION = re.compile(r"(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?(?:(?P<s>[0-9]+)s)?")

MIN_TTL_SECONDS = 3 * 60
"""The Sync SDK fires tokenAboutToExpire 3 minutes before expiry; a shorter
token would ask to be replaced the moment it arrives."""

MAX_TTL_SECONDS = 24 * 60 * 60
"""Twilio refuses Access Tokens that live longer than 24 hours."""


def parse_duration(text: str) -> int:
    """Parse "1h", "90m", "1h30m15s" into seconds; raise ValueError otherwise."""
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        msg = f"{text!r} is not a duration like 90s, 15m, 1h or 1h30m"
        raise ValueError(msg)
    hours, minutes, seconds = (int(match.group(g) or 0) for g in ("h", "m", "s"))
    return hours * 3600 + minutes * 60 + seconds


def format_duration(seconds: int) -> str:
    """Write seconds the way parse_duration reads them: 5400 -> "1h30m"."""
    if seconds == 0:
        return "0s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts)


_MILLISECONDS = re.compile(r"(?P<s>[0-9]+)s|(?P<ms>[0-9]+)ms")


def parse_milliseconds(text: str) -> int:
    """Parse a short timeout, "50ms" or "2s", into milliseconds; raise ValueError otherwise."""
    match = _MILLISECONDS.fullmatch(text)
    if match is None:
        msg = f"{text!r} is not a duration like 50ms or 2s"
        raise ValueError(msg)
    return int(match.group("ms")) if match.group("ms") is not None else int(match.group("s")) * 1000


def format_milliseconds(milliseconds: int) -> str:
    """Write milliseconds the way parse_milliseconds reads them: 2000 -> "2s", 50 -> "50ms"."""
    seconds, rest = divmod(milliseconds, 1000)
    return f"{seconds}s" if milliseconds and not rest else f"{milliseconds}ms"


def format_utc(moment: dt.datetime | float) -> str:
    """A moment (an aware datetime, or Unix seconds) in UTC to the second: "2026-01-31T12:00:00Z"."""
    if not isinstance(moment, dt.datetime):
        moment = dt.datetime.fromtimestamp(moment, dt.UTC)
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
