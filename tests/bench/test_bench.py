"""The benchmark harness's smoke run: it works end to end and every load ran without errors.

No timing thresholds: this machine is shared and noisy; figures belong in the
benchmark's report, not in assertions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import paired, report
from bench.measure import Result
from bench.steps_server import STAGES
from support.constants import ROOT

SYSTEMS = {
    "synctoken",
    "synctoken-redis",
    "synctoken-redis-unbatched",
    "synctoken-traced",
    "synctoken-guarded",
    "empty-rpc",
    "express-guide",
    "express-keyobject",
}
PAIRED = {
    "synctoken_extra_cpu_us_over_empty",
    "synctoken_rps_over_empty_rps",
    "synctoken_cpu_over_express_guide_cpu",
    "synctoken_peak_rss_mib",
    "empty_rpc_peak_rss_mib",
    "redis_extra_cpu_us_over_synctoken",
    "redis_extra_cpu_with_redis_us_over_synctoken",
    "redis_server_cpu_us_per_request",
    "redis_p99_over_synctoken_p99",
    "redis_unbatched_extra_cpu_us_over_synctoken",
    "redis_unbatched_server_cpu_us_per_request",
    "synctoken_tokens_per_core_s",
    "redis_tokens_per_core_s",
    "tracing_extra_cpu_us_over_synctoken",
}


@pytest.mark.slow
def test_quick_run(tmp_path: Path) -> None:
    """`python -m bench --quick` measures every system at every concurrency, error-free, and writes its report."""
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--workers", "2", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    measured = {(r["system"], r["concurrency"]) for r in data["results"]}
    assert measured == {(s, c) for s in SYSTEMS | {"synctoken-2w"} for c in (1, 16)}
    for r in data["results"]:
        assert r["errors"] == 0, r
        assert r["requests"] > 0, r
        assert r["server_cpu_s"] > 0, r
        # Every call of the Redis system ran the script in its own redis-server, whose CPU is counted apart.
        redis_system = r["system"].startswith("synctoken-redis")
        assert (r["backend_calls"] >= r["requests"]) if redis_system else (r["backend_calls"] == 0), r
        assert (r["backend_cpu_s"] > 0) if redis_system else (r["backend_cpu_s"] == 0), r
    paths = ["synctoken_issue_path", "synctoken_issue_path_twilio_minter", "bare_access_token"]
    paths += ["direct_mint", "twilio_minter_mint", "hmac_sha256"]
    ratios = ["issue_path_over_bare", "issue_path_twilio_minter_over_bare"]
    ratios += ["issue_path_over_issue_path_twilio_minter", "direct_mint_over_twilio_minter_mint"]
    assert set(data["micro"]) == {f"{p}{q}_us" for p in paths for q in ("", "_q1", "_q3")} | {
        f"{r}{q}" for r in ratios for q in ("", "_q1", "_q3")
    }
    assert "| synctoken | 16 |" in (tmp_path / "results.md").read_text()
    assert "| synctoken-redis | 16 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["meta"]["rounds"] == 1
    assert set(data["paired"]) == PAIRED
    for by_concurrency in data["paired"].values():
        assert set(by_concurrency) == {"1", "16"}
        for figures in by_concurrency.values():
            assert len(figures["per_round"]) == 1
            assert figures["q1"] <= figures["median"] <= figures["q3"]
    assert data["paired"]["synctoken_rps_over_empty_rps"]["16"]["target"] == "≥ 0.8 at c=16, 64"
    assert data["paired"]["synctoken_rps_over_empty_rps"]["1"]["target"] is None
    assert data["paired"]["redis_extra_cpu_us_over_synctoken"]["16"]["target"] == "≤ 60"
    assert data["paired"]["redis_p99_over_synctoken_p99"]["16"]["target"] == "≤ 1.5 at c=16"
    markdown = (tmp_path / "results.md").read_text()
    assert "| paired figure | in flight | median | IQR | rounds | target | median meets it |" in markdown
    assert "| synctoken extra server CPU per request over empty-rpc, µs | 16 |" in markdown
    assert "round 1/1 paired c=16  extra CPU µs/req " in result.stdout
    # Said where a reader looks: the first line printed, the last one, and the top of results.md.
    assert result.stdout.startswith("A smoke run (--quick), not a measurement")
    assert result.stdout.rstrip().endswith("(a smoke run: not a measurement)")
    assert markdown.splitlines()[2].startswith("**A smoke run (`--quick`), not a measurement**")


def _result(system: str, round_index: int, cpu_ms: float, rps: float) -> Result:
    return Result(system, 16, round_index, 100, 0, rps, 1, 1, 1, 1, 1, cpu_ms, 50, 1)


# Round 1 is slow for both: paired within it, the figures stay as in the other rounds.
THREE_ROUNDS = [
    *(_result("synctoken", r, cpu, rps) for r, cpu, rps in ((0, 0.30, 1000), (1, 0.60, 500), (2, 0.31, 990))),
    *(_result("empty-rpc", r, cpu, rps) for r, cpu, rps in ((0, 0.20, 1250), (1, 0.50, 625), (2, 0.20, 1200))),
    *(_result("express-guide", r, 0.6, 400) for r in range(3)),
]


class TestPaired:
    """Paired figures: taken within each round, then summarized over rounds."""

    def test_each_round_pairs_its_own_results(self) -> None:
        """The extra CPU of a round is synctoken's minus the empty RPC's of that round, in µs."""
        figures = paired.summarize(THREE_ROUNDS)["synctoken_extra_cpu_us_over_empty"][16]
        assert figures["per_round"] == pytest.approx([100, 100, 110])
        assert (figures["q1"], figures["median"], figures["q3"]) == pytest.approx((100, 100, 105))
        assert figures["target"] == "≤ 90"
        assert figures["meets_target"] is False

    @pytest.mark.parametrize(
        ("name", "median", "meets"),
        [
            ("synctoken_rps_over_empty_rps", 0.8, True),
            ("synctoken_cpu_over_express_guide_cpu", 0.517, False),
            ("synctoken_peak_rss_mib", 50, True),
            ("empty_rpc_peak_rss_mib", 50, None),
        ],
    )
    def test_targets(self, name: str, median: float, meets: bool | None) -> None:
        """Each figure's median is held to its target; a figure without one says so with None."""
        figures = paired.summarize(THREE_ROUNDS)[name][16]
        assert figures["median"] == pytest.approx(median, rel=0.01)
        assert figures["meets_target"] is meets

    def test_a_negative_cost_meets_no_target(self) -> None:
        """synctoken below the empty RPC is noise between windows: no reading, never a target met."""
        results = [
            _result("synctoken", 0, 0.20, 1000),
            _result("empty-rpc", 0, 0.25, 1000),
            _result("express-guide", 0, 0.6, 400),
        ]
        figures = paired.summarize(results)["synctoken_extra_cpu_us_over_empty"][16]
        assert figures["median"] == pytest.approx(-50)
        assert figures["meets_target"] is None
        meta = {"date": "d", "machine": "m", "rounds": 1, "duration_s": 1, "warmup_s": 0, "quick": False}
        markdown = report.markdown({}, {}, paired.summarize(results), {}, meta)
        row = next(line for line in markdown.splitlines() if line.startswith("| synctoken extra server CPU"))
        assert row.endswith("| ≤ 90 | **no reading** (a negative cost is noise) |")

    def test_a_round_missing_a_side_is_left_out(self) -> None:
        """A round in which one of the pair was not measured adds nothing to that pair's figures."""
        results = [r for r in THREE_ROUNDS if (r.system, r.round) != ("empty-rpc", 2)]
        assert paired.summarize(results)["synctoken_extra_cpu_us_over_empty"][16]["per_round"] == pytest.approx(
            [100, 100]
        )


