"""Paired figures: synctoken against its references, from results measured in the same round.

A median over rounds of each system, then a ratio of medians, mixes rounds:
a noisy minute that slowed one system in round 2 and the other in round 4
still shows up in the ratio. Pairing within a round compares two windows
measured a minute apart; the median and interquartile range over rounds then
say both what the figure is and how much it moved.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bench.measure import Result
from bench.micro import quartiles

SYNCTOKEN = "synctoken"
REDIS = "synctoken-redis"
REDIS_UNBATCHED = "synctoken-redis-unbatched"
TRACED = "synctoken-traced"
EMPTY = "empty-rpc"
EXPRESS_GUIDE = "express-guide"


@dataclass(frozen=True)
class Target:
    """A bound a figure's median is held to; at every concurrency unless some are named."""

    bound: float
    at_most: bool
    concurrencies: frozenset[int] = frozenset()

    def applies_at(self, concurrency: int) -> bool:
        """Whether the target speaks about this concurrency at all."""
        return not self.concurrencies or concurrency in self.concurrencies

    def met_by(self, value: float) -> bool | None:
        """Whether `value` is within the bound; None when `value` cannot be a measurement of it.

        Every upper bound here is on a cost (CPU, memory, a ratio of costs), which cannot be below
        zero: a negative median is noise between two windows, and meets nothing.
        """
        if self.at_most and value < 0:
            return None
        return value <= self.bound if self.at_most else value >= self.bound

    def __str__(self) -> str:
        where = f" at c={', '.join(str(c) for c in sorted(self.concurrencies))}" if self.concurrencies else ""
        return f"{'≤' if self.at_most else '≥'} {self.bound:g}{where}"


@dataclass(frozen=True)
class Figure:
    """One paired figure: what it is called, the systems it needs, and how one round's results make it."""

    name: str
    label: str
    short: str
    """Its name in the live line a run prints after each round."""
    needs: tuple[str, ...]
    compute: Callable[[Mapping[str, Result]], float]
    target: Target | None
    decimals: int


def _redis_extra_cpu_us(r: Mapping[str, Result], *, with_redis: bool) -> float:
    """synctoken-redis's CPU per request over plain synctoken's, in µs; its Redis's own CPU added if `with_redis`."""
    cost = r[REDIS].server_cpu_ms_per_request + (r[REDIS].backend_cpu_ms_per_request if with_redis else 0.0)
    return (cost - r[SYNCTOKEN].server_cpu_ms_per_request) * 1000


