"""The `synctoken` command as users run it: dev, serve, check-config, in real subprocesses."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from support.configs import SECRET_ENV, WriteConfig, config_text
from support.constants import ACCOUNT_SID, API_KEY_SID, API_SECRET, BFF_ID, GRPCURL, SERVICE_A, SYNCTOKEN
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import START_TIMEOUT, Process, check_config, free_port
from synctoken.v1 import token_service_pb2, token_service_pb2_grpc
from synctoken_server.authn.callercert import SPIFFE_ID_FORM
from synctoken_server.dev import devenv
from synctoken_server.dev.pki import CertificateAuthority, KeyPair, LeafSpec
from synctoken_server.process.running import EXIT_INTERRUPTED, EXIT_WORKER_DIED


def without_twilio_env() -> dict[str, str]:
    """This process's environment minus any real Twilio credentials."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TWILIO_")}


class TestDev:
    """`synctoken dev`: the quick start's first command."""

    def start_dev(self, tmp_path: Path, watch: LeakWatch, processes: list[Process], env: dict[str, str]) -> Process:
        """Start `synctoken dev` on a free port and wait for its grpcurl hint."""
        process = Process(["dev", "--port", "0", "--dir", str(tmp_path / "dev")], tmp_path, watch, env)
        processes.append(process)
        process.wait_for_stderr("Try:")
        return process

    def run_printed_command(self, process: Process, watch: LeakWatch) -> dict[str, str]:
        """Run the grpcurl command dev printed, exactly, with our grpcurl binary."""
        line = process.wait_for_stderr("Try:").split("Try:\n", 1)[1].strip()
        argv = shlex.split(line)
        assert Path(argv[0]).name == "grpcurl"
        result = subprocess.run([GRPCURL, *argv[1:]], capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, result.stderr
        response: dict[str, str] = json.loads(result.stdout)
        watch.tokens.add(response["token"])
        return response

    def test_dev_serves_the_printed_command(
        self, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """dev makes a PKI and config, serves, and the grpcurl command it prints returns a dev token."""
        process = self.start_dev(tmp_path, leak_watch, processes, without_twilio_env())
        assert "Twilio will refuse them" in process.wait_for_stderr("Try:")
        response = self.run_printed_command(process, leak_watch)
        secret = (tmp_path / "dev" / devenv.SECRET_FILE).read_text().strip()
        leak_watch.secrets.add(secret)
        claims = jwt.decode(response["token"], secret, algorithms=["HS256"])
        assert claims["iss"] == devenv.DEV_API_KEY_SID
        assert claims["grants"] == {"identity": "alice", "data_sync": {"service_sid": devenv.DEV_SYNC_SERVICE_SID}}
        assert process.terminate() == 0
        records = process.records()
        assert [r["event"] for r in records] == [
            "tls.loaded",
            "server.started",
            "token.decision",
            "server.stopping",
            "server.stopped",
        ]
        assert records[1]["event_loop"] == "uvloop"
        assert (tmp_path / "dev" / devenv.CLIENT_KEY).stat().st_mode & 0o077 == 0

    def test_dev_uses_real_credentials_when_set(
        self, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """With TWILIO_* set, dev signs with them, says so, and writes no secret to disk."""
        env = without_twilio_env() | {
            "TWILIO_ACCOUNT_SID": "AC" + "5" * 32,
            "TWILIO_API_KEY": "SK" + "6" * 32,
            "TWILIO_API_SECRET": API_SECRET,
            "TWILIO_SYNC_SERVICE_SID": "IS" + "7" * 32,
        }
        process = self.start_dev(tmp_path, leak_watch, processes, env)
        assert "tokens are real" in process.wait_for_stderr("Try:")
        claims = jwt.decode(self.run_printed_command(process, leak_watch)["token"], API_SECRET, algorithms=["HS256"])
        assert (claims["sub"], claims["iss"]) == ("AC" + "5" * 32, "SK" + "6" * 32)
        assert claims["grants"]["data_sync"] == {"service_sid": "IS" + "7" * 32}
        assert not (tmp_path / "dev" / devenv.SECRET_FILE).exists()
        assert API_SECRET not in (tmp_path / "dev" / devenv.CONFIG_FILE).read_text()
        assert process.terminate() == 0

    @pytest.mark.parametrize(
        "given",
        [("TWILIO_ACCOUNT_SID",), ("TWILIO_API_KEY", "TWILIO_API_SECRET")],
    )
    def test_dev_refuses_some_twilio_variables(self, tmp_path: Path, given: tuple[str, ...]) -> None:
        """Setting only some TWILIO_* variables is an error naming the missing ones, not silently dev credentials."""
        env = without_twilio_env() | dict.fromkeys(given, "set")
        result = subprocess.run(
            [SYNCTOKEN, "dev", "--port", "0", "--dir", str(tmp_path / "dev")],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=env,
        )
        missing = [n for n in ("TWILIO_ACCOUNT_SID", "TWILIO_API_KEY", "TWILIO_API_SECRET") if n not in given]
        verb = "is" if len(missing) == 1 else "are"
        assert result.returncode == 2
        assert result.stderr == (
            f"synctoken dev: {' and '.join(missing)} {verb} not set: set all of TWILIO_ACCOUNT_SID, "
            "TWILIO_API_KEY, TWILIO_API_SECRET for real tokens, or none for dev ones\n"
        )

    @pytest.mark.parametrize(("name", "days_left"), [(devenv.CLIENT_CERT, -1), (devenv.SERVER_CERT, 3)])
    def test_dev_renews_expiring_certificates(self, tmp_path: Path, name: str, days_left: int) -> None:
        """An expired certificate, or one with less than a week left, makes dev remake its PKI."""
        first = devenv.prepare(tmp_path, 50051, environ={})
        ca = (first.directory / devenv.CA_FILE).read_bytes()
        now = dt.datetime.now(dt.UTC)
        old = CertificateAuthority("old dev CA").issue(
            LeafSpec("old", not_before=now - dt.timedelta(days=30), not_after=now + dt.timedelta(days=days_left))
        )
        (tmp_path / name).write_bytes(old.cert_pem)
        devenv.prepare(tmp_path, 50051, environ={})
        assert (tmp_path / devenv.CA_FILE).read_bytes() != ca
        for cert_file in (devenv.CA_FILE, devenv.SERVER_CERT, devenv.CLIENT_CERT):
            cert = x509.load_pem_x509_certificate((tmp_path / cert_file).read_bytes())
            assert cert.not_valid_after_utc - now > devenv.RENEW_MARGIN

    def test_dev_on_a_busy_port_writes_nothing(self, tmp_path: Path) -> None:
        """dev on a port in use (a dev server already running there) exits 3 before touching the dev folder."""
        with socket.socket() as taken:
            taken.bind(("localhost", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = subprocess.run(
                [SYNCTOKEN, "dev", "--port", str(port), "--dir", str(tmp_path / "dev")],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                env=without_twilio_env(),
            )
        assert result.returncode == 3
        assert result.stderr == f"synctoken dev: cannot listen on localhost:{port}: address in use\n"
        assert not (tmp_path / "dev").exists()

    def test_dev_reuses_its_pki(self, tmp_path: Path) -> None:
        """A second run keeps the CA and certificates, so clients configured once keep working."""
        first = devenv.prepare(tmp_path, 50051, environ={})
        ca = (first.directory / devenv.CA_FILE).read_bytes()
        second = devenv.prepare(tmp_path, 50052, environ={})
        assert (second.directory / devenv.CA_FILE).read_bytes() == ca
        assert "localhost:50052" in second.config_path.read_text()


class TestServe:
    """`synctoken serve --config FILE`."""

    @pytest.mark.parametrize("workers", ["1", "2"])
    def test_port_in_use(
        self,
        pki: Pki,
        tmp_path: Path,
        write_config: WriteConfig,
        leak_watch: LeakWatch,
        processes: list[Process],
        workers: str,
    ) -> None:
        """On a port another program holds, serve exits 3 with a message instead of sharing it (workers too)."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            path = write_config(config_text(pki, listen=f"127.0.0.1:{port}"))
            process = Process(
                ["serve", "--workers", workers, "--config", str(path)], tmp_path, leak_watch, os.environ | SECRET_ENV
            )
            processes.append(process)
            assert process.proc.wait(timeout=START_TIMEOUT) == 3
        assert f"cannot listen on 127.0.0.1:{port}" in process.stderr_path.read_text()

    def test_bad_config_exits_2(
        self, tmp_path: Path, write_config: WriteConfig, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """A config error is reported on stderr, naming file and key, with exit status 2."""
        path = write_config("[server]\nlisten = 5\n")
        process = Process(["serve", "--config", str(path)], tmp_path, leak_watch)
        processes.append(process)
        assert process.proc.wait(timeout=START_TIMEOUT) == 2
        assert process.stderr_path.read_text() == f"synctoken: config error: {path}: server.listen: must be a string\n"

    @pytest.mark.parametrize("args", [["serve", "--config"], ["check-config"]], ids=["serve", "check-config"])
    def test_ctrl_c_while_the_config_loads(
        self, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process], args: list[str]
    ) -> None:
        """Ctrl-C before the server runs (its config still being read) exits 130, as a shell says, with no traceback."""
        fifo = tmp_path / "synctoken.toml"
        os.mkfifo(fifo)  # a config that is never finished: the read blocks until the signal
        process = Process([*args, str(fifo)], tmp_path, leak_watch, sigint=True)
        processes.append(process)
        deadline = time.monotonic() + START_TIMEOUT
        writer = None
        while writer is None:  # a write end opens only once synctoken has the file open to read
            assert process.proc.poll() is None, process.stderr_path.read_text()
            assert time.monotonic() < deadline, "synctoken never opened its config"
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
        try:
            process.proc.send_signal(signal.SIGINT)
            assert process.proc.wait(timeout=START_TIMEOUT) == 128 + signal.SIGINT
        finally:
            os.close(writer)
        assert process.stderr_path.read_text() == ""


class TestWorkers:
    """`synctoken serve --workers N`: N processes sharing one port."""

    def test_two_workers_serve_and_stop(
        self, pki: Pki, tmp_path: Path, write_config: WriteConfig, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """Both workers start, fresh connections get tokens, and SIGTERM stops everything cleanly."""
        port = free_port()
        path = write_config(config_text(pki, listen=f"127.0.0.1:{port}"))
        process = Process(
            ["serve", "--workers", "2", "--config", str(path)], tmp_path, leak_watch, os.environ | SECRET_ENV
        )
        processes.append(process)
        deadline = time.monotonic() + START_TIMEOUT
        while sum(r["event"] == "server.started" for r in process.records()) < 2:
            assert process.proc.poll() is None, process.stderr_path.read_text()
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        for _ in range(6):
            channel = grpc.secure_channel(f"localhost:{port}", pki.credentials("bff"))
            response = token_service_pb2_grpc.TokenServiceStub(channel).IssueToken(
                token_service_pb2.IssueTokenRequest(identity="alice", sync=token_service_pb2.SyncGrant()), timeout=10
            )
            leak_watch.tokens.add(response.token)
            channel.close()
        assert process.terminate() == 0
        records = process.records()
        started = [r for r in records if r["event"] == "server.started"]
        assert sorted(r["worker"] for r in started) == [0, 1]
        # Each worker runs its own loop, and each one is uvloop (running.py says why).
        assert [r["event_loop"] for r in started] == ["uvloop", "uvloop"]
        assert sum(r["event"] == "server.stopped" for r in records) == 2
        assert sum(r.get("outcome") == "issued" for r in records) == 6
        assert {r["worker"] for r in records if r["event"] == "token.decision"} <= {0, 1}
        assert all("worker" in r for r in records if r["event"] == "token.decision")

    def test_ctrl_c_while_workers_read_the_config(
        self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """Ctrl-C reaching workers still reading their config: each exits 130 without a traceback, as one server."""
        fifo = tmp_path / "synctoken.toml"
        os.mkfifo(fifo)  # the parent reads it whole; then each worker's read blocks until the signal
        process = Process(
            ["serve", "--workers", "2", "--config", str(fifo)],
            tmp_path,
            leak_watch,
            os.environ | SECRET_ENV,
            sigint=True,
        )
        processes.append(process)
        with open(fifo, "w", encoding="utf-8") as parents:  # noqa: PTH123 - a FIFO: opened once the parent reads
            parents.write(config_text(pki, listen=f"127.0.0.1:{free_port()}"))
        [started] = process.wait_for_records("workers.started")
        writer = None
        try:
            deadline = time.monotonic() + START_TIMEOUT
            # Both workers have the FIFO open (a writer keeps their reads blocked): none is still importing.
            while not all(_has_open(pid, fifo) for pid in started["pids"]):
                assert process.proc.poll() is None, process.stderr_path.read_text()
                assert time.monotonic() < deadline, "the workers never opened their config"
                if writer is None:
                    with contextlib.suppress(OSError):
                        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                time.sleep(0.05)
            # As a terminal's Ctrl-C reaches them; the parent is left out, so that it reports the exits.
            for pid in started["pids"]:
                os.kill(pid, signal.SIGINT)
            [exited] = process.wait_for_records("workers.worker_exited")
        finally:
            if writer is not None:
                os.close(writer)  # the parent reads the config again as it stops: an empty one now
        assert process.proc.wait(timeout=START_TIMEOUT) == EXIT_WORKER_DIED
        assert exited["exitcode"] == 128 + signal.SIGINT
        assert process.stderr_path.read_text() == ""

    @pytest.mark.parametrize("delay", [0.0, 0.1, 0.3, 0.6, 1.0, None])
    def test_ctrl_c_to_the_group_while_workers_start(
        self, pki: Pki, tmp_path: Path, write_config: WriteConfig, leak_watch: LeakWatch, delay: float | None
    ) -> None:
        """Ctrl-C to the whole group as workers start (imports, config, loop) or serve: no traceback, 130 or 0."""
        path = write_config(config_text(pki, listen=f"127.0.0.1:{free_port()}"))
        # setsid: a group of its own, as a terminal's foreground job, so that Ctrl-C reaches every worker.
        process = Process(
            ["serve", "--workers", "2", "--config", str(path)],
            tmp_path,
            leak_watch,
            os.environ | SECRET_ENV,
            sigint=True,
            wrapper=["setsid"],
        )
        try:
            process.wait_for_records("workers.started")  # the workers spawned: their interpreters start now
            if delay is None:
                process.wait_for_records("server.started", count=2)
            else:  # not a timing assertion: each delay catches the workers at another step of starting
                time.sleep(delay)
            os.killpg(process.proc.pid, signal.SIGINT)
            status = process.proc.wait(timeout=START_TIMEOUT)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.proc.pid, signal.SIGKILL)
            process.proc.wait(timeout=START_TIMEOUT)
        assert process.stderr_path.read_text() == ""
        [stopped] = process.wait_for_records("workers.stopped")
        # A worker still starting ends 130, one already serving stops cleanly; the parent says 130 if any was starting.
        assert set(stopped["exitcodes"]) <= {0, EXIT_INTERRUPTED}
        assert status == stopped["status"] == (EXIT_INTERRUPTED if EXIT_INTERRUPTED in stopped["exitcodes"] else 0)
        if delay == 0:  # the workers' interpreters are still starting: the Ctrl-C waits for them, then ends them
            assert stopped["exitcodes"] == [EXIT_INTERRUPTED, EXIT_INTERRUPTED]
        if delay is None:  # both serve: each stops as a single server stops on Ctrl-C
            assert stopped["exitcodes"] == [0, 0]

    def test_workers_need_a_fixed_port(
        self, pki: Pki, tmp_path: Path, write_config: WriteConfig, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """Port 0 would give each worker its own port: refused with exit 2."""
        path = write_config(config_text(pki))
        process = Process(
            ["serve", "--workers", "2", "--config", str(path)], tmp_path, leak_watch, os.environ | SECRET_ENV
        )
        processes.append(process)
        assert process.proc.wait(timeout=START_TIMEOUT) == 2
        assert process.stderr_path.read_text() == (
            f"synctoken: config error: {path}: server.listen: --workers needs a fixed port, not :0\n"
        )

    def test_workers_refuse_mesh_mode(
        self, pki: Pki, tmp_path: Path, write_config: WriteConfig, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """Workers cannot share one mesh socket yet: refused with exit 2 rather than half-served."""
        mesh = '[mesh]\nlisten = "unix:mesh.sock"\ntrust_forwarded_client_cert = true\n'
        path = write_config(mesh + config_text(pki, listen=f"127.0.0.1:{free_port()}"))
        process = Process(
            ["serve", "--workers", "2", "--config", str(path)], tmp_path, leak_watch, os.environ | SECRET_ENV
        )
        processes.append(process)
        assert process.proc.wait(timeout=START_TIMEOUT) == 2
        assert process.stderr_path.read_text() == (
            f"synctoken: config error: {path}: mesh: not yet supported with --workers: run one worker per sidecar\n"
        )


class TestCheckConfig:
    """`synctoken check-config FILE` runs the same loader and prints the effective policy."""

    def test_prints_effective_policy_without_secret(self, pki: Pki, write_config: WriteConfig) -> None:
        """The output lists callers with inherited defaults, and never the secret."""
        path = write_config(config_text(pki))
        result = check_config(path)
        assert result.returncode == 0, result.stderr
        assert API_SECRET not in result.stdout + result.stderr
        effective = json.loads(result.stdout)
        # The single-key spelling, its secret from the default variable: the variable's name is shown.
        assert effective["twilio"] == {
            "account_sid": ACCOUNT_SID,
            "api_key": API_KEY_SID,
            "api_secret_env": "TWILIO_API_SECRET",
        }
        assert [c["max_ttl"] for c in effective["callers"]] == ["4h", "30m", "24h"]
        assert effective["tls"]["cert_file"] == str(pki.directory / "server.pem")
        assert effective["mesh"] is None
        assert effective["callers"][1]["identity_pattern"] == "user-[0-9]+"

    def test_prints_every_key_the_loader_read(self, pki: Pki, tmp_path: Path, write_config: WriteConfig) -> None:
        """Every key of a file using every table comes back with its value, and defaults for the rest.

        The printout is what the loader recorded as it read, so a key added to the schema shows up
        without check-config being told: this is the check that the two cannot drift.
        """
        for name in ("sk-current.secret", "audit-hmac-key"):
            (tmp_path / name).write_text("s" * 40 + "\n", encoding="utf-8")
            (tmp_path / name).chmod(0o600)
        written = config_text(pki, policy="").replace(
            f'api_key = "{API_KEY_SID}"\n',
            f'[[twilio.api_keys]]\nsid = "{API_KEY_SID}"\nsecret_file = "sk-current.secret"\nactive = true\n',
        ) + textwrap.dedent(
            f"""
            [audit]
            identity_hash_key_file = "audit-hmac-key"
            [limits]
            shadow = true
            [mesh]
            listen = "unix:mesh.sock"
            trust_forwarded_client_cert = true
            [metrics]
            listen = "127.0.0.1:0"
            [defaults]
            default_ttl = "20m"
            max_ttl = "2h"
            [[callers]]
            id = "{BFF_ID}"
            sync_services = ["{SERVICE_A}"]
            rate = 2.5
            identity_rate = 1
            identity_burst = 3
            """
        )
        path = write_config(written)
        result = check_config(path, env={})
        assert result.returncode == 0, result.stderr
        effective = json.loads(result.stdout)
        assert effective["server"] == {
            "listen": "127.0.0.1:0",
            "drain_delay": "5s",
            "grace": "10s",
            "handshake_timeout": "10s",
            "idle_timeout": "5m",
            "max_connection_age": "10m",
            "watch_interval": "1s",
        }
        assert effective["twilio"]["api_keys"] == [
            {"sid": API_KEY_SID, "secret_file": str(tmp_path / "sk-current.secret"), "active": True}
        ]
        assert effective["audit"] == {"identity_hash_key_file": str(tmp_path / "audit-hmac-key")}
        assert effective["limits"] == {
            "shadow": True,
            "replicas": 1,
            "backend": "local",
            "on_backend_failure": "local",
            "redis": None,
        }
        assert effective["mesh"]["trust_forwarded_client_cert"] is True
        assert effective["metrics"] == {"listen": "127.0.0.1:0"}
        assert effective["defaults"] == {"max_ttl": "2h", "default_ttl": "20m"}
        assert effective["callers"] == [
            {
                "id": BFF_ID,
                "sync_services": [SERVICE_A],
                "default_sync_service": "",
                "identity_pattern": "",
                "allowed_identity_characters": "",
                "max_ttl": "2h",
                "default_ttl": "20m",
                "rate": 2.5,
                "burst": 3,
                "identity_rate": 1,
                "identity_burst": 3,
                "shadow": True,
            }
        ]
        # Every table and every key written in the file is in the printout.
        for table, keys in tomllib.loads(written).items():
            shown = effective[table]
            for entry, printed in zip(
                keys if isinstance(keys, list) else [keys], shown if isinstance(shown, list) else [shown], strict=True
            ):
                assert set(entry) <= set(printed), table
        assert "s" * 40 not in result.stdout + result.stderr

    def test_warns_about_readable_key(self, pki: Pki, tmp_path: Path, write_config: WriteConfig) -> None:
        """A server key readable by others is accepted, with a warning on stderr naming the key."""
        key = tmp_path / "server-key.pem"
        key.write_bytes((pki.directory / "server-key.pem").read_bytes())
        key.chmod(0o644)
        path = write_config(config_text(pki).replace(str(pki.directory / "server-key.pem"), str(key)))
        result = check_config(path)
        assert result.returncode == 0, result.stderr
        assert result.stderr == (
            f"synctoken: warning: {path}: tls.key_file: {key} is readable by group or others (mode 0644); "
            "make it readable by its owner only (chmod 600)\n"
        )

    def test_bad_pattern_is_one_message(self, pki: Pki, write_config: WriteConfig) -> None:
        """A pattern RE2 refuses exits 2 with the loader's one line: RE2 logs nothing of its own on stderr."""
        path = write_config(config_text(pki).replace("user-[0-9]+", "user-[0-9"))
        result = check_config(path)
        assert result.returncode == 2
        assert result.stderr == (
            f"synctoken: config error: {path}: callers[1].identity_pattern: not a valid RE2 pattern: missing ]: [0-9\n"
        )

    def test_reports_errors(self, write_config: WriteConfig) -> None:
        """A bad file exits 2 with the loader's message."""
        path = write_config("[bogus]\n")
        result = subprocess.run(
            [SYNCTOKEN, "check-config", str(path)], capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 2
        assert result.stderr == (
            f"synctoken: config error: {path}: bogus: unknown key; "
            "expected one of audit, callers, defaults, health, identity, limits, mesh, metrics, server, tls, tracing, twilio\n"
        )


class TestLibraryWarnings:
    """A deprecation inside a dependency is the project's to fix: the commands print only their own lines."""

    COMMANDS = ("synctoken", "synctoken-client", "synctoken-bff")

    @staticmethod
    def run(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(SYNCTOKEN).parent / command), "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | env,
        )

    @pytest.mark.parametrize("command", COMMANDS)
    def test_commands_print_no_library_warning(self, command: str) -> None:
        """--help loads each command's libraries (spiffe and cryptography for synctoken) and says nothing else."""
        result = self.run(command, {})
        assert result.returncode == 0
        assert result.stderr == ""
        assert result.stdout.startswith(f"usage: {command}")

    @pytest.mark.parametrize(("pythonwarnings", "shown"), [(None, False), ("default", True)])
    def test_pythonwarnings_shows_them(self, pythonwarnings: str | None, shown: bool) -> None:
        """The console scripts' first import silences warnings unless PYTHONWARNINGS asks for them.

        A warning raised after that import, as a library's would be, reaches stderr only with
        PYTHONWARNINGS set (whichever libraries the lock holds, and whether they warn today).
        """
        env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
        if pythonwarnings is not None:
            env["PYTHONWARNINGS"] = pythonwarnings
        probe = "import synctoken_server.command, warnings; warnings.warn('a library deprecation', DeprecationWarning)"
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True, env=env
        )
        assert ("DeprecationWarning: a library deprecation" in result.stderr) is shown
        assert shown or result.stderr == ""


def dev_issue(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `synctoken dev issue ARGS` as a user would."""
    return subprocess.run(
        [SYNCTOKEN, "dev", "issue", *map(str, args)], capture_output=True, text=True, timeout=30, check=False, cwd=cwd
    )


def certificate(path: Path) -> x509.Certificate:
    """The first certificate in the PEM file `path`."""
    return x509.load_pem_x509_certificate(path.read_bytes())


def sans(cert: x509.Certificate) -> list[str]:
    """The certificate's subjectAltNames, as strings."""
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(getattr(name, "value", name)) for name in names]


class TestDevIssue:
    """`synctoken dev issue`: more certificates from the dev CA, or a new CA."""

    @pytest.fixture
    def dev_dir(self, tmp_path: Path) -> Path:
        """A dev folder as `synctoken dev` leaves it."""
        return devenv.prepare(tmp_path / "dev", 0, environ={}).directory

    @pytest.mark.parametrize(
        ("source", "callers"),
        [
            ("spiffe", ["spiffe://example.org/ns/web/sa/bff", "spiffe://synctoken.test/a/b.c-d_E", "spiffe://x_y.z/1"]),
            ("dns_san", ["svc.internal", "billing.internal.example.com", "a"]),
        ],
    )
    def test_issued_certificates_are_served_and_callers(
        self,
        dev_dir: Path,
        tmp_path: Path,
        leak_watch: LeakWatch,
        processes: list[Process],
        source: str,
        callers: list[str],
    ) -> None:
        """A server certificate and clients issued by the command work with a real server, each its own caller."""
        assert dev_issue("--dir", dev_dir, "--server", "--dns-name", "localhost", "--out", tmp_path).returncode == 0
        flag = "--spiffe-id" if source == "spiffe" else "--dns-name"
        for n, caller in enumerate(callers):
            result = dev_issue("--dir", dev_dir, flag, caller, "--out", tmp_path / f"c{n}")
            assert result.returncode == 0, result.stderr
            assert caller in result.stderr
            assert "PRIVATE KEY" not in result.stdout + result.stderr
        trust = '\ntrust_domains = ["example.org", "synctoken.test", "x_y.z"]' if source == "spiffe" else ""
        entries = "".join(
            f'[[callers]]\nid = "{c}"\nsync_services = ["{devenv.DEV_SYNC_SERVICE_SID}"]\n\n' for c in callers
        )
        port = free_port()
        # Beside the issued files, which it names by relative path.
        config = tmp_path / "synctoken.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:{port}"\n\n[tls]\ncert_file = "server.pem"\nkey_file = "server-key.pem"\n'
            f'client_ca_file = "{dev_dir / devenv.CA_FILE}"\n\n[identity]\nsource = "{source}"{trust}\n\n'
            f'[twilio]\naccount_sid = "{devenv.DEV_ACCOUNT_SID}"\napi_key = "{API_KEY_SID}"\n\n{entries}',
            encoding="utf-8",
        )
        process = Process(["serve", "--config", str(config)], tmp_path, leak_watch, os.environ | SECRET_ENV)
        processes.append(process)
        process.wait_for_records("server.started")
        root = (dev_dir / devenv.CA_FILE).read_bytes()
        for n, caller in enumerate(callers):
            pair = (
                (tmp_path / f"c{n}" / "client-key.pem").read_bytes(),
                (tmp_path / f"c{n}" / "client.pem").read_bytes(),
            )
            with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(root, *pair)) as channel:
                stub = token_service_pb2_grpc.TokenServiceStub(channel)
                request = token_service_pb2.IssueTokenRequest(
                    identity="alice", sync=token_service_pb2.SyncGrant(service_sid=devenv.DEV_SYNC_SERVICE_SID)
                )
                leak_watch.tokens.add(stub.IssueToken(request, timeout=10).token)
                whoami = stub.GetCallerIdentity(token_service_pb2.GetCallerIdentityRequest(), timeout=10)
            assert (whoami.caller_id, whoami.policy.matched_caller) == (caller, caller)
        assert process.terminate() == 0

    def test_files_modes_and_contents(self, dev_dir: Path, tmp_path: Path) -> None:
        """Keys (the CA's too) are the owner's alone; each certificate has what was asked, signed by its CA."""
        assert (dev_dir / devenv.CA_KEY).stat().st_mode & 0o777 == 0o600
        ca = certificate(dev_dir / devenv.CA_FILE)
        assert (dev_dir / devenv.CLIENTS_CA_FILE).read_bytes() == (dev_dir / devenv.CA_FILE).read_bytes()
        out = tmp_path / "made" / "here"
        assert dev_issue("--dir", dev_dir, "--spiffe-id", "spiffe://td/w", "--out", out).returncode == 0
        server = tmp_path / "server"
        result = dev_issue("--dir", dev_dir, "--server", "--dns-name", "a.test", "--ip", "::1", "--out", server)
        assert result.returncode == 0, result.stderr
        assert out.stat().st_mode & 0o777 == 0o700
        expected = {
            out / "client.pem": (["spiffe://td/w"], ExtendedKeyUsageOID.CLIENT_AUTH),
            server / "server.pem": (["a.test", "::1"], ExtendedKeyUsageOID.SERVER_AUTH),
        }
        for path, (names, usage) in expected.items():
            cert = certificate(path)
            cert.verify_directly_issued_by(ca)
            assert sans(cert) == names
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            assert list(usages) == [usage]
            assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            assert cert.not_valid_after_utc <= ca.not_valid_after_utc
            key = path.with_name(path.stem + "-key.pem")
            assert key.stat().st_mode & 0o777 == 0o600
        assert sorted(p.name for p in out.iterdir()) == ["client-key.pem", "client.pem"]  # no temporary file left

    def test_never_overwrites_unasked(self, dev_dir: Path, tmp_path: Path) -> None:
        """A second issue into the same folder is refused and changes nothing; --force replaces, and says so."""
        args = ("--dir", dev_dir, "--dns-name", "svc.internal", "--out", tmp_path)
        assert dev_issue(*args).returncode == 0
        before = {p: p.read_bytes() for p in (tmp_path / "client.pem", tmp_path / "client-key.pem")}
        result = dev_issue(*args)
        assert result.returncode == 2
        assert result.stderr == (
            f"synctoken dev issue: {tmp_path / 'client.pem'} exists: choose another --out, or add --force to replace it\n"
        )
        assert {p: p.read_bytes() for p in before} == before
        (tmp_path / "client.pem").unlink()  # the key alone is still refused
        assert "client-key.pem exists" in dev_issue(*args).stderr
        forced = dev_issue(*args, "--force")
        assert forced.returncode == 0, forced.stderr
        assert f"{tmp_path / 'client-key.pem'} (readable by you alone) (replaced)\n" in forced.stderr
        assert f"{tmp_path / 'client.pem'}\n" in forced.stderr
        assert (tmp_path / "client-key.pem").read_bytes() != before[tmp_path / "client-key.pem"]
        assert (tmp_path / "client-key.pem").stat().st_mode & 0o777 == 0o600

    def test_a_second_ca(self, dev_dir: Path, tmp_path: Path) -> None:
        """--ca makes a new CA; --ca-dir issues from it, and `dev --dir D issue` from D's."""
        result = dev_issue("--ca", "--out", tmp_path / "ca2")
        assert result.returncode == 0, result.stderr
        ca2 = certificate(tmp_path / "ca2" / "ca.pem")
        dev_ca = certificate(dev_dir / devenv.CA_FILE)
        assert ca2.subject != dev_ca.subject  # two CAs in one client_ca_file must not share a name
        assert (tmp_path / "ca2" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
        args = ("--spiffe-id", "spiffe://synctoken.test/dev/backend")
        assert dev_issue("--dir", dev_dir, "--ca-dir", tmp_path / "ca2", *args, "--out", tmp_path / "n").returncode == 0
        certificate(tmp_path / "n" / "client.pem").verify_directly_issued_by(ca2)
        with pytest.raises(ValueError, match="does not match"):
            certificate(tmp_path / "n" / "client.pem").verify_directly_issued_by(dev_ca)
        result = subprocess.run(
            [SYNCTOKEN, "dev", "--dir", str(dev_dir), "issue", *args, "--out", str(tmp_path / "d")],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        certificate(tmp_path / "d" / "client.pem").verify_directly_issued_by(dev_ca)

    def test_leaves_end_with_their_ca(self, tmp_path: Path) -> None:
        """A certificate from a CA with two days left ends with it; an expired CA issues nothing."""
        for name, days in (("short", 2), ("expired", 0)):
            ca = CertificateAuthority(f"{name} CA", days=days)
            (tmp_path / name).mkdir()
            KeyPair(ca.cert_pem, ca.key_pem).write(tmp_path / name / "ca.pem", tmp_path / name / "ca-key.pem")
        assert dev_issue("--ca-dir", tmp_path / "short", "--dns-name", "a", "--out", tmp_path / "a").returncode == 0
        assert (
            certificate(tmp_path / "a" / "client.pem").not_valid_after_utc
            == certificate(tmp_path / "short" / "ca.pem").not_valid_after_utc
        )
        result = dev_issue("--ca-dir", tmp_path / "expired", "--dns-name", "a", "--out", tmp_path / "b")
        assert result.returncode == 2
        assert result.stderr.startswith(f"synctoken dev issue: the CA in {tmp_path / 'expired'} expired at ")
        assert not (tmp_path / "b").exists()

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            *(
                (("--spiffe-id", bad), f"--spiffe-id: {bad!r} is not a SPIFFE ID ({SPIFFE_ID_FORM})")
                for bad in (
                    "spiffe://Example.org/w",  # the trust domain in upper case
                    "SPIFFE://example.org/w",
                    "spiffe://example.org/w/",  # a trailing slash
                    "spiffe://example.org/a/../b",
                    "spiffe://example.org//w",
                    "spiffe://example.org:8443/w",
                    "spiffe://example.org/w?x=1",
                    "spiffe://example.org/%41",
                    "https://example.org/w",
                    "spiffe://example.org/w\n",
                )
            ),
            (
                ("--spiffe-id", "spiffe://example.org"),
                "--spiffe-id 'spiffe://example.org' names a trust domain, not a workload (it has no path)",
            ),
            (
                ("--dns-name", "Svc.internal"),
                "--dns-name 'Svc.internal' is not a lower-case DNS host name (e.g. svc.internal)",
            ),
            (
                ("--dns-name", "a", "--dns-name", "b"),
                "a client certificate takes one --dns-name: the server reads exactly one",
            ),
            (
                ("--dns-name", "a", "--ip", "127.0.0.1"),
                "--ip is for --server: a client is named by --spiffe-id or --dns-name",
            ),
            (("--server", "--ip", "localhost"), "--ip 'localhost' is not an IP address"),
            (("--server",), "--server needs --dns-name (or --ip): the names clients connect to"),
            (
                ("--server", "--spiffe-id", "spiffe://td/w", "--dns-name", "a"),
                "--server takes --dns-name and --ip, the names clients connect to, not --spiffe-id",
            ),
            (
                ("--ca", "--dns-name", "a"),
                "--ca makes a CA, which names no workload: drop --spiffe-id, --dns-name and --ip",
            ),
            (("--ca", "--ca-dir", "."), "--ca makes a self-signed CA: --ca-dir does not apply"),
            ((), "say what to issue: --spiffe-id ID or --dns-name NAME (a client), --server --dns-name NAME, or --ca"),
        ],
    )
    def test_bad_requests_exit_2(self, dev_dir: Path, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
        """Each bad request is one line naming the flag, exit 2, and nothing written."""
        result = dev_issue("--dir", dev_dir, *args, "--out", tmp_path / "out")
        assert (result.returncode, result.stderr, result.stdout) == (2, f"synctoken dev issue: {message}\n", "")
        assert not (tmp_path / "out").exists()

    def test_port_is_not_ignored(self, dev_dir: Path, tmp_path: Path) -> None:
        """`dev --port N issue` is refused rather than silently ignoring the port."""
        result = subprocess.run(
            [SYNCTOKEN, "dev", "--dir", str(dev_dir), "--port", "50052", "issue", "--dns-name", "a", "--out", "out"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=tmp_path,
        )
        message = "synctoken dev issue: --port is for serving (synctoken dev --port N): issue serves nothing\n"
        assert (result.returncode, result.stderr) == (2, message)
        assert not (tmp_path / "out").exists()

    def test_missing_ca(self, tmp_path: Path) -> None:
        """No dev folder, or one made before dev kept its CA key: exit 2 saying what to run; dev then remakes it."""
        result = dev_issue("--dns-name", "a", "--out", "out", cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr == (
            "synctoken dev issue: no CA in .synctoken-dev: .synctoken-dev/ca.pem does not exist. Run `synctoken dev` "
            "once to make the dev CA there, or give --ca-dir a folder that `synctoken dev issue --ca` wrote\n"
        )
        old = devenv.prepare(tmp_path / ".synctoken-dev", 0, environ={}).directory
        (old / devenv.CA_KEY).unlink()  # as an older synctoken dev left it
        result = dev_issue("--dns-name", "a", "--out", "out", cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr == (
            "synctoken dev issue: .synctoken-dev has ca.pem but not the CA's key, ca-key.pem: it was made before "
            "`synctoken dev` kept it. Run `synctoken dev` once to remake the dev PKI\n"
        )
        assert not (tmp_path / "out").exists()
        ca = (old / devenv.CA_FILE).read_bytes()
        devenv.prepare(old, 0, environ={})
        assert (old / devenv.CA_FILE).read_bytes() != ca
        assert dev_issue("--dns-name", "a", "--out", "out", cwd=tmp_path).returncode == 0

    def test_unusable_ca(self, dev_dir: Path, tmp_path: Path) -> None:
        """A CA key that does not match its certificate, or a leaf in place of the CA, is refused by name."""
        other = CertificateAuthority("other")
        (tmp_path / "mismatch").mkdir()
        KeyPair((dev_dir / "ca.pem").read_bytes(), other.key_pem).write(
            tmp_path / "mismatch" / "ca.pem", tmp_path / "mismatch" / "ca-key.pem"
        )
        (tmp_path / "leaf").mkdir()
        leaf = other.issue(LeafSpec("leaf"))
        leaf.write(tmp_path / "leaf" / "ca.pem", tmp_path / "leaf" / "ca-key.pem")
        for name, why in (
            ("mismatch", "the key does not match the certificate"),
            ("leaf", "the certificate is not a CA's (no CA:TRUE)"),
        ):
            result = dev_issue("--ca-dir", tmp_path / name, "--dns-name", "a", "--out", tmp_path / "out")
            assert result.returncode == 2
            assert result.stderr == (
                f"synctoken dev issue: cannot use the CA in {tmp_path / name} (ca.pem, ca-key.pem): {why}\n"
            )
            assert "PRIVATE KEY" not in result.stderr


def _has_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open (Linux's /proc)."""
    descriptors = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        return any(fd.readlink() == path for fd in descriptors.iterdir())
    return False
