"""synctoken as a subprocess: started with rlimits and a config, its JSON log read back, free ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from support.configs import SECRET_ENV
from support.constants import SYNCTOKEN
from support.logcapture import LeakWatch

START_TIMEOUT = 30

# Sets rlimits and gives SIGINT back its default action, then execs synctoken. A pytest started from
# a non-interactive shell's background job has SIGINT ignored; children inherit that, and Python then
# installs no KeyboardInterrupt handler, so a test of what Ctrl-C does would see the signal vanish.
_LAUNCHER = """
import ast, os, resource, signal, sys
for which, limit in ast.literal_eval(sys.argv[1]).items():
    soft, hard = limit if isinstance(limit, tuple) else (limit, resource.getrlimit(which)[1])
    resource.setrlimit(which, (soft, hard))
if sys.argv[2] == "sigint":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execv(sys.argv[3], sys.argv[3:])
"""


class Process:
    """A synctoken subprocess whose stdout (the JSON log) goes to a file the leak check reads."""

    def __init__(  # noqa: PLR0913 - each is one independent way a test starts the process
        self,
        args: list[str],
        log_dir: Path,
        watch: LeakWatch,
        env: dict[str, str] | None = None,
        limits: Mapping[int, int | tuple[int, int]] | None = None,
        *,
        sigint: bool = False,
        wrapper: list[str] | None = None,
    ) -> None:
        """`limits`: rlimits to start with, each a soft limit or (soft, hard) (synctoken raises soft to hard).

        `sigint`: start with SIGINT's default action, as from an interactive shell, whatever pytest's is.
        `wrapper`: a command that runs synctoken's command line (its arguments follow), e.g. in a namespace.
        """
        self.stdout_path = log_dir / "stdout.jsonl"
        self.stderr_path = log_dir / "stderr.txt"
        watch.log_files += [self.stdout_path, self.stderr_path]
        command = [SYNCTOKEN, *args]
        if limits or sigint:
            # A launcher execs synctoken after its changes: preexec_fn is unsafe in this threaded process.
            command = [sys.executable, "-c", _LAUNCHER, repr(dict(limits or {})), "sigint" if sigint else "-", *command]
        command = [*(wrapper or []), *command]
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=log_dir, env=env)

    def wait_for_stderr(self, text: str) -> str:
        """Wait until stderr contains `text`; return all of stderr."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            err = self.stderr_path.read_text()
            if text in err:
                return err
            if self.proc.poll() is not None:
                pytest.fail(f"synctoken exited {self.proc.returncode}: {err}")
            time.sleep(0.05)
        pytest.fail(f"no {text!r} on stderr within {START_TIMEOUT}s")

    def terminate(self) -> int:
        """SIGTERM, as an orchestrator would; return the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=START_TIMEOUT)

    def records(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far: whole lines only, since the server may be writing the last one."""
        text = self.stdout_path.read_text()
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]

    def wait_for_records(self, event: str, count: int = 1) -> list[dict[str, Any]]:
        """Wait until `count` records of `event` were logged; return them."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = [r for r in self.records() if r["event"] == event]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"synctoken exited {self.proc.returncode}: {self.stderr_path.read_text()}")
            time.sleep(0.05)
        pytest.fail(f"fewer than {count} {event!r} records within {START_TIMEOUT}s")


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def serve(
    text: str,
    directory: Path,
    watch: LeakWatch,
    processes: list[Process],
    workers: int = 1,
    env: dict[str, str] | None = None,
) -> Process:
    """Write `text` as directory/synctoken.toml and run `synctoken serve` on it until every worker serves."""
    path = directory / "synctoken.toml"
    path.write_text(text, encoding="utf-8")
    args = ["serve", "--config", str(path)] + (["--workers", str(workers)] if workers > 1 else [])
    process = Process(args, directory, watch, os.environ | SECRET_ENV | (env or {}))
    processes.append(process)
    process.wait_for_records("server.started", workers)
    return process


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `synctoken check-config PATH` (with the suite's secret in the environment, by default)."""
    return subprocess.run(
        [SYNCTOKEN, "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=os.environ | SECRET_ENV if env is None else env,
    )
