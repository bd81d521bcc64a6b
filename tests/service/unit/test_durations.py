"""Durations as written in the config and in messages."""

from __future__ import annotations

import datetime as dt

import pytest

from synctoken_server.durations import format_duration, format_utc, parse_duration


class TestDurations:
    """parse_duration and format_duration agree with each other."""

    @pytest.mark.parametrize(
        ("text", "seconds"),
        [("90s", 90), ("15m", 900), ("1h", 3600), ("1h30m", 5400), ("24h", 86400), ("1h0m1s", 3601), ("0s", 0)],
    )
    def test_parse(self, text: str, seconds: int) -> None:
        """Hours, minutes and seconds, in that order, add up."""
        assert parse_duration(text) == seconds

    @pytest.mark.parametrize("text", ["", "1", "1d", "30m1h", "-5m", "1.5h", " 1h", "1H"])
    def test_parse_invalid(self, text: str) -> None:
        """Anything else is refused with a message showing the accepted forms."""
        with pytest.raises(ValueError, match="is not a duration like 90s, 15m, 1h or 1h30m"):
            parse_duration(text)

    @pytest.mark.parametrize("seconds", [0, 1, 59, 60, 179, 3600, 3601, 5400, 86400, 86401])
    def test_round_trip(self, seconds: int) -> None:
        """What format_duration writes, parse_duration reads back."""
        assert parse_duration(format_duration(seconds)) == seconds


class TestFormatUtc:
    """format_utc writes a moment as every message and log line does: UTC, to the second, with a Z."""

    def test_datetime_in_another_zone(self) -> None:
        """An aware datetime in another zone is written in UTC, its microseconds dropped."""
        moment = dt.datetime(2026, 1, 31, 13, 30, 5, 999_999, tzinfo=dt.timezone(dt.timedelta(hours=1)))
        assert format_utc(moment) == "2026-01-31T12:30:05Z"

    def test_unix_seconds(self) -> None:
        """Unix seconds are a moment too (the key ledger keeps them so)."""
        assert format_utc(1_769_862_605) == "2026-01-31T12:30:05Z"