FIGURES = (
    Figure(
        "synctoken_extra_cpu_us_over_empty",
        "synctoken extra server CPU per request over empty-rpc, µs",
        "extra CPU µs/req",
        (SYNCTOKEN, EMPTY),
        lambda r: (r[SYNCTOKEN].server_cpu_ms_per_request - r[EMPTY].server_cpu_ms_per_request) * 1000,
        Target(90, at_most=True),
        0,
    ),
    Figure(
        "synctoken_rps_over_empty_rps",
        "synctoken req/s ÷ empty-rpc req/s",
        "rps ÷ empty",
        (SYNCTOKEN, EMPTY),
        lambda r: r[SYNCTOKEN].rps / r[EMPTY].rps,
        # At one call in flight the ratio is latency, which the CPU target already covers.
        Target(0.8, at_most=False, concurrencies=frozenset({16, 64})),
        2,
    ),
    Figure(
        "synctoken_cpu_over_express_guide_cpu",
        "synctoken server CPU per request ÷ express-guide's",
        "CPU ÷ express-guide",
        (SYNCTOKEN, EXPRESS_GUIDE),
        lambda r: r[SYNCTOKEN].server_cpu_ms_per_request / r[EXPRESS_GUIDE].server_cpu_ms_per_request,
        Target(0.5, at_most=True),
        2,
    ),
    Figure(
        "synctoken_peak_rss_mib",
        "synctoken peak RSS, MiB",
        "RSS MiB",
        (SYNCTOKEN,),
        lambda r: r[SYNCTOKEN].server_peak_rss_mib,
        Target(64, at_most=True),
        0,
    ),
    # The global limits in Redis against no limits at all: what one Redis check per call costs
    # the replica (server only), and the replica and its Redis together.
    Figure(
        "redis_extra_cpu_us_over_synctoken",
        "synctoken-redis extra server CPU per request over synctoken (Redis's own CPU not included), µs",
        "Redis check µs/req",
        (REDIS, SYNCTOKEN),
        lambda r: _redis_extra_cpu_us(r, with_redis=False),
        Target(60, at_most=True),
        0,
    ),
    Figure(
        "redis_extra_cpu_with_redis_us_over_synctoken",
        "synctoken-redis extra CPU per request over synctoken, Redis's own CPU included, µs",
        "with Redis µs/req",
        (REDIS, SYNCTOKEN),
        lambda r: _redis_extra_cpu_us(r, with_redis=True),
        Target(60, at_most=True),
        0,
    ),
    # No target: what the Redis server spends per check, the part of the line above that is not the replica's.
    Figure(
        "redis_server_cpu_us_per_request",
        "redis-server's own CPU per request of synctoken-redis, µs",
        "redis-server µs/req",
        (REDIS,),
        lambda r: r[REDIS].backend_cpu_ms_per_request * 1000,
        None,
        0,
    ),
    # No target: the same two figures with batch_window = "0ms", every check written at once.
    Figure(
        "redis_unbatched_extra_cpu_us_over_synctoken",
        "synctoken-redis-unbatched (batch_window 0ms) extra server CPU per request over synctoken, µs",
        "unbatched µs/req",
        (REDIS_UNBATCHED, SYNCTOKEN),
        lambda r: (r[REDIS_UNBATCHED].server_cpu_ms_per_request - r[SYNCTOKEN].server_cpu_ms_per_request) * 1000,
        None,
        0,
    ),
    Figure(
        "redis_unbatched_server_cpu_us_per_request",
        "redis-server's own CPU per request of synctoken-redis-unbatched (batch_window 0ms), µs",
        "unbatched redis-server µs/req",
        (REDIS_UNBATCHED,),
        lambda r: r[REDIS_UNBATCHED].backend_cpu_ms_per_request * 1000,
        None,
        0,
    ),
    Figure(
        "redis_p99_over_synctoken_p99",
        "synctoken-redis p99 ÷ synctoken p99",
        "p99 ÷ synctoken",
        (REDIS, SYNCTOKEN),
        lambda r: r[REDIS].p99_ms / r[SYNCTOKEN].p99_ms,
        Target(1.5, at_most=True, concurrencies=frozenset({16})),
        2,
    ),
    # No target: what tracing every call (100% sampled, exported over OTLP/gRPC to a sink) costs the server.
    Figure(
        "tracing_extra_cpu_us_over_synctoken",
        "synctoken-traced extra server CPU per request over synctoken (every call sampled and exported), µs",
        "tracing µs/req",
        (TRACED, SYNCTOKEN),
        lambda r: (r[TRACED].server_cpu_ms_per_request - r[SYNCTOKEN].server_cpu_ms_per_request) * 1000,
        None,
        0,
    ),
    # No target: tokens one core issues per second (requests per server CPU second), for sizing replicas.
    Figure(
        "synctoken_tokens_per_core_s",
        "synctoken tokens/s per core of server CPU",
        "synctoken tokens/core·s",
        (SYNCTOKEN,),
        lambda r: 1000 / r[SYNCTOKEN].server_cpu_ms_per_request,
        None,
        0,
    ),
    Figure(
        "redis_tokens_per_core_s",
        "synctoken-redis tokens/s per core of server CPU (Redis's own CPU not included)",
        "synctoken-redis tokens/core·s",
        (REDIS,),
        lambda r: 1000 / r[REDIS].server_cpu_ms_per_request,
        None,
        0,
    ),
    # No target: the stack's own footprint, beside synctoken's, so that one sees what synctoken adds.
    Figure(
        "empty_rpc_peak_rss_mib",
        "empty-rpc peak RSS, MiB",
        "empty-rpc RSS MiB",
        (EMPTY,),
        lambda r: r[EMPTY].server_peak_rss_mib,
        None,
        0,
    ),
)


def of_round(results: list[Result], round_index: int) -> dict[str, dict[int, float]]:
    """Every paired figure of one round, by figure name and concurrency; pairs with a side missing are left out."""
    by_concurrency: dict[int, dict[str, Result]] = defaultdict(dict)
    for result in results:
        if result.round == round_index:
            by_concurrency[result.concurrency][result.system] = result
    figures: dict[str, dict[int, float]] = defaultdict(dict)
    for concurrency, systems in sorted(by_concurrency.items()):
        for figure in FIGURES:
            if all(name in systems for name in figure.needs):
                figures[figure.name][concurrency] = figure.compute(systems)
    return dict(figures)


def summarize(results: list[Result]) -> dict[str, dict[int, dict[str, Any]]]:
    """Per figure and concurrency: the value of each round in order, their median and quartiles, and the target."""
    per_round: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for round_index in sorted({r.round for r in results}):
        for name, by_concurrency in of_round(results, round_index).items():
            for concurrency, value in by_concurrency.items():
                per_round[name][concurrency].append(value)
    summary: dict[str, dict[int, dict[str, Any]]] = {}
    for figure in FIGURES:
        summary[figure.name] = {}
        for concurrency, values in sorted(per_round[figure.name].items()):
            q1, median, q3 = quartiles(values)
            target = figure.target if figure.target and figure.target.applies_at(concurrency) else None
            summary[figure.name][concurrency] = {
                "per_round": values,
                "median": median,
                "q1": q1,
                "q3": q3,
                "target": str(target) if target else None,
                "meets_target": target.met_by(median) if target else None,
            }
    return summary


def live_line(figures: dict[str, dict[int, float]], concurrency: int, prefix: str) -> str:
    """One round's paired figures at one concurrency, for stdout as the run goes."""
    cells = []
    for figure in FIGURES:
        value = figures.get(figure.name, {}).get(concurrency)
        if value is not None:
            cells.append(f"{figure.short} {value:.{figure.decimals}f}")
    return f"{prefix} paired c={concurrency:<3d} " + ", ".join(cells)
