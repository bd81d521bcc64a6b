"""The systems under test: how to start each one, know it is ready, load it, and stop it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.redisserver import RedisProcess
from synctoken.v1 import token_service_pb2 as pb
from synctoken_server.dev import devenv

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Workspace:
    """The throwaway PKI, credentials and config all systems share."""

    directory: Path
    config_path: Path
    env: dict[str, str]

    @classmethod
    def make(cls, directory: Path) -> Workspace:
        """Make a dev PKI and config (dev credentials) under `directory`."""
        dev = devenv.prepare(directory, free_port(), environ={})
        secret = (directory / devenv.SECRET_FILE).read_text().strip()
        env = {
            "TWILIO_ACCOUNT_SID": devenv.DEV_ACCOUNT_SID,
            "TWILIO_API_KEY": devenv.DEV_API_KEY_SID,
            "TWILIO_API_SECRET": secret,
            "TWILIO_SYNC_SERVICE_SID": devenv.DEV_SYNC_SERVICE_SID,
        }
        return cls(directory=directory, config_path=dev.config_path, env=env)

    def config_for_port(self, port: int) -> Path:
        """A dev config of its own for a server listening on `port`, beside the shared PKI."""
        return devenv.prepare(self.directory, port, environ={}, config_name=f"bench-{port}.toml").config_path


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class System:
    """One server under test. `kind` says how to load it: "grpc" or "http"."""

    name: str
    kind: str
    command: list[str]
    ready_text: str
    ready_count: int = 1
    env: dict[str, str] = field(default_factory=dict)
    grpc_method: str = ""
    grpc_payload: bytes = b""
    http_path: str = ""
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    start_timeout_s: float = START_TIMEOUT_S
    redis: RedisProcess | None = None
    """The Redis holding its global rate limits: started before it, stopped after it, its CPU counted apart."""

    def start(self, log_dir: Path) -> None:
        """Start the server (its Redis first, if it has one) and wait until it says it is ready."""
        if self.redis is not None:
            self.redis.start(log_dir)
        self.log_path = log_dir / f"{self.name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | self.env, cwd=ROOT
            )
        deadline = time.monotonic() + self.start_timeout_s
        while self.log_path.read_bytes().count(self.ready_text.encode()) < self.ready_count:
            if self.process.poll() is not None or time.monotonic() > deadline:
                msg = f"{self.name} did not start: {self.log_path.read_text(errors='replace')[-2000:]}"
                raise RuntimeError(msg)
            time.sleep(0.05)

    def processes(self) -> list[psutil.Process]:
        """The server's processes: the one started, and any workers it spawned."""
        if self.process is None:
            return []
        parent = psutil.Process(self.process.pid)
        return [parent, *parent.children(recursive=True)]

    def backend_processes(self) -> list[psutil.Process]:
        """The processes it depends on (its Redis), whose CPU is not the server's but is spent for it."""
        return [] if self.redis is None else self.redis.processes()

    def stop(self, signum: signal.Signals = signal.SIGTERM, timeout: float = 20) -> None:
        """Send `signum`, then wait up to `timeout` seconds; kill if it will not go. Then stop its Redis."""
        try:
            if self.process is None:
                return
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        finally:
            if self.redis is not None:
                self.redis.stop()


def issue_payload() -> bytes:
    """The IssueToken request every gRPC run sends: a default Sync grant for one user."""
    return pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant()).SerializeToString()


def synctoken(workspace: Workspace, workers: int) -> System:
    """Synctoken serve, with `workers` processes."""
    port = free_port()
    name = "synctoken" if workers == 1 else f"synctoken-{workers}w"
    return System(
        name=name,
        kind="grpc",
        command=[
            str(VENV_BIN / "synctoken"),
            "serve",
            "--config",
            str(workspace.config_for_port(port)),
            "--workers",
            str(workers),
        ],
        ready_text='"event":"server.started"',
        ready_count=workers,
        grpc_method="/synctoken.v1.TokenService/IssueToken",
        grpc_payload=issue_payload(),
        port=port,
    )


GUARDED_CALLER = """\
# Limits far above what the benchmark sends: every call is checked, none refused.
rate = 1000000
burst = 1000000
identity_rate = 1000000
identity_burst = 1000000
"""


