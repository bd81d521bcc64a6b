"""The benchmark's synctoken-redis system: its paired figures, and a run that refuses calls failing loudly."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from bench import paired
from bench.measure import LoadShape, Result, measure
from bench.systems import Workspace, synctoken_redis


def _result(system: str, round_index: int, cpu_ms: float, p99_ms: float, redis_cpu_s: float = 0.0) -> Result:
    return Result(system, 16, round_index, 1000, 0, 1000, 1, 1, p99_ms, 1, 1, cpu_ms, 50, 1, redis_cpu_s, 0)


# Round 1 is slow for both: paired within it, the figures stay as in the other rounds.
ROUNDS = [
    *(_result("synctoken", r, cpu, p99) for r, cpu, p99 in ((0, 0.50, 10), (1, 1.00, 20), (2, 0.52, 10))),
    # Each with 0.03 s of Redis CPU over its 1000 requests: 30 µs per request.
    *(_result("synctoken-redis", r, cpu, p99, 0.03) for r, cpu, p99 in ((0, 0.55, 12), (1, 1.05, 24), (2, 0.62, 20))),
]


class TestRedisPairs:
    """The Redis check is priced against plain synctoken of the same round."""

    def test_extra_server_cpu_leaves_redis_out(self) -> None:
        """synctoken-redis's server CPU minus synctoken's of the same round, in µs: Redis's own CPU is not in it."""
        figures = paired.summarize(ROUNDS)["redis_extra_cpu_us_over_synctoken"][16]
        assert figures["per_round"] == pytest.approx([50, 50, 100])
        assert figures["median"] == pytest.approx(50)
        assert figures["target"] == "≤ 60"
        assert figures["meets_target"] is True

    def test_extra_cpu_with_redis_adds_its_own(self) -> None:
        """With Redis's own CPU per request added, the same pairs cost 30 µs more, and miss the 60 µs."""
        figures = paired.summarize(ROUNDS)["redis_extra_cpu_with_redis_us_over_synctoken"][16]
        assert figures["per_round"] == pytest.approx([80, 80, 130])
        assert figures["meets_target"] is False
        assert paired.summarize(ROUNDS)["redis_server_cpu_us_per_request"][16]["median"] == pytest.approx(30)

    def test_p99_ratio_is_held_at_16_only(self) -> None:
        """p99 over plain synctoken's is paired per round (1.2, 1.2, 2.0) and held to 1.5 at c=16 alone."""
        figures = paired.summarize(ROUNDS)["redis_p99_over_synctoken_p99"][16]
        assert figures["per_round"] == pytest.approx([1.2, 1.2, 2.0])
        assert figures["meets_target"] is True
        at_64 = [Result(**(r.as_dict() | {"concurrency": 64})) for r in ROUNDS]  # type: ignore[arg-type]
        assert paired.summarize(at_64)["redis_p99_over_synctoken_p99"][64]["target"] is None

    def test_tokens_per_core(self) -> None:
        """Tokens per core-second are requests per server CPU second: 1000 / CPU ms per request."""
        figures = paired.summarize(ROUNDS)
        assert figures["synctoken_tokens_per_core_s"][16]["median"] == pytest.approx(1000 / 0.52)
        assert figures["redis_tokens_per_core_s"][16]["median"] == pytest.approx(1000 / 0.62)


@pytest.mark.slow
def test_refused_calls_fail_the_measurement(tmp_path: Path) -> None:
    """With a limit the load exceeds, measuring synctoken-redis raises rather than report refusals as its cost."""
    workspace = Workspace.make(tmp_path / "pki")
    system = synctoken_redis(workspace)
    config = Path(system.command[system.command.index("--config") + 1])
    # The caller's own limit (not the identity's): 2 calls at once, then 1 a second.
    config.write_text(config.read_text().replace("rate = 1000000\nburst = 1000000\n", "rate = 1\nburst = 2\n", 1))
    system.start(tmp_path)
    assert system.redis is not None
    redis_process = system.redis.processes()[0]
    try:
        with pytest.raises(RuntimeError, match=r"synctoken-redis at c=1: [1-9]\d* call\(s\) refused or failed"):
            measure(system, LoadShape(1, 0.2, 0.5), workspace.directory, 0)
    finally:
        system.stop()
    # Stopped by its PID with the system: nothing is left listening.
    assert not redis_process.is_running() or redis_process.status() == psutil.STATUS_ZOMBIE
