"""The token buckets and the limit config, as plain units with a fake clock."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from support import POLICY_TOML, SECRET_ENV, Pki, config_text
from synctoken_server.config import load_config
from synctoken_server.configfile import ConfigError
from synctoken_server.limits import CallerLimits, Limit, RateLimiter, identity_digest

WriteConfig = Callable[[str], Path]
CALLER = "spiffe://t/svc"


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def taken(limiter: RateLimiter, limits: CallerLimits, count: int, identity: str = "alice") -> int:
    """How many of `count` requests at this instant were let through."""
    return sum(limiter.check(limits, CALLER, identity) is None for _ in range(count))


class TestRateLimiter:
    """Token buckets per caller and per identity."""

    def test_burst_then_refused_with_retry_after(self) -> None:
        """A full bucket lets `burst` through at once; the next one learns when a token will be there."""
        limiter = RateLimiter(Clock())
        limits = CallerLimits(caller=Limit(rate=2, burst=3))
        assert taken(limiter, limits, 3) == 3
        refusal = limiter.check(limits, CALLER, "alice")
        assert refusal is not None
        assert refusal.subject == f"caller:{CALLER}"
        assert refusal.retry_after == pytest.approx(0.5)
        assert not refusal.shadow

    @pytest.mark.parametrize(("elapsed", "allowed"), [(0.49, 0), (0.5, 1), (1.0, 2), (60.0, 3)])
    def test_refills_at_rate_up_to_burst(self, elapsed: float, allowed: int) -> None:
        """Tokens come back at `rate` per second, never beyond `burst`."""
        clock = Clock()
        limiter = RateLimiter(clock)
        limits = CallerLimits(caller=Limit(rate=2, burst=3))
        taken(limiter, limits, 3)
        clock.now += elapsed
        assert taken(limiter, limits, 10) == allowed

    def test_identity_limit_is_per_identity(self) -> None:
        """One identity's bucket running dry leaves the others alone, and names the identity only by digest."""
        limiter = RateLimiter(Clock())
        limits = CallerLimits(identity=Limit(rate=1, burst=2))
        assert taken(limiter, limits, 5, "alice") == 2
        assert taken(limiter, limits, 5, "bob") == 2
        refusal = limiter.check(limits, CALLER, "alice")
        assert refusal is not None
        assert refusal.subject == f"identity:{CALLER}/{identity_digest('alice')}"
        assert "alice" not in refusal.subject

    def test_refused_request_takes_nothing(self) -> None:
        """A request refused by the identity limit does not use up the caller's limit."""
        limiter = RateLimiter(Clock())
        limits = CallerLimits(caller=Limit(rate=1, burst=3), identity=Limit(rate=1, burst=1))
        assert taken(limiter, limits, 5, "alice") == 1
        assert taken(limiter, limits, 5, "bob") == 1
        assert taken(limiter, limits, 5, "carol") == 1

    def test_shadow_refusal_is_marked(self) -> None:
        """In shadow mode the refusal is computed as usual and says it is a shadow."""
        limiter = RateLimiter(Clock())
        limits = CallerLimits(caller=Limit(rate=1, burst=1), shadow=True)
        assert limiter.check(limits, CALLER, "alice") is None
        refusal = limiter.check(limits, CALLER, "alice")
        assert refusal is not None
        assert refusal.shadow

    def test_full_buckets_are_dropped(self) -> None:
        """Buckets that have refilled go away as new requests come: memory follows activity."""
        clock = Clock()
        limiter = RateLimiter(clock)
        limits = CallerLimits(identity=Limit(rate=10, burst=1))
        for i in range(100):
            limiter.check(limits, CALLER, f"user-{i}")
        assert len(limiter) == 100
        clock.now += 1
        for _ in range(100):
            limiter.check(limits, CALLER, "user-0")
        assert len(limiter) == 1

    def test_bucket_count_is_capped(self) -> None:
        """However many identities are active at once, no more than the cap are kept."""
        limiter = RateLimiter(Clock(), max_buckets=50)
        limits = CallerLimits(identity=Limit(rate=0.001, burst=1))
        for i in range(500):
            limiter.check(limits, CALLER, f"user-{i}")
        assert len(limiter) == 50

    def test_lowered_burst_applies_at_once(self) -> None:
        """A reload that lowers the burst caps a bucket that holds more."""
        limiter = RateLimiter(Clock())
        assert taken(limiter, CallerLimits(caller=Limit(rate=1, burst=10)), 1) == 1
        assert taken(limiter, CallerLimits(caller=Limit(rate=1, burst=2)), 10) == 2

    @pytest.mark.parametrize(
        ("limit", "workers", "share"),
        [
            (Limit(10, 20), 1, Limit(10, 20)),
            (Limit(10, 20), 4, Limit(2.5, 5)),
            (Limit(1, 1), 2, Limit(0.5, 1)),
        ],
    )
    def test_share_among_workers(self, limit: Limit, workers: int, share: Limit) -> None:
        """Each worker gets its part of the rate and burst, and never a burst below one token."""
        assert limit.share(workers) == share


