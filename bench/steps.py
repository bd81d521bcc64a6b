"""Where IssueToken's time goes, stage by stage, timed inside a server under the harness's load.

`python -m bench.profile --steps` runs this. The empty RPC is loaded first and
then synctoken, started through bench/steps_server.py, at the same
concurrency and window, so that the handler's stages can be set against the
extra server CPU per request measured in the same run: what the handler
explains, and what is outside it (gRPC, TLS, the event loop).

Stage figures are wall time over the measured window: the server's counters
are read as the window opens and as it closes, and subtracted, so warm-up is
left out. They are written every 0.25 s, so the two reads are each up to that
much early, but both fall while the load runs. On a busy machine wall time
also counts moments the server waited for a core.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.measure import START_LEAD_S, LoadShape, Result, measure
from bench.steps_server import STAGES, STEPS_FILE_ENV, overhead_ns
from bench.systems import System, Workspace, empty_rpc, synctoken, synctoken_guarded

HANDLER = "TokenServicer.IssueToken"
LIMITS = "RateLimiter.check"


@dataclass(frozen=True)
class _Counts:
    """One stage's counters as the server wrote them, or the difference of two readings."""

    count: int
    total_ns: int
    callee_ns: int
    cpu_ns: int
    parent: str | None

    def minus(self, earlier: _Counts | None) -> _Counts:
        if earlier is None:
            return self
        return _Counts(
            self.count - earlier.count,
            self.total_ns - earlier.total_ns,
            self.callee_ns - earlier.callee_ns,
            self.cpu_ns - earlier.cpu_ns,
            self.parent,
        )


