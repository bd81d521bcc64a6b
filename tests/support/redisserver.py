"""A real redis-server for the global rate limits' tests: on a free loopback port, no persistence, stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from support.processes import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT = 10.0


@dataclass(frozen=True)
class RedisTls:
    """What a redis-server serves TLS with; `ca_file` also verifies client certificates when `clients` is set."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    client_cert: Path | None = None
    """With `client_key`: require a client certificate signed by `ca_file`, and look with this one."""
    client_key: Path | None = None


class RedisServer:
    """One redis-server process; restartable on the same port, pausable with SIGSTOP."""

    def __init__(
        self, directory: Path, password: str | None = None, tls: RedisTls | None = None, *, unix: bool = False
    ) -> None:
        """`unix`: listen on `directory`/redis.sock only, not on TCP."""
        if not Path(REDIS_SERVER).exists():
            pytest.fail("redis-server is not installed: `make /usr/bin/redis-server` (Debian's redis-server)")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.tls = tls
        self.socket_path = directory / "redis.sock" if unix else None
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """The URL a config names it by (never with the password)."""
        if self.socket_path is not None:
            return f"unix://{self.socket_path}?db=0"
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        # No snapshot, no append-only file: every start is empty, and nothing is left behind.
        command = [REDIS_SERVER, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")]
        if self.password is not None:
            command += ["--requirepass", self.password]
        if self.socket_path is not None:
            return [*command, "--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.tls is None:
            return [*command, "--port", str(self.port)]
        tls = self.tls
        command += ["--port", "0", "--tls-port", str(self.port)]
        command += ["--tls-cert-file", str(tls.cert_file), "--tls-key-file", str(tls.key_file)]
        command += ["--tls-ca-cert-file", str(tls.ca_file), "--tls-auth-clients", "yes" if tls.client_cert else "no"]
        return command

    def start(self) -> None:
        """Start it (again, on the same port) and wait until it answers."""
        self.proc = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self._accepts_unix_connections()
                with self.client() as client:
                    client.ping()
            except (redis.ConnectionError, OSError):
                if self.proc.poll() is not None:
                    stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    log = (self.directory / "redis.log").read_text(errors="replace")
                    pytest.fail(f"redis-server exited {self.proc.returncode}: {stderr} {log[-2000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not answer within {START_TIMEOUT}s")
                time.sleep(0.02)
            else:
                return

    def _accepts_unix_connections(self) -> None:
        """On a unix socket, raise OSError until it accepts: redis-py 5.0.1 leaks the socket of a failed connect."""
        if self.socket_path is not None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(str(self.socket_path))

    def client(self) -> redis.Redis:
        """A plain client for looking at what the server holds."""
        kwargs: dict[str, object] = {"socket_timeout": 2, "socket_connect_timeout": 2, "password": self.password}
        if self.socket_path is not None:
            return redis.Redis(unix_socket_path=str(self.socket_path), **kwargs)  # type: ignore[arg-type]
        if self.tls is not None:
            kwargs |= {"ssl": True, "ssl_ca_certs": str(self.tls.ca_file)}
            if self.tls.client_cert and self.tls.client_key:
                kwargs |= {"ssl_certfile": str(self.tls.client_cert), "ssl_keyfile": str(self.tls.client_key)}
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)  # type: ignore[arg-type]

    def signal(self, signum: signal.Signals) -> None:
        """Send `signum` to the process, by its PID."""
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def pause(self) -> None:
        """SIGSTOP: it keeps its socket and answers nothing (a hung Redis)."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, and wait: its port is closed, its data gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGCONT)  # a stopped process dies of SIGKILL too, but let it close cleanly in logs
        self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()

    def keys(self) -> list[str]:
        """Every key it holds (SCAN, not KEYS)."""
        return sorted(key.decode() for key in self.client().scan_iter(count=1000))
