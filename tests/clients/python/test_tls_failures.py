"""A refused TLS handshake says so, on every side: the client's exception, synctoken-client's JSON, the BFF's log.

Each test gives the call a deadline far longer than a handshake takes: the
error must say TLS because the client found out, not because a deadline passed
(that would end as DEADLINE_EXCEEDED, which the tests refuse).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import ssl
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import httpx
import pytest

from support.bff import Bff, BffFactory
from support.clients import Driver, bare_env, client_flags, run_client
from support.configs import SECRET_ENV, WriteConfig, config_text
from support.inprocess import RunningServer
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import Process, free_port
from synctoken.client import Cause, SynctokenError, Unavailable
from synctoken_server.config.schema import load_config

MakeClient = Callable[..., Driver]
LONG = 20.0
"""A deadline no test may wait out: a TLS failure must be raised long before it."""

# What each failure's message says about the likely reason, beyond "TLS handshake with ... failed".
UNTRUSTED_SERVER = "this client does not trust the server's certificate (unable to get local issuer certificate)"
REFUSED_CLIENT = "it most likely refused this client's certificate"
# What the README tells an operator to set, to see refused handshakes in the server's stderr.
GRPC_INFO = {"GRPC_VERBOSITY": "INFO"}
GRPC_HANDSHAKER_TRACE = {"GRPC_TRACE": "handshaker"}
WRONG_NAME = "the server's certificate does not carry the name 'elsewhere.example' (server_name)"


@pytest.fixture(scope="module")
def shared_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The suite's server on localhost, ::1 and 127.0.0.1 both, as `synctoken dev` listens.

    The clients dial localhost. Were only one address served, gRPC could report
    the other's "connection refused" as its last error every time (see the README).
    """
    path = tmp_path_factory.mktemp("dual-stack") / "synctoken.toml"
    path.write_text(config_text(pki, listen="localhost:0"), encoding="utf-8")
    server = RunningServer(load_config(path, environ=SECRET_ENV))
    yield server
    server.close()


def failure(call: Callable[[], object]) -> SynctokenError:
    """Run a call that must fail; return its exception."""
    with pytest.raises(SynctokenError) as caught:
        call()
    return caught.value


def assert_tls(error: SynctokenError, port: int, why: str) -> None:
    """A TLS failure: UNAVAILABLE, not a deadline; cause, address and reason in the message."""
    assert type(error) is Unavailable
    assert (error.code, error.reason, error.cause) == (grpc.StatusCode.UNAVAILABLE, None, Cause.TLS_HANDSHAKE_FAILED)
    assert re.match(rf"TLS handshake with ipv[46]:\S+:{port} failed: ", error.message), error.message
    assert why in error.message
    assert str(error).startswith("UNAVAILABLE tls_handshake_failed: TLS handshake with")


class TestClient:
    """TokenClient and AsyncTokenClient raise Unavailable with cause TLS_HANDSHAKE_FAILED, at once."""

    def test_wrong_ca(self, make_client: MakeClient, shared_server: RunningServer, pki: Pki) -> None:
        """A CA file that did not issue the server's certificate: the client refuses the server."""
        client = make_client(shared_server.port, ca_file=pki.directory / "open-ca.pem", timeout=LONG)
        assert_tls(failure(client.whoami), shared_server.port, UNTRUSTED_SERVER)

    @pytest.mark.parametrize("cert", ["foreign_ca", "expired"])
    def test_client_certificate_refused(self, make_client: MakeClient, shared_server: RunningServer, cert: str) -> None:
        """A client certificate from a CA the server does not trust, or expired: the server hangs up."""
        client = make_client(shared_server.port, cert=cert, timeout=LONG)
        assert_tls(failure(lambda: client.issue_token("alice")), shared_server.port, REFUSED_CLIENT)

    def test_name_mismatch(self, make_client: MakeClient, shared_server: RunningServer) -> None:
        """A server certificate that does not carry the name checked: the message names it."""
        client = make_client(shared_server.port, server_name="elsewhere.example", timeout=LONG)
        assert_tls(failure(client.whoami), shared_server.port, WRONG_NAME)

    def test_plaintext_port(self, make_client: MakeClient) -> None:
        """A gRPC server without TLS on the port: the handshake fails, and the message says so."""
        plain = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        # One address, dialled as such: with localhost, the other family's port P may belong to anything
        # (a listener that never answers stalls the handshake), and gRPC reports one address's error only.
        port = plain.add_insecure_port("127.0.0.1:0")
        plain.start()
        try:
            client = make_client(port, host="127.0.0.1", timeout=LONG)
            assert_tls(failure(client.whoami), port, "the server did not answer in TLS")
        finally:
            plain.stop(grace=None).wait(timeout=10)

    def test_nothing_listening_is_waited_for(self, make_client: MakeClient) -> None:
        """No server: not TLS; the call waits out its deadline, then says what its last attempt found.

        The deadline leaves room for gRPC's own retries of the first attempt (at most 1.5 s).
        """
        port = free_port()
        error = failure(make_client(port, timeout=5).whoami)
        assert type(error) is Unavailable
        assert (error.code, error.cause) == (grpc.StatusCode.DEADLINE_EXCEEDED, Cause.CONNECTION_FAILED)
        assert re.search(rf"\(its last attempt found: could not connect to ipv[46]:\S+:{port}: ", error.message)
        assert error.message.endswith("Connection refused)"), error.message


