"""The loopback redis-server behind the `synctoken-redis` system: a free port, no persistence, stopped by its PID."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import psutil
import redis

START_TIMEOUT_S = 10.0
SCRIPT_COMMANDS = ("cmdstat_evalsha", "cmdstat_eval")
"""How redis-py runs a registered script: EVALSHA, and EVAL once if Redis does not know it yet."""


class RedisProcess:
    """One redis-server on 127.0.0.1:`port`, started and stopped with the system it backs."""

    def __init__(self, port: int) -> None:
        """Nothing starts until start()."""
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """What `[limits.redis] url` names it by."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, log_dir: Path) -> None:
        """Start it and wait until it answers PING."""
        executable = shutil.which("redis-server")
        if executable is None:
            msg = "redis-server is not installed (Debian package redis-server; `make bench` installs it)"
            raise RuntimeError(msg)
        # No snapshot, no append-only file: nothing written to disk while it is measured, nothing left behind.
        command = [executable, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        command += ["--dir", str(log_dir), "--logfile", str(log_dir / f"redis-{self.port}.log")]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with self._client() as client:
                    client.ping()
            except (redis.ConnectionError, OSError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    msg = f"redis-server on port {self.port} did not start: see {log_dir}/redis-{self.port}.log"
                    raise RuntimeError(msg) from None
                time.sleep(0.02)
            else:
                return

    def stop(self) -> None:
        """SIGTERM to its PID, then SIGKILL if it will not go."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def processes(self) -> list[psutil.Process]:
        """The redis-server process, for its CPU time."""
        return [] if self._process is None else [psutil.Process(self._process.pid)]

    def script_calls(self) -> int:
        """How many scripts it has run since it started: one per rate-limit check."""
        with self._client() as client:
            stats = client.info("commandstats")
        return sum(int(stats[name]["calls"]) for name in SCRIPT_COMMANDS if name in stats)

    def _client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)
