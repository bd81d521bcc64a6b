"""Several synctoken replicas and an HAProxy in front of them, all real processes on loopback, for the replica tests.

Every replica is a `synctoken serve` process with its own config and log
folder; HAProxy runs deploy/haproxy/haproxy.cfg itself, its addresses and files
given by environment variables. Everything takes a free port and is stopped by
its PID. What every replica's config shares beyond the suite's (a limits
backend, say) is `Topology(extra_config=...)`.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from support.calls import Outcome
from support.configs import config_text
from support.constants import TRUST_DOMAIN
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import START_TIMEOUT, Process, free_port, serve
from synctoken.client import SynctokenError, TokenClient
from synctoken_server.audit.record import EVENT_TOKEN_DECISION
from synctoken_server.dev.pki import LeafSpec

HAPROXY = "/usr/sbin/haproxy"
HAPROXY_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
BACKEND = "synctoken_replicas"
"""The backend's name in haproxy.cfg."""
HAPROXY_SOURCE = "127.0.0.2"
"""The address HAProxy connects to the replicas from: any loopback address but the clients' 127.0.0.1, so a
replica's `peer` tells HAProxy from a client."""
HAPROXY_CHECK_ID = f"spiffe://{TRUST_DOMAIN}/ns/lb/sa/haproxy"
SERVER_NAME = "localhost"
"""The name on the suite's server certificate, which every replica presents (a name to check, never to connect to)."""


@dataclass
class Replica:
    """One `synctoken serve` process and its port."""

    name: str
    port: int
    process: Process

    @property
    def address(self) -> str:
        """host:port of its listener."""
        return f"127.0.0.1:{self.port}"

    def decisions(self) -> list[dict[str, Any]]:
        """Its audit records so far."""
        return [r for r in self.process.records() if r["event"] == EVENT_TOKEN_DECISION]


