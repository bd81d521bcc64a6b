"""Fixtures: a throwaway PKI, configs, real synctoken servers on loopback, and log capture.

Every server in the suite writes its logs to one session-wide sink; at the end
of the session the sink (and every subprocess log) is searched for the API
secret, private keys and every token the suite was issued. Finding any fails
the run.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, cast

import pytest

from support.clients import AsyncDriver, Driver, client_kwargs
from support.configs import SECRET_ENV, config_text
from support.inprocess import Client, RunningServer, ServerHarness
from support.logcapture import LeakWatch, LogSink
from support.otlp import OtlpReceiver
from support.pki import Pki, build_pki
from support.processes import Process
from support.redisserver import RedisServer
from support.workloadagent import WorkloadAgent
from synctoken.client import AsyncTokenClient, TokenClient
from synctoken_server.audit import logs
from synctoken_server.config.schema import load_config


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The suite's PKI, made once per session (see support.pki.build_pki)."""
    return build_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server on a free loopback port, empty, killed at teardown."""
    server = RedisServer(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """Write config text to a file in this test's folder and return its path."""

    def write(text: str) -> Path:
        path = tmp_path / "synctoken.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def log_sink() -> LogSink:
    """structlog, configured once for the session as the CLI does, writing JSON to a sink."""
    sink = LogSink()
    logs.configure(cast("BinaryIO", sink))
    return sink


# The client library's loggers, and the BFF's and its server's, which run in the suite's process too.
_WATCHED_LOGGERS = ("synctoken.client", "synctoken_bff", "uvicorn")


class _ClientRecords(logging.Handler):
    """Every record of the client library's and the BFF's loggers, as formatted text."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(_WATCHED_LOGGERS):
            self.lines.append(self.format(record))


DEFAULT_PORTS = (50051, 8080, 8081, 9464)
"""The ports the README's examples use: `make dev`, `make bff`, the health and metrics examples."""


@pytest.fixture(scope="session", autouse=True)
def default_ports_taken() -> Iterator[None]:
    """The suite runs as if `make dev` and `make bff` were serving: every default port is taken.

    A test that relies on a fixed port then fails every time, not only on the machine of someone
    who left `make dev` running. A port already in use (by `make dev`, say) is taken all the same.
    """
    held = []
    for port in DEFAULT_PORTS:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.bind((host, port))
                listener.listen()
            except OSError:  # in use already, or no IPv6 here: taken either way, or unreachable
                listener.close()
            else:
                held.append(listener)
    yield
    for listener in held:
        listener.close()


@pytest.fixture(scope="session", autouse=True)
def leak_watch(log_sink: LogSink) -> Iterator[LeakWatch]:
    """After the whole session, no log line holds the secret, a private key or an issued token.

    The client library's and the BFF's records (standard logging, on
    synctoken.client, synctoken_bff and uvicorn) are searched too, caught at
    the root logger so that their own loggers stay as the libraries leave
    them: without handlers.
    """
    watch = LeakWatch()
    client_logs = _ClientRecords()
    logging.getLogger().addHandler(client_logs)
    # At INFO, as synctoken-bff runs: the lines that would reach a deployment's log are the ones searched.
    for name in ("synctoken_bff", "uvicorn"):
        logging.getLogger(name).setLevel(logging.INFO)
    yield watch
    logging.getLogger().removeHandler(client_logs)
    texts = {"in-process logs": "\n".join(log_sink.lines), "client and BFF logs": "\n".join(client_logs.lines)}
    texts |= {str(p): p.read_text(encoding="utf-8", errors="replace") for p in watch.log_files if p.exists()}
    for where, text in texts.items():
        for needle in watch.secrets | watch.tokens:
            assert needle not in text, f"{where} contains a secret or token ({needle[:12]}...)"


@pytest.fixture
def harness(pki: Pki, leak_watch: LeakWatch, write_config: Callable[[str], Path]) -> Iterator[ServerHarness]:
    """Real servers and clients for one test."""
    h = ServerHarness(pki, leak_watch, write_config)
    yield h
    h.close()


@pytest.fixture(scope="module")
def shared_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server with the suite's policy, shared by a module's read-only tests."""
    path = tmp_path_factory.mktemp("shared") / "synctoken.toml"
    path.write_text(config_text(pki), encoding="utf-8")
    server = RunningServer(load_config(path, environ=SECRET_ENV))
    yield server
    server.close()


@pytest.fixture
def connect(shared_server: RunningServer, harness: ServerHarness) -> Callable[[str | None], Client]:
    """Open a client to the shared server with the named certificate."""
    return lambda cert: harness.client(shared_server, cert)


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Processes a test starts; killed at teardown if still running."""
    started: list[Process] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest, pki: Pki) -> Iterator[Callable[..., Driver]]:
    """Open TokenClients, or AsyncTokenClients behind a blocking face, to a port; closed at teardown.

    `make_client(port, cert="bff", host="localhost", **kwargs)`: kwargs go to the client's constructor.
    """
    made: list[Driver] = []

    def make(port: int, cert: str = "bff", host: str = "localhost", **kwargs: object) -> Driver:
        arguments: dict[str, object] = {**client_kwargs(pki, cert), **kwargs}
        client: Driver
        if request.param == "sync":
            client = TokenClient(f"{host}:{port}", **arguments)  # type: ignore[arg-type]
        else:
            client = AsyncDriver(AsyncTokenClient(f"{host}:{port}", **arguments))  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        if isinstance(client, AsyncDriver):
            client.dispose()
        else:
            client.close()


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A running OTLP/gRPC receiver on 127.0.0.1, for the tracing tests of the server, the client and the BFF."""
    found = OtlpReceiver()
    yield found
    found.close()


@pytest.fixture
def workload_agent(tmp_path: Path, leak_watch: LeakWatch) -> Iterator[WorkloadAgent]:
    """A stand-in SPIFFE Workload API agent, not yet started (see support.workloadagent); stopped at teardown."""
    agent = WorkloadAgent(tmp_path, leak_watch)
    yield agent
    agent.close()
