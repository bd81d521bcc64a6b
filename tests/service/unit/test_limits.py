"""The token buckets and the limit config, as plain units with a fake clock."""

from __future__ import annotations

import pytest

from support.configs import POLICY_TOML, SECRET_ENV, WriteConfig, config_text
from support.pki import Pki
from synctoken_server.config.reader import ConfigError
from synctoken_server.config.schema import load_config
from synctoken_server.policy.limits import TABLE_FULL_SUBJECT, CallerLimits, Limit, RateLimiter, identity_digest

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
        """However many identities are active at once, no more than the cap are kept; the rest are refused."""
        limiter = RateLimiter(Clock(), max_buckets=50)
        limits = CallerLimits(identity=Limit(rate=0.001, burst=1))
        assert sum(limiter.check(limits, CALLER, f"user-{i}") is None for i in range(500)) == 50
        assert len(limiter) == 50

    def test_lowered_burst_applies_at_once(self) -> None:
        """A reload that lowers the burst caps a bucket that holds more."""
        limiter = RateLimiter(Clock())
        assert taken(limiter, CallerLimits(caller=Limit(rate=1, burst=10)), 1) == 1
        assert taken(limiter, CallerLimits(caller=Limit(rate=1, burst=2)), 10) == 2

    def test_caller_refusal_creates_no_identity_bucket(self) -> None:
        """A caller over its own limit can send any number of identities: none of them gets a bucket."""
        limiter = RateLimiter(Clock())
        limits = CallerLimits(caller=Limit(rate=0.001, burst=1), identity=Limit(rate=1, burst=5))
        assert taken(limiter, limits, 1) == 1
        before = len(limiter)
        for i in range(200):
            refusal = limiter.check(limits, CALLER, f"user-{i}")
            assert refusal is not None
            assert refusal.subject == f"caller:{CALLER}"
        assert len(limiter) == before

    def test_identity_refusal_creates_no_caller_bucket(self) -> None:
        """An identity over its limit does not make a caller bucket when a reload has just added the caller limit."""
        limiter = RateLimiter(Clock())
        assert taken(limiter, CallerLimits(identity=Limit(rate=0.001, burst=1)), 1) == 1
        assert len(limiter) == 1
        both = CallerLimits(caller=Limit(rate=1, burst=5), identity=Limit(rate=0.001, burst=1))
        refusal = limiter.check(both, CALLER, "alice")
        assert refusal is not None
        assert refusal.subject.startswith("identity:")
        assert len(limiter) == 1

    def test_table_full_refusal_creates_nothing(self) -> None:
        """A request refused for want of room takes no token from its caller's existing bucket."""
        limiter = RateLimiter(Clock(), max_buckets=3)
        limits = CallerLimits(caller=Limit(rate=0.001, burst=3), identity=Limit(rate=0.001, burst=1))
        assert taken(limiter, limits, 1, "alice") == 1
        assert taken(limiter, limits, 1, "bob") == 1
        for i in range(10):
            refusal = limiter.check(limits, CALLER, f"user-{i}")
            assert refusal is not None
            assert refusal.subject == TABLE_FULL_SUBJECT
        assert len(limiter) == 3
        # Nothing was taken from the caller's bucket by those ten: it still holds its last token.
        assert limiter.check(CallerLimits(caller=Limit(rate=0.001, burst=3)), CALLER, "alice") is None

    @pytest.mark.parametrize("others", [9, 100, 5000])
    def test_drained_identity_outlives_a_flood(self, others: int) -> None:
        """A drained "1 per hour" identity stays drained however many other identities are pushed through."""
        clock = Clock()
        limiter = RateLimiter(clock, max_buckets=8)
        hourly = CallerLimits(identity=Limit(rate=1 / 3600, burst=1))
        assert taken(limiter, hourly, 2, "victim") == 1
        for i in range(others):
            clock.now += 0.01
            limiter.check(hourly, CALLER, f"other-{i}")
        clock.now += 60
        refusal = limiter.check(hourly, CALLER, "victim")
        assert refusal is not None
        assert refusal.subject == f"identity:{CALLER}/{identity_digest('victim')}"
        assert len(limiter) <= 8

    def test_table_full_refusal_says_when_room_comes(self) -> None:
        """Refused for want of room, a request learns when the first bucket will have refilled; then it goes in."""
        clock = Clock()
        limiter = RateLimiter(clock, max_buckets=4)
        limits = CallerLimits(identity=Limit(rate=0.1, burst=1))
        for i in range(4):
            assert limiter.check(limits, CALLER, f"user-{i}") is None
            clock.now += 1
        refusal = limiter.check(limits, CALLER, "late")
        assert refusal is not None
        assert refusal.subject == TABLE_FULL_SUBJECT
        assert refusal.retry_after == pytest.approx(6)
        clock.now += refusal.retry_after
        assert limiter.check(limits, CALLER, "late") is None
        assert len(limiter) == 4
        # The bucket that made room was user-0's, which had refilled; the others are still drained.
        for i in range(1, 4):
            refusal = limiter.check(limits, CALLER, f"user-{i}")
            assert refusal is not None
            assert refusal.subject == f"identity:{CALLER}/{identity_digest(f'user-{i}')}"

    def test_room_comes_from_refilled_buckets_not_the_oldest(self) -> None:
        """When the oldest bucket is still refilling, newer ones that have refilled make the room."""
        clock = Clock()
        limiter = RateLimiter(clock, max_buckets=4)
        slow = CallerLimits(caller=Limit(rate=0.001, burst=1))
        fast = CallerLimits(identity=Limit(rate=1, burst=1))
        assert limiter.check(slow, CALLER, "") is None
        for i in range(3):
            assert limiter.check(fast, "spiffe://t/other", f"user-{i}") is None
        clock.now += 1
        assert limiter.check(fast, "spiffe://t/other", "new") is None
        assert limiter.check(slow, CALLER, "") is not None

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


