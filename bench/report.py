"""Turning results into a JSON file, a markdown table and a PNG chart."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")  # no display here: render straight to PNG
import matplotlib.pyplot as plt

from bench import paired
from bench.measure import Result, median_of
from bench.micro import with_quartiles

SUMMARY_FIELDS = (
    "rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "server_cpu_ms_per_request",
    "server_cpu_s",
    "server_peak_rss_mib",
    "loadgen_cpu_s",
    "backend_cpu_ms_per_request",
)


def summarize(results: list[Result]) -> dict[str, dict[int, dict[str, float]]]:
    """Median of every figure over rounds, by system and concurrency; errors are summed."""
    grouped: dict[tuple[str, int], list[Result]] = defaultdict(list)
    for result in results:
        grouped[result.system, result.concurrency].append(result)
    summary: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    for (system, concurrency), group in grouped.items():
        figures = {field: median_of(group, field) for field in SUMMARY_FIELDS}
        figures["errors"] = sum(r.errors for r in group)
        figures["rounds"] = len(group)
        summary[system][concurrency] = figures
    return dict(summary)


def ratios(summary: dict[str, dict[int, dict[str, float]]], workers_name: str) -> dict[str, dict[int, float]]:
    """The ratios the targets are stated in, from medians measured in the same run."""
    out: dict[str, dict[int, float]] = defaultdict(dict)

    def ratio(name: str, a: str, b: str, field: str) -> None:
        for concurrency in summary.get(a, {}):
            if concurrency in summary.get(b, {}):
                out[name][concurrency] = summary[a][concurrency][field] / summary[b][concurrency][field]

    ratio("synctoken_rps_over_empty_rps", "synctoken", "empty-rpc", "rps")
    ratio("synctoken_p99_over_empty_p99", "synctoken", "empty-rpc", "p99_ms")
    ratio("synctoken_cpu_per_request_over_empty", "synctoken", "empty-rpc", "server_cpu_ms_per_request")
    # What limits and metrics cost: throughput below 1 is lost, CPU per request above 1 is added.
    ratio("guarded_rps_over_synctoken_rps", "synctoken-guarded", "synctoken", "rps")
    ratio("guarded_cpu_per_request_over_synctoken", "synctoken-guarded", "synctoken", "server_cpu_ms_per_request")
    # What the Redis check adds to a call, against no limits at all.
    ratio("redis_rps_over_synctoken_rps", "synctoken-redis", "synctoken", "rps")
    ratio("redis_p99_over_synctoken_p99", "synctoken-redis", "synctoken", "p99_ms")
    ratio("workers_rps_over_express_guide_rps", workers_name, "express-guide", "rps")
    ratio("workers_rps_over_express_keyobject_rps", workers_name, "express-keyobject", "rps")
    ratio("express_keyobject_rps_over_guide_rps", "express-keyobject", "express-guide", "rps")
    return dict(out)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """The full record: metadata, every round's result, medians, ratios, paired figures, micro-benchmarks."""
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


QUICK_NOTE = (
    "**A smoke run (`--quick`), not a measurement**: one short round, to show that every system "
    "runs and every figure is computed. Its figures and verdicts mean nothing; `make bench` measures."
)


def markdown(
    summary: dict[str, dict[int, dict[str, float]]],
    ratio_table: dict[str, dict[int, float]],
    paired_figures: dict[str, dict[int, dict[str, Any]]],
    micro: dict[str, float],
    meta: dict[str, Any],
) -> str:
    """A human-readable report: medians by system and concurrency, ratios, paired figures, micro-benchmarks."""
    lines = [
        "# synctoken benchmark",
        "",
        *([QUICK_NOTE, ""] if meta["quick"] else []),
        (
            f"{meta['date']} · {meta['machine']} · {meta['rounds']} round(s) · {meta['duration_s']} s windows "
            f"after {meta['warmup_s']} s warm-up · medians over rounds"
        ),
        "",
        (
            "| system | in flight | req/s | p50 ms | p90 ms | p99 ms | max ms | CPU ms/req | Redis CPU ms/req "
            "| server cores | load-gen cores | peak RSS MiB | errors |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for system, by_concurrency in summary.items():
        for concurrency in sorted(by_concurrency):
            f = by_concurrency[concurrency]
            # Apart from the server's CPU: the Redis a system depends on, if it has one.
            redis_cpu = f.get("backend_cpu_ms_per_request", 0.0)
            lines.append(
                f"| {system} | {concurrency} | {f['rps']:.0f} | {f['p50_ms']:.2f} | {f['p90_ms']:.2f} | "
                f"{f['p99_ms']:.2f} | {f['max_ms']:.2f} | {f['server_cpu_ms_per_request']:.3f} | "
                f"{f'{redis_cpu:.3f}' if redis_cpu else '—'} | "
                f"{f['server_cpu_s'] / meta['duration_s']:.2f} | {f['loadgen_cpu_s'] / meta['duration_s']:.2f} | "
                f"{f['server_peak_rss_mib']:.0f} | {f['errors']:.0f} |"
            )
    lines += ["", "| ratio | " + " | ".join(f"c={c}" for c in _concurrencies(ratio_table)) + " |"]
    lines.append("| --- |" + " ---: |" * len(_concurrencies(ratio_table)))
    for name, ratio_by_concurrency in ratio_table.items():
        cells = [
            f"{ratio_by_concurrency[c]:.2f}" if c in ratio_by_concurrency else "" for c in _concurrencies(ratio_table)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *_paired_table(paired_figures, meta["rounds"])]
    lines += ["", "| in-process (µs per call, or ratio) | median | IQR |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {median:.2f} | {q1:.2f} to {q3:.2f} |" for name, median, q1, q3 in with_quartiles(micro)]
    return "\n".join(lines) + "\n"


def _paired_table(figures: dict[str, dict[int, dict[str, Any]]], rounds: int) -> list[str]:
    lines = [
        f"paired, per round: each figure taken within one round, then the median and IQR over {rounds} round(s)",
        "",
        "| paired figure | in flight | median | IQR | rounds | target | median meets it |",
        "| --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for figure in paired.FIGURES:
        for concurrency, f in figures.get(figure.name, {}).items():
            median, q1, q3 = (f"{f[key]:.{figure.decimals}f}" for key in ("median", "q1", "q3"))
            each = ", ".join(f"{value:.{figure.decimals}f}" for value in f["per_round"])
            target = f["target"] or "—"
            if f["meets_target"] is None:
                meets = "—" if f["target"] is None else "**no reading** (a negative cost is noise)"
            else:
                meets = "yes" if f["meets_target"] else "**no**"
            lines.append(f"| {figure.label} | {concurrency} | {median} | {q1} to {q3} | {each} | {target} | {meets} |")
    return lines


def _concurrencies(table: dict[str, dict[int, float]]) -> list[int]:
    return sorted({c for by_concurrency in table.values() for c in by_concurrency})


def chart(path: Path, summary: dict[str, dict[int, dict[str, float]]]) -> None:
    """Throughput and p99 latency against calls in flight, one line per system."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system, by_concurrency in summary.items():
        xs = sorted(by_concurrency)
        left.plot(xs, [by_concurrency[x]["rps"] for x in xs], marker="o", label=system)
        right.plot(xs, [by_concurrency[x]["p99_ms"] for x in xs], marker="o", label=system)
    for axis, title, unit in ((left, "Throughput", "requests/s"), (right, "p99 latency", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("requests in flight")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(visible=True, alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