def _read(path: Path) -> tuple[dict[str, _Counts], list[str]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {label: _Counts(**figures) for label, figures in data["stages"].items()}, data["missing"]


def _over_window(path: Path, start: float, end: float) -> tuple[dict[str, _Counts], list[str]]:
    time.sleep(max(0.0, start - time.time()))
    before, _ = _read(path)
    time.sleep(max(0.0, end - time.time()))
    after, missing = _read(path)
    return {label: counts.minus(before.get(label)) for label, counts in after.items()}, missing


def _timed_system(workspace: Workspace, steps_file: Path, *, guarded: bool) -> System:
    # The same command and config as the benchmark's one-worker synctoken, through the launcher.
    system = synctoken_guarded(workspace) if guarded else synctoken(workspace, 1)
    system.command = [sys.executable, "-m", "bench.steps_server", *system.command[1:]]
    system.env = system.env | {STEPS_FILE_ENV: str(steps_file)}
    return system


def _load(system: System, shape: LoadShape, workspace: Workspace, log_dir: Path) -> Result:
    system.start(log_dir)
    try:
        return measure(system, shape, workspace.directory, 0)
    finally:
        system.stop()


def run(shape: LoadShape, *, guarded: bool) -> dict[str, Any]:
    """Load the empty RPC, then the timed synctoken, each at `shape`; return the figures."""
    with tempfile.TemporaryDirectory(prefix="synctoken-steps-") as tmp:
        workspace = Workspace.make(Path(tmp) / "pki")
        empty = _load(empty_rpc(workspace), shape, workspace, Path(tmp))
        steps_file = Path(tmp) / "steps.json"
        system = _timed_system(workspace, steps_file, guarded=guarded)
        system.start(Path(tmp))
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                # measure() opens its window START_LEAD_S + warm-up from now; the reads bracket it.
                opens = time.time() + START_LEAD_S + shape.warmup_s
                window = pool.submit(_over_window, steps_file, opens, opens + shape.duration_s)
                result = measure(system, shape, workspace.directory, 0)
                stages, missing = window.result()
        finally:
            system.stop()
    return _figures(system.name, result, empty, stages, missing)


def _figures(
    name: str, result: Result, empty: Result, stages: dict[str, _Counts], missing: list[str]
) -> dict[str, Any]:
    handler = stages.get(HANDLER)
    requests = handler.count if handler and handler.count else None
    what = {stage.attribute: stage.what for stage in STAGES}
    return {
        "system": name,
        "concurrency": result.concurrency,
        "window_s": round(result.requests / result.rps, 3) if result.rps else None,
        "rps": result.rps,
        "errors": result.errors + empty.errors,
        "server_cpu_us_per_request": result.server_cpu_ms_per_request * 1000,
        "empty_rpc_cpu_us_per_request": empty.server_cpu_ms_per_request * 1000,
        "extra_cpu_us": (result.server_cpu_ms_per_request - empty.server_cpu_ms_per_request) * 1000,
        "wrapper_overhead_us": overhead_ns() / 1000,
        "handler_cpu_us_per_request": handler.cpu_ns / requests / 1000 if handler and requests else None,
        "stages": {
            label: {
                "what": what.get(label, ""),
                "parent": counts.parent,
                "count": counts.count,
                "mean_us": counts.total_ns / counts.count / 1000 if counts.count else None,
                "own_mean_us": (counts.total_ns - counts.callee_ns) / counts.count / 1000 if counts.count else None,
                "has_callees": counts.callee_ns > 0,
                "us_per_request": counts.total_ns / requests / 1000 if requests else None,
                "own_us_per_request": (counts.total_ns - counts.callee_ns) / requests / 1000 if requests else None,
            }
            for label, counts in stages.items()
        },
        "missing": missing,
    }


def _in_call_order(stages: dict[str, dict[str, Any]]) -> list[tuple[int, str, bool]]:
    # Nesting as measured (each stage's first timed caller), siblings in STAGES order;
    # after a stage's callees, a row (flagged True) for the rest of its time.
    order = [stage.attribute for stage in STAGES if stage.attribute in stages]
    rows: list[tuple[int, str, bool]] = []

    def visit(label: str, depth: int) -> None:
        rows.append((depth, label, False))
        for child in order:
            if stages[child]["parent"] == label and child != label:
                visit(child, depth + 1)
        if stages[label]["has_callees"]:
            rows.append((depth + 1, label, True))

    for label in order:
        if stages[label]["parent"] not in stages:
            visit(label, 0)
    return rows


def _cell(value: float | None) -> str:
    return f"{value:9.1f}" if value is not None else " " * 9


def render(figures: dict[str, Any]) -> str:
    """The figures as a table on stdout, with the sums that say what the handler explains."""
    stages: dict[str, dict[str, Any]] = figures["stages"]
    lines = [
        (
            f"{figures['system']} (stages timed) at c={figures['concurrency']}: {figures['rps']:.0f} req/s "
            f"over a {figures['window_s']} s window, {figures['errors']} errors"
        ),
        (
            f"server CPU per request: synctoken {figures['server_cpu_us_per_request']:.0f} µs, empty-rpc "
            f"{figures['empty_rpc_cpu_us_per_request']:.0f} µs (same run): extra {figures['extra_cpu_us']:.0f} µs"
        ),
        "",
        "stage (nested as called)               calls   mean µs  µs/req  what",
    ]
    for depth, label, other in _in_call_order(stages):
        stage = stages[label]
        if other:
            name = "handler, other" if label == HANDLER else f"{label.rpartition('.')[2]}, other"
            lines.append(
                f"{'  ' * depth + name:36s} {'':8s} {_cell(stage['own_mean_us'])} "
                f"{_cell(stage['own_us_per_request'])}  {label} less the stages timed within it"
            )
            continue
        what = stage["what"] if stage["count"] else "not called in the window"
        if label == LIMITS and not stage["count"]:
            what += " (no rate limit in this config; synctoken-guarded has one)"
        lines.append(
            f"{'  ' * depth + label:36s} {stage['count']:8d} {_cell(stage['mean_us'])} "
            f"{_cell(stage['us_per_request'])}  {what}"
        )
    if figures["missing"]:
        lines.append(f"not found (renamed or removed?): {', '.join(figures['missing'])}")
    handler = stages.get(HANDLER)
    if handler and figures["handler_cpu_us_per_request"] is not None:
        extra, inside = figures["extra_cpu_us"], figures["handler_cpu_us_per_request"]
        share = f" ({inside / extra * 100:.0f}%)" if extra > 0 else ""
        lines.append(
            f"the handler uses {inside:.0f} µs CPU per request ({handler['us_per_request']:.0f} µs wall) "
            f"of the {extra:.0f} µs extra CPU{share}: {extra - inside:.0f} µs is outside it"
        )
        if inside > extra:
            # Two loads a few seconds apart: something else on the machine moved one of them.
            lines.append(
                "the handler alone uses more than the extra CPU: the two loads saw different machines "
                "(shared cores?); rerun, and meanwhile compare the stages with one another"
            )
    lines.append(
        "stage figures are wall time (a wait for a core counts) between counters read as the window opened "
        "and as it closed (warm-up left out)"
    )
    if handler and handler["count"]:
        within = sum(s["count"] for label, s in stages.items() if label != HANDLER) / handler["count"]
        overhead = figures["wrapper_overhead_us"]
        lines.append(
            f"timing costs ~{overhead:.2f} µs per timed call, counted in its caller's figure: "
            f"{within:.1f} timed calls per request, ~{within * overhead:.0f} µs of the handler's figure"
        )
    return "\n".join(lines)
