"""Fixtures: a throwaway PKI, configs, real synctoken servers on loopback, and log capture.

Every server in the suite writes its logs to one session-wide sink; at the end
of the session the sink (and every subprocess log) is searched for the API
secret, private keys and every token the suite was issued. Finding any fails
the run.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, cast

import pytest

from client_support import AsyncDriver, Driver, client_kwargs
from support import (
    BFF_ID,
    CHAT_ADMIN_ID,
    CHAT_WORKER_ID,
    DNS_CALLER,
    SECRET_ENV,
    STRANGER_ID,
    TRUST_DOMAIN,
    Client,
    LeakWatch,
    LogSink,
    Pki,
    Process,
    RunningServer,
    ServerHarness,
    config_text,
)
from synctoken.client import AsyncTokenClient, TokenClient
from synctoken_server.audit import logs
from synctoken_server.config.schema import load_config
from synctoken_server.dev.pki import CertificateAuthority, LeafSpec


def _uri_san_der(uri: bytes) -> bytes:
    """A subjectAltName of one URI, as DER: GeneralNames { [6] IA5String }, for bytes cryptography will not write."""
    name = bytes([0x86, len(uri)]) + uri
    return bytes([0x30, len(name)]) + name


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """CAs, a localhost server certificate, and good and bad client certificates.

    Besides the suite's CA (ca.pem, path length 0, like many private CAs) there
    is one without a path length (open-ca.pem), as most public and many
    corporate CAs are, for the tests of chains through other certificates.
    """
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority("synctoken test CA")
    open_ca = CertificateAuthority("synctoken test CA without a path length", path_length=None)
    foreign_ca = CertificateAuthority("someone else's CA")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    # Certificates that can sign others, for leaves issued other than by a CA.
    workload_signer = LeafSpec("worker acting as a CA", uris=(CHAT_WORKER_ID,), ca=True, key_cert_sign=True)
    workload_ca = ca.issue(workload_signer)
    open_workload_ca = open_ca.issue(workload_signer)
    ca_without_key_cert_sign = ca.issue(LeafSpec("CA:TRUE, no key usage", ca=True))
    # A workload named by a DNS SAN, wrongly made a CA: in dns_san mode that is how every workload is named.
    open_dns_workload_ca = open_ca.issue(
        LeafSpec("evil acting as a CA", dns_names=("evil.internal.example.com",), ca=True, key_cert_sign=True)
    )
    intermediate = LeafSpec(
        "intermediate CA", uris=(f"spiffe://{TRUST_DOMAIN}",), ca=True, key_cert_sign=True, crl_sign=True
    )
    open_intermediate = open_ca.issue(
        LeafSpec("intermediate CA", uris=(f"spiffe://{TRUST_DOMAIN}",), ca=True, key_cert_sign=True, crl_sign=True)
    )
    chat_worker = ca.issue(LeafSpec("worker", uris=(CHAT_WORKER_ID,)))
    admin = LeafSpec("admin", uris=(CHAT_ADMIN_ID,))
    clients = {
        "bff": ca.issue(LeafSpec("bff", uris=(BFF_ID,))),
        "chat_worker": chat_worker,
        "chat_admin": ca.issue(admin),
        "stranger": ca.issue(LeafSpec("stranger", uris=(STRANGER_ID,))),
        "foreign_trust_domain": ca.issue(LeafSpec("evil", uris=("spiffe://evil.example/ns/web/sa/bff",))),
        "two_uri_sans": ca.issue(LeafSpec("two", uris=(BFF_ID, CHAT_ADMIN_ID))),
        "spiffe_and_https_uri": ca.issue(LeafSpec("mixed", uris=(BFF_ID, "https://bff.example.org"))),
        "no_san": ca.issue(LeafSpec(BFF_ID)),
        "dns_only": ca.issue(LeafSpec("billing", dns_names=(DNS_CALLER,))),
        "two_dns_sans": ca.issue(LeafSpec("two dns", dns_names=(DNS_CALLER, "other.internal.example.com"))),
        "foreign_ca": foreign_ca.issue(LeafSpec("bff", uris=(BFF_ID,))),
        "expired": ca.issue(
            LeafSpec("bff", uris=(BFF_ID,), not_before=long_ago, not_after=long_ago + dt.timedelta(days=1))
        ),
        # gRPC's peer_spiffe_id and peer_dns stop at the NUL: "admin" and "billing...".
        "nul_in_uri_san": ca.issue(LeafSpec("admin", uris=(f"{CHAT_ADMIN_ID}\x00.anything",))),
        "nul_in_dns_san": ca.issue(LeafSpec("billing", dns_names=(f"{DNS_CALLER}\x00.evil.com",))),
        "newline_after_uri_san": ca.issue(LeafSpec("bff", uris=(f"{BFF_ID}\n",))),
        "upper_case_trust_domain": ca.issue(LeafSpec("bff", uris=("spiffe://EXAMPLE.org/ns/web/sa/bff",))),
        "trust_domain_only_uri_san": ca.issue(LeafSpec("td", uris=(f"spiffe://{TRUST_DOMAIN}",))),
        # A byte over 0x7f in an IA5String: BoringSSL reads it as Latin-1, cryptography refuses it.
        "undecodable_uri_san": ca.issue(LeafSpec("bff", san_der=_uri_san_der(BFF_ID.encode() + b"\xff"))),
        "ca_true_leaf": ca.issue(LeafSpec("bff", uris=(BFF_ID,), ca=True)),
        "key_cert_sign_leaf": ca.issue(LeafSpec("bff", uris=(BFF_ID,), key_cert_sign=True)),
        "crl_sign_leaf": ca.issue(LeafSpec("bff", uris=(BFF_ID,), crl_sign=True)),
        "issued_by_workload": ca.issue(admin, issuer=workload_ca),
        "issued_by_ca_without_key_cert_sign": ca.issue(admin, issuer=ca_without_key_cert_sign),
        "issued_by_plain_leaf": ca.issue(admin, issuer=chat_worker),
        "issued_by_workload_under_open_ca": open_ca.issue(admin, issuer=open_workload_ca),
        "issued_by_intermediate_under_open_ca": open_ca.issue(admin, issuer=open_intermediate),
        "issued_by_dns_named_workload_under_open_ca": open_ca.issue(admin, issuer=open_dns_workload_ca),
        "dns_caller_issued_by_dns_named_workload_under_open_ca": open_ca.issue(
            LeafSpec("billing", dns_names=(DNS_CALLER,)), issuer=open_dns_workload_ca
        ),
        # ca.pem has path length 0, which BoringSSL does not enforce on a trust anchor.
        "issued_by_intermediate_past_path_length": ca.issue(admin, issuer=ca.issue(intermediate)),
    }
    server = ca.issue(LeafSpec("localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1",), server=True))
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    (directory / "open-ca.pem").write_bytes(open_ca.cert_pem)
    server.write(directory / "server.pem", directory / "server-key.pem")
    for name, pair in clients.items():
        pair.write(*(directory / f"{name}.pem", directory / f"{name}-key.pem"))
    return Pki(ca=ca, directory=directory, server=server, clients=clients)


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


DEFAULT_PORTS = (50051, 8080, 9464)
"""The ports the README's examples use: `make dev`, `make bff`, the metrics example."""


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
