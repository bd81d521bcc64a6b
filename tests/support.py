"""Test support: the suite's constants, PKI, configs, in-process servers, clients and log capture."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from google.rpc.error_details_pb2 import BadRequest, ErrorInfo
from grpc_status import rpc_status

from synctoken.v1 import token_service_pb2, token_service_pb2_grpc
from synctoken_server.audit import logs
from synctoken_server.audit.linesink import LineSink
from synctoken_server.audit.record import AuditLog
from synctoken_server.config.schema import Config, load_config
from synctoken_server.dev.pki import CertificateAuthority, KeyPair
from synctoken_server.policy.limits import MAX_BUCKETS
from synctoken_server.policy.rules import Grant
from synctoken_server.process.server import TokenServer
from synctoken_server.tokens.minting import Minter, TokenTimes

TRUST_DOMAIN = "example.org"
ACCOUNT_SID = "AC" + "1" * 32
API_KEY_SID = "SK" + "2" * 32
API_SECRET = "s3cr3t-" + "x" * 25  # distinctive, so a leak is easy to grep for
SERVICE_A = "IS" + "a" * 32
SERVICE_B = "IS" + "b" * 32
SERVICE_C = "IS" + "c" * 32

BFF_ID = f"spiffe://{TRUST_DOMAIN}/ns/web/sa/bff"
CHAT_WORKER_ID = f"spiffe://{TRUST_DOMAIN}/ns/chat/sa/worker"
CHAT_ADMIN_ID = f"spiffe://{TRUST_DOMAIN}/ns/chat/sa/admin"
STRANGER_ID = f"spiffe://{TRUST_DOMAIN}/ns/other/sa/stranger"
DNS_CALLER = "billing.internal.example.com"

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
SYNCTOKEN = str(Path(sys.executable).parent / "synctoken")

POLICY_TOML = f"""
[defaults]
default_ttl = "1h"
max_ttl = "4h"

[[callers]]
id = "{BFF_ID}"
sync_services = ["{SERVICE_A}", "{SERVICE_B}"]
default_sync_service = "{SERVICE_A}"
allowed_identity_characters = "@"

[[callers]]
id = "spiffe://{TRUST_DOMAIN}/ns/chat/*"
sync_services = ["{SERVICE_B}"]
identity_pattern = "user-[0-9]+"
default_ttl = "10m"
max_ttl = "30m"

[[callers]]
id = "{CHAT_ADMIN_ID}"
sync_services = ["{SERVICE_B}", "{SERVICE_C}"]
default_sync_service = "{SERVICE_C}"
max_ttl = "24h"
"""


@dataclass
class Pki:
    """The suite's certificates; bad ones are named after their defect."""

    ca: CertificateAuthority
    directory: Path
    server: KeyPair
    clients: dict[str, KeyPair]

    def credentials(self, client: str | None) -> grpc.ChannelCredentials:
        """Channel credentials trusting our CA, presenting `client`'s certificate (or none)."""
        if client is None:
            return grpc.ssl_channel_credentials(root_certificates=self.ca.cert_pem)
        pair = self.clients[client]
        return grpc.ssl_channel_credentials(self.ca.cert_pem, pair.key_pem, pair.cert_pem)

    def files(self, client: str) -> tuple[Path, Path]:
        """Paths of `client`'s certificate and key, for grpcurl."""
        return self.directory / f"{client}.pem", self.directory / f"{client}-key.pem"


def config_text(
    pki: Pki, *, identity: str | None = None, policy: str = POLICY_TOML, listen: str = "127.0.0.1:0"
) -> str:
    """A complete config for the suite's PKI; the secret comes from TWILIO_API_SECRET."""
    identity_table = identity or f'[identity]\nsource = "spiffe"\ntrust_domains = ["{TRUST_DOMAIN}"]\n'
    d = pki.directory
    return f"""
[server]
listen = "{listen}"

[tls]
cert_file = "{d / "server.pem"}"
key_file = "{d / "server-key.pem"}"
client_ca_file = "{d / "ca.pem"}"

{identity_table}

[twilio]
account_sid = "{ACCOUNT_SID}"
api_key = "{API_KEY_SID}"

{policy}
"""


SECRET_ENV = {"TWILIO_API_SECRET": API_SECRET}


