"""The synctoken-bff command: settings from the environment, serving until SIGTERM, logs free of tokens."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.bff import BffProcess
from support.clients import env_for
from support.inprocess import RunningServer
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import START_TIMEOUT, free_port
from synctoken.audithash import IdentityHasher

HASH_KEY = b"bff-cli-audit-key-" + b"y" * 20


@pytest.fixture
def bff_process(pki: Pki, shared_server: RunningServer, tmp_path: Path, leak_watch: LeakWatch) -> Iterator[BffProcess]:
    """synctoken-bff against the shared server, with the bff certificate, a session key and an identity hash key."""
    secret = tmp_path / "session.key"
    secret.write_bytes(os.urandom(32).hex().encode())
    hash_key = tmp_path / "audit.key"
    hash_key.write_bytes(HASH_KEY + b"\n")
    env = env_for(pki, "bff", f"localhost:{shared_server.port}") | {
        "BFF_SESSION_SECRET_FILE": str(secret),
        "BFF_IDENTITY_HASH_KEY_FILE": str(hash_key),
    }
    process = BffProcess(env, tmp_path, leak_watch)
    process.wait_until_serving()
    yield process
    if process.proc.poll() is None:
        process.proc.kill()
        process.proc.wait()


class TestCommand:
    """synctoken-bff as a deployment runs it."""

    def test_serves_tokens_and_logs_none(self, bff_process: BffProcess, leak_watch: LeakWatch) -> None:
        """/token works through the command; its log has the served line, with the token id but not the token,
        and the identity only as synctoken's audit-hash would print it."""
        body = httpx.get(f"{bff_process.url}/token", timeout=10).json()
        leak_watch.tokens.add(body["token"])
        bff_process.proc.terminate()
        assert bff_process.proc.wait(timeout=START_TIMEOUT) == 0
        log = bff_process.stderr_path.read_text()
        assert "Application shutdown complete" in log
        assert f"token.served identity={IdentityHasher(HASH_KEY)(body['identity'])} token_id=" in log
        assert body["identity"] not in log
        assert "BFF_SESSION_SECRET_FILE is not set" not in log

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
    @pytest.mark.parametrize("requests", [0, 3])
    def test_signal_is_a_clean_stop_with_status_0(self, bff_process: BffProcess, signum: int, requests: int) -> None:
        """SIGTERM and SIGINT (Ctrl-C) stop it gracefully with exit status 0: `make bff` reports no error."""
        for _ in range(requests):
            httpx.get(f"{bff_process.url}/healthz", timeout=10)
        bff_process.proc.send_signal(signum)
        assert bff_process.proc.wait(timeout=START_TIMEOUT) == 0
        log = bff_process.stderr_path.read_text()
        assert "Application shutdown complete" in log
        assert "Finished server process" in log

    def test_missing_setting_exits_2(self, tmp_path: Path, leak_watch: LeakWatch) -> None:
        """Without SYNCTOKEN_TARGET it says which variable is missing and exits 2."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCTOKEN_", "BFF_"))}
        process = BffProcess(env, tmp_path, leak_watch)
        assert process.proc.wait(timeout=START_TIMEOUT) == 2
        assert "synctoken-bff: SYNCTOKEN_TARGET is not set" in process.stderr_path.read_text()

    @pytest.mark.parametrize(
        ("variable", "value", "message"),
        [
            ("BFF_ALLOWED_ORIGINS", "*", "wildcard, which cannot be combined with credentials"),
            ("BFF_ALLOWED_ORIGINS", "https://app.example.com,null", "origin of sandboxed and file: pages"),
            ("BFF_ALLOWED_ORIGINS", "https://app.example.com/", "has a path or a trailing slash"),
            ("BFF_TOKEN_TTL", "25h", "25h is outside what synctoken ever issues, 3m to 24h"),
            ("BFF_TOKEN_TTL", "2m", "2m is outside what synctoken ever issues, 3m to 24h"),
            ("BFF_SYNC_SERVICE_SID", "IS123", "is not IS followed by 32 lower-case hex digits"),
            ("BFF_TRACING", "yes", "'yes' is neither true nor false"),
        ],
    )
    def test_bad_setting_exits_2_with_that_error_alone(
        self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, variable: str, value: str, message: str
    ) -> None:
        """A setting the BFF can tell is wrong stops it at start, exit 2, and the error is all it prints."""
        env = env_for(pki, "bff", f"localhost:{free_port()}") | {variable: value}
        env.pop("BFF_SESSION_SECRET_FILE", None)
        process = BffProcess(env, tmp_path, leak_watch)
        assert process.proc.wait(timeout=START_TIMEOUT) == 2
        stderr = process.stderr_path.read_text()
        assert stderr.startswith(f"synctoken-bff: {variable}: ")
        assert message in stderr
        assert len(stderr.strip().splitlines()) == 1, stderr

    def test_random_secret_warning_once_serving(self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch) -> None:
        """Settings that pass, without a session key file: the demo authenticator's warning, then it serves."""
        env = {k: v for k, v in env_for(pki, "bff", f"localhost:{free_port()}").items() if not k.startswith("BFF_")}
        process = BffProcess(env, tmp_path, leak_watch)
        process.wait_until_serving()
        process.proc.terminate()
        assert process.proc.wait(timeout=START_TIMEOUT) == 0
        assert "BFF_SESSION_SECRET_FILE is not set" in process.stderr_path.read_text()