class HAProxy:
    """deploy/haproxy/haproxy.cfg, run in the foreground on a free port in front of `replicas`."""

    def __init__(self, pki: Pki, directory: Path, watch: LeakWatch, replicas: list[Replica]) -> None:
        directory.mkdir()
        check_pair = pki.ca.issue(LeafSpec("haproxy health check", uris=(HAPROXY_CHECK_ID,)))
        check_pem = directory / "check.pem"
        check_pem.touch(mode=0o600)
        check_pem.write_bytes(check_pair.cert_pem + check_pair.key_pem)
        self.port = free_port()
        self.stats_socket = directory / "stats.sock"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SYNCTOKEN_LB_BIND": f"127.0.0.1:{self.port}",
            "SYNCTOKEN_LB_STATS_SOCKET": str(self.stats_socket),
            "SYNCTOKEN_LB_SOURCE": HAPROXY_SOURCE,
            "SYNCTOKEN_LB_CHECK_CERT": str(check_pem),
            "SYNCTOKEN_LB_CA_FILE": str(pki.directory / "ca.pem"),
            "SYNCTOKEN_LB_SERVER_NAME": SERVER_NAME,
        } | {f"SYNCTOKEN_REPLICA_{i}": r.address for i, r in enumerate(replicas, start=1)}
        self.log_path = directory / "haproxy.log"
        watch.log_files.append(self.log_path)
        with self.log_path.open("w") as log:
            # -db: stay in the foreground, one process, so that its PID is the one to stop.
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(HAPROXY_CONFIG)], stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def command(self, line: str) -> str:
        """One command on the stats socket (a runtime API command); its whole answer."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def statuses(self) -> dict[str, str]:
        """Each replica's status as HAProxy's `show stat` says it: "UP", "DOWN", "UP 1/2" (going down), ..."""
        text = self.command("show stat").lstrip("# ")
        return {
            row["svname"]: row["status"]
            for row in csv.DictReader(text.splitlines())
            if row["pxname"] == BACKEND and row["svname"] not in {"FRONTEND", "BACKEND"}
        }

    def wait_for(self, server: str, status: str, timeout: float = START_TIMEOUT) -> float:
        """Poll until `server`'s status is `status`; return when it was first seen (time.monotonic())."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                if self.statuses().get(server) == status:
                    return time.monotonic()
            except OSError:  # the socket is not there yet
                pass
            time.sleep(0.02)
        raise AssertionError(f"{server} not {status} within {timeout}s: {self.statuses()}")

    def stop(self) -> None:
        """Stop it by its PID (SIGTERM: HAProxy's immediate stop)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Topology:
    """`count` replicas with the suite's config (plus `extra_config`), and, if asked, an HAProxy in front of them."""

    def __init__(
        self,
        pki: Pki,
        directory: Path,
        watch: LeakWatch,
        processes: list[Process],
        count: int = 3,
        extra_config: str = "",
    ) -> None:
        self.pki = pki
        self.directory = directory
        self.watch = watch
        self.processes = processes
        self.count = count
        self.extra_config = extra_config
        self.replicas: list[Replica] = []
        self.haproxy: HAProxy | None = None

    def start(self, *, haproxy: bool = False) -> Topology:
        """Start every replica (waiting until each serves), then HAProxy (waiting until it sees each one up)."""
        for i in range(1, self.count + 1):
            name = f"replica{i}"
            port = free_port()
            folder = self.directory / name
            folder.mkdir()
            text = config_text(self.pki, listen=f"127.0.0.1:{port}") + self.extra_config
            self.replicas.append(Replica(name, port, serve(text, folder, self.watch, self.processes)))
        if haproxy:
            self.haproxy = HAProxy(self.pki, self.directory / "haproxy", self.watch, self.replicas)
            for replica in self.replicas:
                self.haproxy.wait_for(replica.name, "UP")
        return self

    def stop(self) -> None:
        """Stop HAProxy and every replica still running, each by its PID."""
        if self.haproxy is not None:
            self.haproxy.stop()
        for replica in self.replicas:
            if replica.process.proc.poll() is None:
                replica.process.proc.kill()
                replica.process.proc.wait()

    @property
    def balancer(self) -> HAProxy:
        """The HAProxy in front (the topology must have been started with one)."""
        assert self.haproxy is not None, "started without haproxy"
        return self.haproxy

    def direct_target(self) -> str:
        """A gRPC target listing every replica, for a client that balances itself."""
        return "ipv4:" + ",".join(r.address for r in self.replicas)

    def client(self, target: str, cert: str = "bff") -> TokenClient:
        """A TokenClient with the suite's certificate `cert`, checking the replicas' certificate name."""
        cert_file, key_file = self.pki.files(cert)
        return TokenClient(
            target,
            ca_file=self.pki.directory / "ca.pem",
            cert_file=cert_file,
            key_file=key_file,
            server_name=SERVER_NAME,
        )

    def decisions(self) -> dict[str, int]:
        """How many audit records each replica has written."""
        return {r.name: len(r.decisions()) for r in self.replicas}


class ClientLoad:
    """Threads calling IssueToken through TokenClients, back to back, until told to stop.

    Each client is its own channel; `threads` threads share each one.
    """

    def __init__(self, clients: list[TokenClient], watch: LeakWatch, threads: int = 2) -> None:
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch = watch
        self._threads = [
            threading.Thread(target=self._run, args=(client,), daemon=True)
            for client in clients
            for _ in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, client: TokenClient) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                token = client.issue_token("alice").token
                self._watch.tokens.add(token)
                outcome = Outcome(sent, grpc.StatusCode.OK, token)
            except SynctokenError as exc:
                outcome = Outcome(sent, exc.code)
            with self._lock:
                self.outcomes.append(outcome)

    def wait_for(self, calls: int) -> None:
        """Wait until at least `calls` more calls have ended."""
        target = len(self.outcomes) + calls
        deadline = time.monotonic() + START_TIMEOUT
        while len(self.outcomes) < target:
            assert time.monotonic() < deadline, f"fewer than {calls} calls in {START_TIMEOUT}s"
            time.sleep(0.02)

    def stop(self) -> list[Outcome]:
        """Stop calling, wait for the last calls, and return every outcome."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        return self.outcomes
