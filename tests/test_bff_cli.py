"""The synctoken-bff command: settings from the environment, serving until SIGTERM, logs free of tokens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from client_support import env_for
from support import START_TIMEOUT, LeakWatch, Pki, RunningServer, free_port

SYNCTOKEN_BFF = str(Path(sys.executable).parent / "synctoken-bff")


class BffProcess:
    """synctoken-bff in a subprocess; its stdout and stderr go to files the leak check reads."""

    def __init__(self, env: dict[str, str], log_dir: Path, watch: LeakWatch) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = log_dir / "bff-stderr.txt"
        stdout_path = log_dir / "bff-stdout.txt"
        watch.log_files += [stdout_path, self.stderr_path]
        with stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.proc = subprocess.Popen(
                [SYNCTOKEN_BFF, "--host", "127.0.0.1", "--port", str(self.port)], stdout=out, stderr=err, env=env
            )

    def wait_until_serving(self) -> None:
        """Wait until /healthz answers."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"synctoken-bff exited {self.proc.returncode}: {self.stderr_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == httpx.codes.OK:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        pytest.fail(f"synctoken-bff did not serve within {START_TIMEOUT}s")


@pytest.fixture
def bff_process(pki: Pki, shared_server: RunningServer, tmp_path: Path, leak_watch: LeakWatch) -> Iterator[BffProcess]:
    """synctoken-bff against the shared server, with the bff certificate and a session key file."""
    secret = tmp_path / "session.key"
    secret.write_bytes(os.urandom(32).hex().encode())
    env = env_for(pki, "bff", f"localhost:{shared_server.port}") | {"BFF_SESSION_SECRET_FILE": str(secret)}
    process = BffProcess(env, tmp_path, leak_watch)
    process.wait_until_serving()
    yield process
    if process.proc.poll() is None:
        process.proc.kill()
        process.proc.wait()


class TestCommand:
    """synctoken-bff as a deployment runs it."""

    def test_serves_tokens_and_logs_none(self, bff_process: BffProcess, leak_watch: LeakWatch) -> None:
        """/token works through the command; its log has the served line, with the token id but not the token."""
        body = httpx.get(f"{bff_process.url}/token", timeout=10).json()
        leak_watch.tokens.add(body["token"])
        bff_process.proc.terminate()
        # uvicorn shuts down gracefully, then re-raises the signal, so the exit says what ended it.
        assert bff_process.proc.wait(timeout=START_TIMEOUT) in {0, -signal.SIGTERM}
        log = bff_process.stderr_path.read_text()
        assert "Application shutdown complete" in log
        assert f"token.served identity={body['identity']} token_id=" in log
        assert "BFF_SESSION_SECRET_FILE is not set" not in log

    def test_missing_setting_exits_2(self, tmp_path: Path, leak_watch: LeakWatch) -> None:
        """Without SYNCTOKEN_TARGET it says which variable is missing and exits 2."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCTOKEN_", "BFF_"))}
        process = BffProcess(env, tmp_path, leak_watch)
        assert process.proc.wait(timeout=START_TIMEOUT) == 2
        assert "synctoken-bff: SYNCTOKEN_TARGET is not set" in process.stderr_path.read_text()
