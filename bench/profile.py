"""Where a server's time goes under load: py-spy samples while the harness drives it.

    python -m bench.profile synctoken|empty-rpc [--concurrency 16] [--seconds 6]

Prints the frames with the most samples (own time, then inclusive), so a missed
target comes with figures saying why.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.measure import LoadShape, measure
from bench.systems import VENV_BIN, System, Workspace, empty_rpc, synctoken


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


def main() -> int:
    """Profile one system under a fixed load and print the hottest frames."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("system", choices=["synctoken", "empty-rpc"])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="synctoken-profile-") as tmp:
        workspace = Workspace.make(Path(tmp) / "pki")
        system: System = synctoken(workspace, 1) if args.system == "synctoken" else empty_rpc(workspace)
        system.start(Path(tmp))
        raw = Path(tmp) / "py-spy.txt"
        try:
            pid = system.processes()[0].pid
            command = [str(VENV_BIN / "py-spy"), "record", "-p", str(pid), "-o", str(raw), "-f", "raw"]
            # --nonblocking: sampling must not pause the server it measures. (--native
            # would, and cut its throughput tenfold here, so C frames show as their caller.)
            command += ["-d", str(int(args.seconds)), "-r", "250", "--nonblocking"]
            spy = subprocess.Popen(command, stdout=subprocess.DEVNULL)
            result = measure(system, LoadShape(args.concurrency, 0.5, args.seconds - 1.5), workspace.directory, 0)
            spy.wait(timeout=60)
        finally:
            system.stop()
        cost = f"{result.server_cpu_ms_per_request:.3f} ms CPU/req"
        print(f"{system.name} at c={args.concurrency}: {result.rps:.0f} req/s, {cost}")
        print(_summarize(raw, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
