"""Where a server's time goes under load: py-spy samples, or timed handler stages, while the harness drives it.

    python -m bench.profile synctoken|synctoken-guarded|synctoken-redis|empty-rpc [--concurrency 16] [--seconds 6]
    python -m bench.profile [synctoken|synctoken-guarded] --steps [--concurrency 16] [--seconds 6] [--out FILE]

The first prints the frames with the most samples (own time, then inclusive),
so a missed target comes with figures saying why. `--steps` prints the mean
time of each stage of IssueToken, timed inside the server (bench/steps.py),
beside the extra CPU per request over the empty RPC measured in the same run:
the quick way to find which stage a regression is in.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench import steps
from bench.measure import LoadShape, measure
from bench.systems import VENV_BIN, System, Workspace, empty_rpc, synctoken, synctoken_guarded, synctoken_redis

WARMUP_S = 0.5
LEAD_S = 1.5
"""Taken from --seconds for the window; sampling starts with the load generators, which start-up delays."""

SYSTEMS: dict[str, Callable[[Workspace], System]] = {
    "synctoken": lambda workspace: synctoken(workspace, 1),
    "synctoken-guarded": synctoken_guarded,
    "synctoken-redis": synctoken_redis,
    "empty-rpc": empty_rpc,
}


def _summarize(raw: Path, top: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    lines = [f"{total} samples"]
    lines += [f"{n / total * 100:5.1f}% own       {frame[:140]}" for frame, n in own.most_common(top)]
    lines += [f"{n / total * 100:5.1f}% inclusive {frame[:140]}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Profile one system under a fixed load and print the hottest frames, or time synctoken's stages."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("system", nargs="?", choices=sorted(SYSTEMS), help="required without --steps")
    parser.add_argument("--steps", action="store_true", help="time IssueToken's stages in the server, not py-spy")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0, help="load per system, warm-up included")
    parser.add_argument("--top", type=int, default=25, help="frames to print (py-spy)")
    parser.add_argument("--out", type=Path, help="also write the stage figures here, as JSON (--steps)")
    args = parser.parse_args(argv)
    if args.seconds <= LEAD_S:
        parser.error(f"--seconds must be more than {LEAD_S}: that much goes to start-up and warm-up")
    shape = LoadShape(args.concurrency, WARMUP_S, args.seconds - LEAD_S)
    if args.steps:
        if args.system == "empty-rpc":
            parser.error("--steps times synctoken's handler: the empty RPC has none")
        if args.system == "synctoken-redis":
            # No stage times the Redis check, and an awaited call's wall time would count the wait for Redis.
            parser.error("--steps has no stage for the Redis check: sample synctoken-redis without --steps")
        figures = steps.run(shape, guarded=args.system == "synctoken-guarded")
        print(steps.render(figures))
        if args.out:
            args.out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        return 0
    if args.system is None:
        parser.error("name the system to sample (or pass --steps)")
    return _sample(SYSTEMS[args.system], shape, args.seconds, args.top)


def _sample(make: Callable[[Workspace], System], shape: LoadShape, seconds: float, top: int) -> int:
    with tempfile.TemporaryDirectory(prefix="synctoken-profile-") as tmp:
        workspace = Workspace.make(Path(tmp) / "pki")
        system = make(workspace)
        system.start(Path(tmp))
        raw = Path(tmp) / "py-spy.txt"
        try:
            pid = system.processes()[0].pid
            command = [str(VENV_BIN / "py-spy"), "record", "-p", str(pid), "-o", str(raw), "-f", "raw"]
            # --nonblocking: sampling must not pause the server it measures. (--native
            # would, and cut its throughput tenfold here, so C frames show as their caller.)
            command += ["-d", str(int(seconds)), "-r", "250", "--nonblocking"]
            spy = subprocess.Popen(command, stdout=subprocess.DEVNULL)
            result = measure(system, shape, workspace.directory, 0)
            spy.wait(timeout=60)
        finally:
            system.stop()
        cost = f"{result.server_cpu_ms_per_request:.3f} ms CPU/req"
        print(f"{system.name} at c={shape.concurrency}: {result.rps:.0f} req/s, {cost}")
        print(_summarize(raw, top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