LIMITED = 'default_ttl = "10m"'  # only callers[1] sets this


def limited_config(pki: Pki, lines: str, extra: str = "") -> str:
    """The suite's config with `lines` added to callers[1] and `extra` before the callers."""
    text = config_text(pki, policy=f"{extra}\n{POLICY_TOML}")
    assert LIMITED in text
    return text.replace(LIMITED, f"{LIMITED}\n{lines}", 1)


class TestLimitConfig:
    """The limit keys of a caller entry and the [limits] table."""

    @pytest.mark.parametrize(
        ("lines", "extra", "expected"),
        [
            ("rate = 2", "", CallerLimits(caller=Limit(2, 2))),
            ("rate = 0.5", "", CallerLimits(caller=Limit(0.5, 1))),
            ("rate = 5\nburst = 20\nshadow = true", "", CallerLimits(caller=Limit(5, 20), shadow=True)),
            ("identity_rate = 0.1\nidentity_burst = 3", "", CallerLimits(identity=Limit(0.1, 3))),
            ("rate = 1", "[limits]\nshadow = true", CallerLimits(caller=Limit(1, 1), shadow=True)),
            ("rate = 1\nshadow = false", "[limits]\nshadow = true", CallerLimits(caller=Limit(1, 1))),
        ],
    )
    def test_valid(self, pki: Pki, write_config: WriteConfig, lines: str, extra: str, expected: CallerLimits) -> None:
        """Rates may be fractional; the burst defaults to a second's worth; shadow is per caller or global."""
        config = load_config(write_config(limited_config(pki, lines, extra)), environ=SECRET_ENV)
        rules = list(config.policy)
        assert rules[1].limits == expected
        assert rules[0].limits is None

    @pytest.mark.parametrize(
        ("lines", "extra", "message"),
        [
            ("rate = 0", "", "callers[1].rate: 0 is not above 0 and at most 1e+06 per second"),
            ("rate = -1", "", "callers[1].rate: -1 is not above 0 and at most 1e+06 per second"),
            ('rate = "5/s"', "", "callers[1].rate: must be a number (tokens per second, e.g. 5 or 0.5)"),
            ("rate = true", "", "callers[1].rate: must be a number (tokens per second, e.g. 5 or 0.5)"),
            ("burst = 5", "", "callers[1].burst: needs callers[1].rate"),
            ("identity_burst = 5", "", "callers[1].identity_burst: needs callers[1].identity_rate"),
            ("rate = 1\nburst = 0", "", "callers[1].burst: 0 is not between 1 and 1000000"),
            ("rate = 1\nburst = 1.5", "", "callers[1].burst: must be a integer"),
            ("shadow = true", "", "callers[1].shadow: applies only with rate or identity_rate"),
            ("rate = 1\nshadow = 1", "", "callers[1].shadow: must be a boolean"),
            ("", "[limits]\nshadow = 1", "limits.shadow: must be a boolean"),
            ("", "[limits]\nburst = 1", "limits.burst: unknown key; expected one of shadow"),
        ],
    )
    def test_invalid(self, pki: Pki, write_config: WriteConfig, lines: str, extra: str, message: str) -> None:
        """Each defect names the file and the key."""
        path = write_config(limited_config(pki, lines, extra))
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ=SECRET_ENV)
        assert str(caught.value) == f"{path}: {message}"