class LogSink(io.RawIOBase):
    """Where every in-process server's log lines go: kept in memory for assertions and the leak check."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def write(self, data: bytes) -> int:  # type: ignore[override]
        with self._lock:
            self.lines.extend(line for line in data.decode("utf-8").splitlines() if line)
        return len(data)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def records(self, start: int = 0) -> list[dict[str, Any]]:
        """The JSON records written since line `start`."""
        with self._lock:
            return [json.loads(line) for line in self.lines[start:]]


@dataclass
class LeakWatch:
    """What must never appear in any log: filled in as the suite runs."""

    secrets: set[str] = field(default_factory=lambda: {API_SECRET, "PRIVATE KEY"})
    tokens: set[str] = field(default_factory=set)
    log_files: list[Path] = field(default_factory=list)


class RunningServer:
    """A real TokenServer on 127.0.0.1, its asyncio loop in a background thread."""

    def __init__(self, config: Config, audit_log: AuditLog | None = None, max_buckets: int = MAX_BUCKETS) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()
        self._server = self._call(self._start(config, audit_log, max_buckets))
        self.port = self._server.port

    async def _start(self, config: Config, audit_log: AuditLog | None, max_buckets: int) -> TokenServer:
        server = TokenServer(config, audit_log, max_buckets=max_buckets)
        await server.start()
        return server

    @property
    def buckets(self) -> int:
        """How many rate-limit buckets the server holds."""
        return len(self._server.limiter)

    @property
    def token_server(self) -> TokenServer:
        """The server itself, for what a test reads of it (its metrics, its limiters)."""
        server: TokenServer = self._server
        return server

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def close(self) -> None:
        """Stop the server and its loop; a second call does nothing."""
        if self._loop.is_closed():
            return
        self._call(self._server.stop(drain_delay=0, grace=1))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@dataclass
class Client:
    """A TokenService stub over a real mTLS channel, recording every token it receives."""

    stub: token_service_pb2_grpc.TokenServiceStub
    channel: grpc.Channel
    watch: LeakWatch

    def issue(self, request: token_service_pb2.IssueTokenRequest) -> token_service_pb2.IssueTokenResponse:
        """Call IssueToken; remember the token for the session's leak check."""
        response = self.stub.IssueToken(request, timeout=10)
        if response.token:
            self.watch.tokens.add(response.token)
        return response

    def whoami(self) -> token_service_pb2.GetCallerIdentityResponse:
        """Call GetCallerIdentity."""
        return self.stub.GetCallerIdentity(token_service_pb2.GetCallerIdentityRequest(), timeout=10)


@dataclass
class ServerHarness:
    """Starts servers and opens clients to them; closes everything at teardown."""

    pki: Pki
    watch: LeakWatch
    write_config: Callable[[str], Path]
    _servers: list[RunningServer] = field(default_factory=list)
    _channels: list[grpc.Channel] = field(default_factory=list)

    def start(
        self, text: str | None = None, audit_log: AuditLog | None = None, max_buckets: int = MAX_BUCKETS, **kwargs: str
    ) -> RunningServer:
        """Start a server with `text` as its config (default: the suite's policy)."""
        config = load_config(self.write_config(text or config_text(self.pki, **kwargs)), environ=SECRET_ENV)
        return self.start_config(config, audit_log, max_buckets)

    def start_config(
        self, config: Config, audit_log: AuditLog | None = None, max_buckets: int = MAX_BUCKETS
    ) -> RunningServer:
        """Start a server from an already loaded config (and at most `max_buckets` rate-limit buckets)."""
        server = RunningServer(config, audit_log, max_buckets)
        self._servers.append(server)
        return server

    def client(self, server: RunningServer, cert: str | None) -> Client:
        """A client presenting the named certificate (None: no certificate)."""
        channel = grpc.secure_channel(
            f"localhost:{server.port}",
            self.pki.credentials(cert),
            options=[("grpc.max_reconnect_backoff_ms", 1000)],
        )
        self._channels.append(channel)
        return Client(token_service_pb2_grpc.TokenServiceStub(channel), channel, self.watch)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        for server in self._servers:
            server.close()


