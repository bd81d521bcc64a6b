"""The benchmark run: every system at every concurrency, round after round, then the report.

Rounds interleave the systems, so a noisy minute on this shared machine hurts
them all alike; reported figures are medians over rounds, their ratios, and
figures paired within each round (bench/paired.py) with their quartiles.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

from bench import micro, paired, report
from bench.measure import LoadShape, Result, measure
from bench.otlpsink import OtlpSink
from bench.systems import (
    System,
    Workspace,
    check_express_token,
    empty_rpc,
    express,
    synctoken,
    synctoken_guarded,
    synctoken_redis,
    synctoken_traced,
)


def _systems(workspace: Workspace, workers: int, otlp_endpoint: str) -> list[System]:
    return [
        synctoken(workspace, 1),
        # Right after plain synctoken: the pair that prices the Redis check is measured closest in time.
        synctoken_redis(workspace),
        # The same with every check written at once: what the batch window saves, in the same round.
        synctoken_redis(workspace, unbatched=True),
        # And the pair that prices tracing, next.
        synctoken_traced(workspace, otlp_endpoint),
        synctoken_guarded(workspace),
        empty_rpc(workspace),
        synctoken(workspace, workers),
        express(workspace, tuned=False),
        express(workspace, tuned=True),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write results.json, results.md and results.png."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run: 1 round, short windows")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="workers for the scaled run")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    warmup, duration = (0.3, 1.0) if args.quick else (1.0, 3.0)
    concurrencies = (1, 16) if args.quick else (1, 16, 64)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    if args.quick:
        print(report.QUICK_NOTE.replace("**", "").replace("`", ""), flush=True)

    # collector: the OTLP sink synctoken-traced exports to, in this process on threads of its own (see otlpsink).
    with tempfile.TemporaryDirectory(prefix="synctoken-bench-") as tmp, contextlib.closing(OtlpSink()) as collector:
        workspace = Workspace.make(Path(tmp) / "pki")
        results: list[Result] = []
        for round_index in range(rounds):
            for system in _systems(workspace, args.workers, collector.endpoint):
                system.start(Path(tmp))
                try:
                    if system.kind == "http":
                        check_express_token(system)
                    for concurrency in concurrencies:
                        shape = LoadShape(concurrency, warmup, duration)
                        result = measure(system, shape, workspace.directory, round_index)
                        results.append(result)
                        print(
                            f"round {round_index + 1}/{rounds} {system.name:18s} c={concurrency:<3d} "
                            f"{result.rps:8.0f} req/s  p99 {result.p99_ms:7.2f} ms  errors {result.errors}",
                            flush=True,
                        )
                finally:
                    system.stop()
            # The round's pairs at once, so a long run shows where it is heading.
            figures = paired.of_round(results, round_index)
            for concurrency in concurrencies:
                print(paired.live_line(figures, concurrency, f"round {round_index + 1}/{rounds}"), flush=True)
        with (Path(tmp) / "micro-audit.jsonl").open("wb") as sink:
            micro_figures = micro.run(
                workspace.config_path,
                number=500 if args.quick else 3000,
                repeats=3 if args.quick else 9,
                sink=sink,
            )

    workers_name = f"synctoken-{args.workers}w" if args.workers > 1 else "synctoken"
    summary = report.summarize(results)
    ratio_table = report.ratios(summary, workers_name)
    paired_figures = paired.summarize(results)
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "rounds": rounds,
        "warmup_s": warmup,
        "duration_s": duration,
        "concurrencies": list(concurrencies),
        "workers": args.workers,
        "quick": args.quick,
        "elapsed_s": round(time.monotonic() - began, 1),
    }
    report.write_json(
        args.out / "results.json",
        {
            "meta": meta,
            "results": [r.as_dict() for r in results],
            "summary": summary,
            "ratios": ratio_table,
            "paired": paired_figures,
            "micro": micro_figures,
        },
    )
    (args.out / "results.md").write_text(
        report.markdown(summary, ratio_table, paired_figures, micro_figures, meta), encoding="utf-8"
    )
    report.chart(args.out / "results.png", summary)
    print(f"wrote {args.out}/results.json, results.md and results.png in {meta['elapsed_s']} s")
    if args.quick:
        print("(a smoke run: not a measurement)", flush=True)
    return 0
