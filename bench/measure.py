"""One measurement: a fixed load on one running system, with the server's CPU and memory alongside."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from bench.systems import ROOT, System

START_LEAD_S = 1.5  # time for load-generator processes to start and connect


@dataclass(frozen=True)
class LoadShape:
    """How hard and how long to push."""

    concurrency: int
    warmup_s: float
    duration_s: float


@dataclass(frozen=True)
class Result:
    """What one measurement found. Latencies in milliseconds."""

    system: str
    concurrency: int
    round: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float
    server_cpu_ms_per_request: float
    server_peak_rss_mib: float
    loadgen_cpu_s: float
    backend_cpu_s: float = 0.0
    """CPU seconds of the processes the server depends on (its Redis) over the window; not in server_cpu_s."""
    backend_calls: int = 0
    """Scripts its Redis ran during the whole load, warm-up included: one per rate-limit check."""

    @property
    def backend_cpu_ms_per_request(self) -> float:
        """Its Redis's CPU per request, in milliseconds: 0 for a system without one."""
        return self.backend_cpu_s * 1000 / self.requests if self.requests else float("nan")

    def as_dict(self) -> dict[str, float | int | str]:
        """Plain data for JSON."""
        return asdict(self)


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _peak_rss_mib(processes: list[psutil.Process]) -> float:
    # VmHWM: the high-water mark of resident memory, per process, since it started.
    total_kib = 0
    for process in processes:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


def _grpc_load(system: System, shape: LoadShape, pki: Path) -> tuple[list[float], int, tuple[float, float], float]:
    # Two load-generator processes (one at concurrency 1), four channels each:
    # many calls in flight over a few connections, as a fleet of backends would.
    generators = 1 if shape.concurrency == 1 else 2
    start_at = time.time() + START_LEAD_S
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.loadgen",
                "--target",
                f"localhost:{system.port}",
                "--method",
                system.grpc_method,
                "--payload",
                system.grpc_payload.hex(),
                "--pki",
                str(pki),
                "--concurrency",
                str(max(1, shape.concurrency // generators)),
                "--channels",
                str(min(4, max(1, shape.concurrency // generators))),
                "--start-at",
                str(start_at),
                "--warmup",
                str(shape.warmup_s),
                "--duration",
                str(shape.duration_s),
            ],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        for _ in range(generators)
    ]
    cpu = _sample_cpu_over_window(system, start_at + shape.warmup_s, shape.duration_s)
    latencies: list[float] = []
    errors = 0
    loadgen_cpu = 0.0
    for proc in procs:
        out, _ = proc.communicate(timeout=60 + shape.duration_s)
        if proc.returncode != 0:
            msg = f"load generator failed against {system.name}"
            raise RuntimeError(msg)
        data = json.loads(out)
        latencies += data["latencies_ms"]
        errors += sum(data["errors"].values())
        loadgen_cpu += data["cpu_s"]
    return latencies, errors, cpu, loadgen_cpu


def _sample_cpu_over_window(system: System, window_start: float, duration: float) -> tuple[float, float]:
    """The server's CPU seconds over the window, and (apart) those of the processes it depends on."""
    time.sleep(max(0.0, window_start - time.time()))
    processes, backend = system.processes(), system.backend_processes()
    before, backend_before = _cpu_seconds(processes), _cpu_seconds(backend)
    time.sleep(duration)
    return _cpu_seconds(processes) - before, _cpu_seconds(backend) - backend_before


def _http_load(system: System, shape: LoadShape) -> tuple[dict[str, float], int, tuple[float, float], float]:
    wrk = shutil.which("wrk")
    if wrk is None:
        msg = "wrk is not installed (Debian package wrk; `make bench` installs it)"
        raise RuntimeError(msg)
    url = f"http://127.0.0.1:{system.port}{system.http_path}"
    base = [wrk, "-t1", f"-c{shape.concurrency}"]
    subprocess.run([*base, f"-d{max(1, round(shape.warmup_s))}s", url], capture_output=True, check=True, timeout=60)
    script = str(ROOT / "bench" / "express" / "report.lua")
    run = subprocess.Popen(
        [*base, f"-d{max(1, round(shape.duration_s))}s", "-s", script, url], stdout=subprocess.PIPE, text=True
    )
    wrk_process = psutil.Process(run.pid)
    wrk_before = _cpu_seconds([wrk_process])
    cpu = _sample_cpu_over_window(system, time.time(), max(1, round(shape.duration_s)))
    loadgen_cpu = _cpu_seconds([wrk_process]) - wrk_before
    out, _ = run.communicate(timeout=60 + shape.duration_s)
    figures = json.loads(out.strip().splitlines()[-1])
    return figures, int(figures["errors"]), cpu, loadgen_cpu


def measure(system: System, shape: LoadShape, pki: Path, round_index: int) -> Result:
    """Load `system` at `shape` and return the figures."""
    scripts_before = system.redis.script_calls() if system.redis is not None else 0
    if system.kind == "grpc":
        latencies, errors, cpu, loadgen_cpu = _grpc_load(system, shape, pki)
        latencies.sort()
        requests = len(latencies)
        duration = shape.duration_s
        p50, p90, p99 = (_percentile(latencies, f) for f in (0.5, 0.9, 0.99))
        worst = latencies[-1] if latencies else float("nan")
    else:
        figures, errors, cpu, loadgen_cpu = _http_load(system, shape)
        requests = int(figures["requests"])
        duration = figures["duration_us"] / 1e6
        p50, p90, p99, worst = figures["p50"], figures["p90"], figures["p99"], figures["max"]
    rps = requests / duration
    server_cpu, backend_cpu = cpu
    backend_calls = system.redis.script_calls() - scripts_before if system.redis is not None else 0
    result = Result(
        system=system.name,
        concurrency=shape.concurrency,
        round=round_index,
        requests=requests,
        errors=errors,
        rps=rps,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        max_ms=worst,
        server_cpu_s=server_cpu,
        server_cpu_ms_per_request=server_cpu * 1000 / requests if requests else float("nan"),
        server_peak_rss_mib=_peak_rss_mib(system.processes()),
        # Cores the load generators used over the window.
        loadgen_cpu_s=loadgen_cpu,
        backend_cpu_s=backend_cpu,
        backend_calls=backend_calls,
    )
    if system.redis is not None:
        _check_every_call_went_to_redis(result)
    return result


def _check_every_call_went_to_redis(result: Result) -> None:
    """Fail unless every call ran the Redis script and none was refused: otherwise the figures are not its cost.

    The limits are far above the load, and a Redis that cannot answer refuses the call
    (on_backend_failure = "deny"), so a single error means a call that was not checked in Redis.
    """
    if result.errors or result.backend_calls < result.requests:
        msg = (
            f"{result.system} at c={result.concurrency}: {result.errors} call(s) refused or failed, "
            f"{result.backend_calls} Redis script(s) run for {result.requests} measured calls; "
            "every call must be checked in Redis and allowed"
        )
        raise RuntimeError(msg)


def median_of(results: list[Result], field: str) -> float:
    """The median of one field over rounds."""
    return statistics.median(float(getattr(r, field)) for r in results)