def reconfigure(limiter: RateLimiter, before: CallerLimits | None, after: CallerLimits | None) -> None:
    """A reload from `before` to `after`, for every caller."""
    limiter.reconfigure(lambda _: before, lambda _: after)


def caller(rate: float, burst: float) -> CallerLimits:
    """Only a caller limit."""
    return CallerLimits(caller=Limit(rate, burst))


class TestReload:
    """A reload carries every bucket over to the new limits and hands out no fresh burst."""

    @pytest.mark.parametrize(
        ("old", "new", "take", "before", "after", "allowed"),
        [
            # 5 tokens back by the reload; then 0.5 s at the new rate adds 0.005, where the old one would fill it.
            (caller(10, 10), caller(0.01, 10), 10, 0.5, 0.5, 5),
            # 0.5 token back by the reload (100 s at 0.005/s), then 1 s at 1/s: 1, not 101 s at the new rate (a burst).
            (caller(0.005, 10), caller(1, 10), 10, 100, 1, 1),
            # Burst lowered: a bucket holding 9 is capped at once.
            (caller(1, 10), caller(1, 2), 1, 0, 0, 2),
            # Burst raised: nothing added; the bucket refills towards it at the rate.
            (caller(1, 2), caller(1, 10), 2, 1, 0, 1),
            (caller(1, 2), caller(1, 10), 2, 1, 5, 6),
            # Burst raised over a bucket that has refilled: full is the same as no bucket, so the new burst.
            (caller(1, 2), caller(1, 10), 1, 1, 0, 10),
            # Unchanged: as if there had been no reload.
            (caller(2, 10), caller(2, 10), 10, 1, 1, 4),
        ],
        ids=[
            "rate lowered",
            "rate raised",
            "burst lowered",
            "burst raised",
            "burst raised, refilling",
            "burst raised, refilled",
            "unchanged",
        ],
    )
    def test_no_fresh_burst(
        self, old: CallerLimits, new: CallerLimits, take: int, before: float, after: float, allowed: int
    ) -> None:
        """`take` calls under `old`; `before` s later a reload to `new`; `after` s later, `allowed` calls go through."""
        clock = Clock()
        limiter = RateLimiter(clock)
        assert taken(limiter, old, take) == take
        clock.now += before
        reconfigure(limiter, old, new)
        clock.now += after
        assert taken(limiter, new, 100) == allowed

    def test_lowered_rate_keeps_the_bucket(self) -> None:
        """After the rate is lowered, the bucket is not forgotten when the old rate would have refilled it."""
        clock = Clock()
        limiter = RateLimiter(clock)
        fast, slow = caller(10, 10), caller(0.01, 10)
        taken(limiter, fast, 10)
        reconfigure(limiter, fast, slow)
        clock.now += 2
        for i in range(10):  # other callers' calls sweep
            limiter.check(slow, f"spiffe://t/other-{i}", "alice")
        assert len(limiter) == 11
        assert taken(limiter, slow, 10) == 0

    def test_identity_limit_carried_over(self) -> None:
        """Identity buckets are carried over under the new identity limit, not the caller limit."""
        clock = Clock()
        limiter = RateLimiter(clock)
        old = CallerLimits(caller=Limit(0.001, 100), identity=Limit(10, 10))
        new = CallerLimits(caller=Limit(1000, 100), identity=Limit(0.01, 10))
        assert taken(limiter, old, 20) == 10
        clock.now += 0.2
        reconfigure(limiter, old, new)
        clock.now += 10
        assert taken(limiter, new, 20) == 2

    def test_removed_limit_forgets_its_buckets(self) -> None:
        """A limit taken away leaves nothing behind: with no limit, a bucket counts for nothing."""
        limiter = RateLimiter(Clock())
        taken(limiter, caller(0.001, 1), 1)
        reconfigure(limiter, caller(0.001, 1), None)
        assert len(limiter) == 0

    def test_each_caller_under_its_own_limits(self) -> None:
        """Each bucket is carried over under its own caller's new limits."""
        clock = Clock()
        limiter = RateLimiter(clock)
        before = {"spiffe://t/a": caller(0.001, 2), "spiffe://t/b": caller(0.001, 2)}
        after = {"spiffe://t/a": caller(1000, 2), "spiffe://t/b": before["spiffe://t/b"]}
        for caller_id, limits in before.items():
            assert sum(limiter.check(limits, caller_id, "alice") is None for _ in range(3)) == 2
        limiter.reconfigure(before.get, after.get)
        clock.now += 0.01
        assert sum(limiter.check(after["spiffe://t/a"], "spiffe://t/a", "alice") is None for _ in range(3)) == 2
        assert limiter.check(after["spiffe://t/b"], "spiffe://t/b", "alice") is not None


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
            (
                "",
                "[limits]\nburst = 1",
                "limits.burst: unknown key; expected one of backend, on_backend_failure, redis, shadow",
            ),
        ],
    )
    def test_invalid(self, pki: Pki, write_config: WriteConfig, lines: str, extra: str, message: str) -> None:
        """Each defect names the file and the key."""
        path = write_config(limited_config(pki, lines, extra))
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ=SECRET_ENV)
        assert str(caught.value) == f"{path}: {message}"
