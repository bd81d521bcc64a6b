"""IssueToken throughput with and without a flood of metrics scrapes, for two builds side by side.

`python -m bench.scrapeflood --before /other/checkout/.venv/bin/synctoken` runs,
round after round, each build (the other checkout's and this tree's) with its
metrics listener on: IssueToken alone, then IssueToken while a separate process
scrapes the metrics listener as fast as it can over many connections. It prints
each window and then, per build, the medians over rounds and the ratio of
throughput under the flood to throughput without it. Loopback only; every
window is bounded in time, and the flood in rate (a new connection per scrape).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench.measure import START_LEAD_S, LoadShape, measure
from bench.systems import ROOT, VENV_BIN, System, Workspace, free_port, synctoken

_SCRAPE = b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"


def _with_metrics(workspace: Workspace, name: str, executable: Path) -> tuple[System, int]:
    """One synctoken worker run by `executable`, with a metrics listener; it and the listener's port."""
    system = synctoken(workspace, 1)
    system.name = name
    system.command[0] = str(executable)
    config = Path(system.command[system.command.index("--config") + 1])
    metrics_port = free_port()
    text = config.read_text(encoding="utf-8")
    config.write_text(f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n\n{text}', encoding="utf-8")
    return system, metrics_port


def _flood(port: int, connections: int, rate: float, seconds: float) -> dict[str, int]:
    """Scrape `port` `rate` times a second (or as fast as it answers) over `connections` connections, for `seconds`.

    Paced, so that every build is offered the same flood: one flooded as fast
    as it answers would be offered more, the cheaper it makes each scrape.
    """
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    start = time.monotonic()
    end = start + seconds
    interval = connections / rate  # each connection's share

    def scraper(index: int) -> None:
        due = start + index * interval / connections
        while (now := time.monotonic()) < end:
            if due > now:
                time.sleep(due - now)
            due += interval
            received = b""
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(_SCRAPE)
                    while chunk := s.recv(65536):
                        received += chunk
                outcome = received[9:12].decode() or "closed"
            except OSError as exc:
                outcome = type(exc).__name__
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=scraper, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return dict(outcomes)


def _flood_process(port: int, connections: int, rate: float, seconds: float) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "bench.scrapeflood", "--flood", str(port)]
    command += ["--connections", str(connections), "--rate", str(rate), "--seconds", str(seconds)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    """Measure, or (with --flood) be the flood."""
    parser = argparse.ArgumentParser(prog="python -m bench.scrapeflood", description=__doc__)
    parser.add_argument("--before", type=Path, help="the other build's synctoken executable (e.g. main's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16, help="IssueToken calls in flight")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per window")
    parser.add_argument("--connections", type=int, default=32, help="scrape connections at a time")
    parser.add_argument("--rate", type=float, default=1000, help="scrapes a second offered")
    parser.add_argument("--flood", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flood is not None:
        print(json.dumps(_flood(args.flood, args.connections, args.rate, args.seconds)))
        return 0

    builds = {"after": VENV_BIN / "synctoken"} | ({"before": args.before} if args.before else {})
    shape = LoadShape(args.concurrency, warmup_s=1.0, duration_s=args.duration)
    # From before the load generators start until after their window ends.
    flood_seconds = START_LEAD_S + shape.warmup_s + shape.duration_s + 1.0
    rps: dict[tuple[str, bool], list[float]] = {}
    scrapes: dict[str, list[dict[str, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="synctoken-scrapeflood-") as tmp:
        workspace = Workspace.make(Path(tmp) / "pki")
        for round_index in range(args.rounds):
            for name in sorted(builds, reverse=True):  # before, then after: the same order every round
                system, metrics_port = _with_metrics(workspace, name, builds[name])
                system.start(Path(tmp))
                try:
                    for flooded in (False, True):
                        flood = None
                        if flooded:
                            flood = _flood_process(metrics_port, args.connections, args.rate, flood_seconds)
                        result = measure(system, shape, workspace.directory, round_index)
                        rps.setdefault((name, flooded), []).append(result.rps)
                        line = f"round {round_index + 1}/{args.rounds} {name:6s} flood={'yes' if flooded else 'no ':3s}"
                        line += f" {result.rps:7.0f} req/s  p99 {result.p99_ms:6.2f} ms  errors {result.errors}"
                        if flood is not None:
                            out, _ = flood.communicate(timeout=120)
                            scrapes.setdefault(name, []).append(json.loads(out))
                            line += f"  scrapes {scrapes[name][-1]}"
                        print(line, flush=True)
                finally:
                    system.stop()
    print(f"\nmedians over {args.rounds} rounds, c={args.concurrency}, {args.rate:g} scrapes/s offered:")
    for name in sorted(builds, reverse=True):
        alone, under_flood = statistics.median(rps[name, False]), statistics.median(rps[name, True])
        # Paired within each round: the two windows are seconds apart, so a noisy minute moves one round only.
        paired = statistics.median(f / a for a, f in zip(rps[name, False], rps[name, True], strict=True))
        served = statistics.median(s.get("200", 0) for s in scrapes[name]) / flood_seconds
        print(
            f"{name:6s} alone {alone:7.0f} req/s  flooded {under_flood:7.0f} req/s  "
            f"flooded/alone per round {paired:.2f}  scrapes answered ~{served:.0f}/s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