@pytest.mark.slow
def test_profile_steps(tmp_path: Path) -> None:
    """`python -m bench.profile --steps` times every stage of IssueToken that exists, inside a loaded server."""
    # The guarded system has a rate limit, so that RateLimiter.check is called too.
    out = tmp_path / "steps.json"
    command = [sys.executable, "-m", "bench.profile", "synctoken-guarded", "--steps", "--seconds", "3"]
    result = subprocess.run(
        [*command, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert figures["errors"] == 0
    assert set(figures["stages"]) | set(figures["missing"]) == {stage.attribute for stage in STAGES}
    for label, stage in figures["stages"].items():
        assert stage["count"] > 0, label
        assert stage["mean_us"] > 0, label
        assert label in result.stdout
    assert "handler, other" in result.stdout
    assert figures["server_cpu_us_per_request"] > 0
    assert figures["empty_rpc_cpu_us_per_request"] > 0
    assert figures["handler_cpu_us_per_request"] > 0


@pytest.mark.slow
def test_instruction_counts(tmp_path: Path) -> None:
    """`python -m bench.instructions` counts, under callgrind, every server's and the handler's instructions."""
    out = tmp_path / "counts.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.instructions", "--calls", "20", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    counts = json.loads(out.read_text())
    assert counts["calls"] == 20
    # Counts, not times: an IssueToken does strictly more than an empty call on the same stack.
    assert 0 < counts["empty_rpc"] < counts["synctoken"]
    assert counts["synctoken_extra"] == counts["synctoken"] - counts["empty_rpc"]
    assert counts["in_process_handler"] > 0
    assert "synctoken extra" in result.stdout
    # The Redis check adds work to synctoken's server (the script call, its reply), never less.
    assert counts["redis_extra"] == counts["synctoken_redis"] - counts["synctoken"] > 0
    assert "Redis check extra" in result.stdout
