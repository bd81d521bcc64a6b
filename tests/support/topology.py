"""Several synctoken replicas and an HAProxy in front of them, all real processes on loopback, for the replica tests.

Every replica is a `synctoken serve` process with its own config and log
folder; HAProxy runs deploy/haproxy/haproxy.cfg itself, its addresses and files
given by environment variables. Everything takes a free port and is stopped by
its PID. What every replica's config shares beyond the suite's is
`Topology(setup=Setup(...))`: a policy, a Redis for the limits (started
first, and named in every replica's `[limits]`), a metrics listener each.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from support.calls import Load, Outcome
from support.configs import POLICY_TOML, config_text
from support.constants import TRUST_DOMAIN
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import START_TIMEOUT, Process, free_port, serve
from support.redisserver import RedisServer
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
    metrics_port: int | None = None

    @property
    def address(self) -> str:
        """host:port of its listener."""
        return f"127.0.0.1:{self.port}"

    def decisions(self) -> list[dict[str, Any]]:
        """Its audit records so far."""
        return [r for r in self.process.records() if r["event"] == EVENT_TOKEN_DECISION]

    def metric(self, name: str, **labels: str) -> float:
        """One sample from a scrape of its metrics listener (0 when the series does not exist yet).

        The listener answers with a render up to a second old (metrics.RENDER_REUSE_SECONDS): poll for a change.
        """
        assert self.metrics_port is not None, "started without metrics"
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0


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


@dataclass(frozen=True)
class Setup:
    """What every replica's config holds beyond the suite's, and what runs beside the replicas."""

    count: int = 3
    policy: str = POLICY_TOML
    extra_config: str = ""
    redis: bool = False
    """Start a redis-server first, and give every replica `[limits] backend = "redis"` with its URL."""
    limits_keys: str = ""
    """Lines for [limits] (with `redis` only)."""
    redis_keys: str = ""
    """Lines for [limits.redis] (with `redis` only)."""
    metrics: bool = False
    """A metrics listener on each replica, for `Replica.metric`."""


class Topology:
    """`setup.count` replicas with the suite's config (as `setup` says), and, if asked, an HAProxy in front of them."""

    def __init__(
        self, pki: Pki, directory: Path, watch: LeakWatch, processes: list[Process], setup: Setup | None = None
    ) -> None:
        self.pki = pki
        self.directory = directory
        self.watch = watch
        self.processes = processes
        self.setup = setup or Setup()
        self.redis: RedisServer | None = None
        self.replicas: list[Replica] = []
        self.haproxy: HAProxy | None = None

    def _config(self, port: int, metrics_port: int | None) -> str:
        setup = self.setup
        text = config_text(self.pki, listen=f"127.0.0.1:{port}", policy=setup.policy) + setup.extra_config
        if self.redis is not None:
            text += f'\n[limits]\nbackend = "redis"\n{setup.limits_keys}\n'
            text += f'\n[limits.redis]\nurl = "{self.redis.url}"\n{setup.redis_keys}\n'
        if metrics_port is not None:
            text += f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        return text

    def start(self, *, haproxy: bool = False) -> Topology:
        """Start Redis if asked (waiting until it answers), every replica (until each serves), then HAProxy.

        HAProxy is waited for until it sees each replica up.
        """
        if self.setup.redis:
            self.redis = RedisServer(self.directory / "redis")
        for i in range(1, self.setup.count + 1):
            name = f"replica{i}"
            port = free_port()
            metrics_port = free_port() if self.setup.metrics else None
            folder = self.directory / name
            folder.mkdir()
            process = serve(self._config(port, metrics_port), folder, self.watch, self.processes)
            self.replicas.append(Replica(name, port, process, metrics_port))
        if haproxy:
            self.haproxy = HAProxy(self.pki, self.directory / "haproxy", self.watch, self.replicas)
            for replica in self.replicas:
                self.haproxy.wait_for(replica.name, "UP")
        return self

    def stop(self) -> None:
        """Stop HAProxy, every replica still running and Redis, each by its PID."""
        if self.haproxy is not None:
            self.haproxy.stop()
        for replica in self.replicas:
            if replica.process.proc.poll() is None:
                replica.process.proc.kill()
                replica.process.proc.wait()
        if self.redis is not None:
            self.redis.kill()

    @property
    def shared(self) -> RedisServer:
        """The Redis the replicas share (the topology must have been started with one)."""
        assert self.redis is not None, "started without redis"
        return self.redis

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


class ClientLoad(Load):
    """Threads calling IssueToken through TokenClients, back to back, until told to stop.

    Each client is its own channel; `threads` threads share each one.
    """

    def __init__(
        self,
        clients: list[TokenClient],
        watch: LeakWatch,
        threads: int = 2,
        identity: Callable[[], str] = lambda: "alice",
    ) -> None:
        """`identity` names each call's identity (it is called from every thread)."""
        super().__init__(watch)
        self._identity = identity
        self._start(
            [
                threading.Thread(target=self._run, args=(client,), daemon=True)
                for client in clients
                for _ in range(threads)
            ]
        )

    def _run(self, client: TokenClient) -> None:
        while not self._stop.is_set():
            identity = self._identity()
            sent = time.monotonic()
            try:
                token = client.issue_token(identity).token
                self._record(Outcome(sent, grpc.StatusCode.OK, token, time.monotonic()))
            except SynctokenError as exc:
                self._record(Outcome(sent, exc.code, ended=time.monotonic()))