def break_signing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every mint in this process fail, as a fault nobody planned for would (a ValueError)."""

    def fail(_self: Minter, _grant: Grant, _times: TokenTimes) -> str:
        raise ValueError("signing failed")

    monkeypatch.setattr(Minter, "mint", fail)


def rpc_error(call: Callable[[], object]) -> tuple[grpc.RpcError, ErrorInfo, BadRequest | None]:
    """Run a call that must fail; return the error, its ErrorInfo and its BadRequest (if any)."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    info = ErrorInfo()
    bad_request = None
    for detail in status.details:
        if detail.Is(ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(BadRequest.DESCRIPTOR):
            bad_request = BadRequest()
            detail.Unpack(bad_request)
    assert info.domain == "synctoken.v1"
    return error, info, bad_request


START_TIMEOUT = 30

_WITH_LIMITS = """
import ast, os, resource, sys
for which, limit in ast.literal_eval(sys.argv[1]).items():
    soft, hard = limit if isinstance(limit, tuple) else (limit, resource.getrlimit(which)[1])
    resource.setrlimit(which, (soft, hard))
os.execv(sys.argv[2], sys.argv[2:])
"""


class Process:
    """A synctoken subprocess whose stdout (the JSON log) goes to a file the leak check reads."""

    def __init__(
        self,
        args: list[str],
        log_dir: Path,
        watch: LeakWatch,
        env: dict[str, str] | None = None,
        limits: Mapping[int, int | tuple[int, int]] | None = None,
    ) -> None:
        """`limits`: rlimits to start with, each a soft limit or (soft, hard) (synctoken raises soft to hard)."""
        self.stdout_path = log_dir / "stdout.jsonl"
        self.stderr_path = log_dir / "stderr.txt"
        watch.log_files += [self.stdout_path, self.stderr_path]
        command = [SYNCTOKEN, *args]
        if limits:
            # A launcher lowers the limits, then execs synctoken: preexec_fn is unsafe in this threaded process.
            command = [sys.executable, "-c", _WITH_LIMITS, repr(limits), *command]
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


ALICE = token_service_pb2.IssueTokenRequest(identity="alice", sync=token_service_pb2.SyncGrant())


def channel(pki: Pki, port: int, cert: str = "bff", root: bytes | None = None) -> grpc.Channel:
    """A channel with its own connection (not shared with other channels in this process)."""
    pair = pki.clients[cert]
    credentials = grpc.ssl_channel_credentials(root or pki.ca.cert_pem, pair.key_pem, pair.cert_pem)
    return grpc.secure_channel(f"localhost:{port}", credentials, options=[("grpc.use_local_subchannel_pool", 1)])


@dataclass(frozen=True)
class Outcome:
    """One call: when it was sent, how it ended, and the token it got (or "")."""

    sent: float
    code: grpc.StatusCode
    token: str = ""


class SteadyLoad:
    """Clients sending IssueToken back to back until told to stop (at most `limit` calls each).

    `connections` clients each keep one connection; `fresh` clients open a
    new connection (a new TLS handshake) for every call.
    """

    def __init__(
        self,
        pki: Pki,
        port: int,
        watch: LeakWatch,
        connections: int = 4,
        limit: int = 5000,
        fresh: int = 0,
    ) -> None:
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch = watch
        self._channels = [channel(pki, port) for _ in range(connections)]
        self._threads = [threading.Thread(target=self._run, args=(c, limit), daemon=True) for c in self._channels]
        self._threads += [
            threading.Thread(target=self._run_fresh, args=(pki, port, limit), daemon=True) for _ in range(fresh)
        ]
        for thread in self._threads:
            thread.start()

    def _call(self, ch: grpc.Channel) -> None:
        sent = time.monotonic()
        try:
            token = token_service_pb2_grpc.TokenServiceStub(ch).IssueToken(ALICE, timeout=10).token
            self._watch.tokens.add(token)
            outcome = Outcome(sent, grpc.StatusCode.OK, token)
        except grpc.RpcError as exc:
            outcome = Outcome(sent, exc.code())
        with self._lock:
            self.outcomes.append(outcome)

    def _run(self, ch: grpc.Channel, limit: int) -> None:
        for _ in range(limit):
            if self._stop.is_set():
                return
            self._call(ch)

    def _run_fresh(self, pki: Pki, port: int, limit: int) -> None:
        for _ in range(limit):
            if self._stop.is_set():
                return
            with channel(pki, port) as ch:
                self._call(ch)

    def wait_for(self, calls: int) -> None:
        """Wait until at least `calls` more calls have ended."""
        target = len(self.outcomes) + calls
        deadline = time.monotonic() + START_TIMEOUT
        while len(self.outcomes) < target:
            assert time.monotonic() < deadline, f"fewer than {calls} calls in {START_TIMEOUT}s"
            time.sleep(0.02)

    def stop(self) -> list[Outcome]:
        """Stop sending, wait for the last calls, and return every outcome."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        for ch in self._channels:
            ch.close()
        return self.outcomes


def replace_file(path: Path, data: bytes) -> None:
    """Replace `path` whole, as cert-manager and most deploy tools do: a temp file beside it, then os.replace."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    temp.chmod(0o600)
    temp.replace(path)


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Rewrite `path` in place (truncate, then write): readers may see it empty or half-written meanwhile."""
    with path.open("r+b") as f:
        f.truncate(0)
        f.write(data)


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


def chain_logger(sink: LineSink, worker: int | None = None) -> Any:
    """A strict logger over `sink` on structlog's JSON chain, as logs.configure sets up every logger but the audit's."""
    return structlog.wrap_logger(
        logs.LineLogger(sink, strict=True),
        processors=[*logs.shared_processors(worker), logs.json_renderer()],
    )