def synctoken_guarded(workspace: Workspace) -> System:
    """Synctoken serve with a caller and an identity rate limit and the metrics listener on: their cost."""
    system = synctoken(workspace, 1)
    system.name = "synctoken-guarded"
    config = Path(system.command[system.command.index("--config") + 1])
    text = config.read_text(encoding="utf-8").replace("[[callers]]\n", f"[[callers]]\n{GUARDED_CALLER}", 1)
    config.write_text(f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n\n{text}', encoding="utf-8")
    return system


REDIS_LIMITS = """
[limits]
backend = "redis"
# A Redis that cannot answer refuses the call: a run that fell back to local buckets
# would measure those, and the refusal shows up as an error instead.
on_backend_failure = "deny"

[limits.redis]
url = "{url}"
# Room for a busy shared machine (and for valgrind, in bench.instructions): a late answer
# would be a refusal, not a measurement.
timeout = "5s"
"""


def synctoken_redis(workspace: Workspace, *, unbatched: bool = False) -> System:
    """Synctoken serve with the caller and identity limits global, in a loopback Redis the system starts itself.

    The limits are far above the load, as for synctoken-guarded: every call runs the Redis
    script and none is refused. Against plain synctoken, this is the cost of the Redis check.
    `unbatched`: `batch_window = "0ms"`, every check written at once (synctoken-redis-unbatched),
    beside the default window: what the window saves.
    """
    system = synctoken(workspace, 1)
    system.name = "synctoken-redis-unbatched" if unbatched else "synctoken-redis"
    system.redis = RedisProcess(free_port())
    config = Path(system.command[system.command.index("--config") + 1])
    text = config.read_text(encoding="utf-8").replace("[[callers]]\n", f"[[callers]]\n{GUARDED_CALLER}", 1)
    text += REDIS_LIMITS.format(url=system.redis.url)
    config.write_text(text + ('batch_window = "0ms"\n' if unbatched else ""), encoding="utf-8")
    return system


def synctoken_traced(workspace: Workspace, endpoint: str) -> System:
    """Synctoken serve with `[tracing] enabled`, every call sampled, spans exported over OTLP/gRPC to `endpoint`."""
    system = synctoken(workspace, 1)
    system.name = "synctoken-traced"
    config = Path(system.command[system.command.index("--config") + 1])
    config.write_text(config.read_text(encoding="utf-8") + "\n[tracing]\nenabled = true\n", encoding="utf-8")
    system.env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
        "OTEL_TRACES_SAMPLER": "always_on",
        # Export every 100 ms rather than every 5 s: the spans of the counted calls are exported while counting.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    return system


def empty_rpc(workspace: Workspace) -> System:
    """The empty RPC on the same stack: the ceiling."""
    port = free_port()
    return System(
        name="empty-rpc",
        kind="grpc",
        command=[
            sys.executable,
            "-m",
            "bench.empty_server",
            "--port",
            str(port),
            "--pki",
            str(workspace.directory),
        ],
        ready_text="listening on",
        grpc_method="/bench.Empty/Call",
        port=port,
    )


def express(workspace: Workspace, *, tuned: bool) -> System:
    """The Express /token route from Twilio's guide; `tuned` passes the secret as a KeyObject."""
    node = shutil.which("node")
    if node is None:
        msg = "node is not installed"
        raise RuntimeError(msg)
    port = free_port()
    return System(
        name="express-keyobject" if tuned else "express-guide",
        kind="http",
        command=[node, str(ROOT / "bench" / "express" / "app.js")],
        ready_text="listening on",
        env=workspace.env | {"PORT": str(port), "TUNED": "1" if tuned else "0", "NODE_ENV": "production"},
        http_path="/token?identity=alice",
        port=port,
    )


def check_express_token(system: System) -> None:
    """One plain request, so a broken route fails loudly rather than as fast errors."""
    import urllib.request  # noqa: PLC0415 - only here

    with urllib.request.urlopen(f"http://127.0.0.1:{system.port}{system.http_path}", timeout=10) as response:
        body = json.loads(response.read())
    if body.get("identity") != "alice" or body.get("token", "").count(".") != 2:  # noqa: PLR2004 - a JWT has three parts
        msg = f"{system.name} returned {body!r}"
        raise RuntimeError(msg)