class TestCommand:
    """synctoken-client prints the cause and the message in its error JSON."""

    @pytest.mark.parametrize(
        ("cert", "extra", "why"),
        [
            ("bff", ["--server-name", "elsewhere.example"], WRONG_NAME),
            ("expired", [], REFUSED_CLIENT),
        ],
    )
    def test_error_json(self, pki: Pki, shared_server: RunningServer, cert: str, extra: list[str], why: str) -> None:
        """Exit 1, and {"code": "UNAVAILABLE", "cause": "tls_handshake_failed", "message": "TLS handshake ..."}."""
        args = [*client_flags(pki, cert, shared_server.port), *extra, "--timeout", str(LONG), "whoami"]
        code, out, err = run_client(*args, env=bare_env())
        assert (code, out) == (1, None)
        error = json.loads(err.splitlines()[-1])
        assert (error["code"], error["reason"], error["cause"]) == ("UNAVAILABLE", None, "tls_handshake_failed")
        assert re.match(rf"TLS handshake with ipv[46]:\S+:{shared_server.port} failed: ", error["message"])
        assert why in error["message"]

    def test_wrong_ca(self, pki: Pki, shared_server: RunningServer) -> None:
        """--ca naming a CA that did not issue the server's certificate."""
        args = client_flags(pki, "bff", shared_server.port)
        args[args.index("--ca") + 1] = str(pki.directory / "open-ca.pem")
        code, _, err = run_client(*args, "--timeout", str(LONG), "whoami", env=bare_env())
        error = json.loads(err.splitlines()[-1])
        assert (code, error["cause"]) == (1, "tls_handshake_failed")
        assert UNTRUSTED_SERVER in error["message"]


@pytest.fixture
def make_bff(pki: Pki, leak_watch: LeakWatch) -> Iterator[BffFactory]:
    """Start BFFs; stopped at teardown."""
    factory = BffFactory(pki, leak_watch)
    yield factory
    factory.close()


class TestBff:
    """The BFF logs a refused handshake as an operator error; the browser gets a fixed 502."""

    def test_refused_certificate(
        self, make_bff: BffFactory, shared_server: RunningServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The BFF's own certificate is expired: an ERROR naming TLS and what to check; no TLS detail to the browser."""
        bff: Bff = make_bff(shared_server.port, cert="expired", timeout=LONG)
        with caplog.at_level(logging.WARNING, logger="synctoken_bff"):
            response = bff.token()
        assert response.status_code == httpx.codes.BAD_GATEWAY
        assert response.json()["error"]["message"] == "this server cannot connect to the token service"
        assert "TLS" not in response.text
        [record] = [r for r in caplog.records if r.name == "synctoken_bff" and r.getMessage().startswith("token.")]
        assert record.levelno == logging.ERROR
        line = record.getMessage()
        assert line.startswith("token.refused status=502 error=UNAVAILABLE tls_handshake_failed: TLS handshake with")
        assert REFUSED_CLIENT in line
        assert "check SYNCTOKEN_CA_FILE, SYNCTOKEN_CERT_FILE" in line


def refused_handshake(pki: Pki, port: int, cert: str) -> int:
    """Handshake with the server at `port` presenting `cert`, as a client whose port we know; return that port."""
    context = ssl.create_default_context(cafile=pki.directory / "ca.pem")
    context.load_cert_chain(*pki.files(cert))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        local_port: int = tls.getsockname()[1]
        # TLS 1.3: our side of the handshake is done; the server's refusal comes on the first read,
        # as a bare close (what gRPC clients report as "Socket closed"), or as an alert.
        with contextlib.suppress(ssl.SSLError, ConnectionResetError):
            assert tls.recv(100) == b""
    return local_port


class TestServerLog:
    """gRPC Python gives the server no hook on a refused handshake: gRPC core's own stderr lines are all there is."""

    @pytest.mark.parametrize(
        ("env", "shows"),
        [({}, set()), (GRPC_INFO, {"reason"}), (GRPC_INFO | GRPC_HANDSHAKER_TRACE, {"reason", "peer"})],
    )
    def test_what_an_operator_sees(
        self,
        pki: Pki,
        write_config: WriteConfig,
        leak_watch: LeakWatch,
        processes: list[Process],
        env: dict[str, str],
        shows: set[str],
    ) -> None:
        """Nothing by default; the reason with GRPC_VERBOSITY=INFO; the peer too with GRPC_TRACE=handshaker.

        Never in the JSON log, which the server writes from Python.
        """
        port = free_port()
        path = write_config(config_text(pki, listen=f"127.0.0.1:{port}"))
        base = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")} | SECRET_ENV
        process = Process(["serve", "--config", str(path)], path.parent, leak_watch, base | env)
        processes.append(process)
        process.wait_for_records("server.started")
        client_port = refused_handshake(pki, port, "expired")
        process.proc.send_signal(signal.SIGINT)
        assert process.proc.wait(timeout=30) == 0
        stderr = process.stderr_path.read_text()
        reason = "Handshake failed with error SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
        assert (f"{reason}CERTIFICATE_VERIFY_FAILED: certificate has expired" in stderr) is ("reason" in shows)
        assert (f"endpoint_peer_address=ipv4:127.0.0.1:{client_port}," in stderr) is ("peer" in shows)
        assert "expired" not in process.stdout_path.read_text()
