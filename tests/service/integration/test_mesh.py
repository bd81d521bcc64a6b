"""Mesh mode: a real server with a Unix-socket listener that trusts x-forwarded-client-cert, beside its mTLS one."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from support.calls import rpc_error
from support.configs import SECRET_ENV, WriteConfig, config_text
from support.constants import BFF_ID, CHAT_WORKER_ID, GRPCURL, SERVICE_C, STRANGER_ID
from support.inprocess import RunningServer, ServerHarness
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import Process
from synctoken.v1 import token_service_pb2 as pb
from synctoken.v1 import token_service_pb2_grpc
from synctoken_server.config.reader import ConfigError
from synctoken_server.config.schema import load_config
from synctoken_server.serveroptions import MAX_METADATA_BYTES

ALICE = pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant())
SIDECAR = "spiffe://example.org/ns/web/sa/bff-sidecar"


def xfcc(uri: str) -> str:
    """The header a sidecar writes for a caller whose certificate names `uri`."""
    return f'By={SIDECAR};Hash=c0ffee;Subject="";URI={uri}'


@pytest.fixture
def socket_path() -> Iterator[Path]:
    """A socket path short enough for sun_path (pytest's tmp_path can be too long)."""
    with tempfile.TemporaryDirectory(prefix="st-mesh-", dir="/tmp") as directory:
        yield Path(directory) / "mesh.sock"


def mesh_config(pki: Pki, socket_path: Path) -> str:
    """The suite's config with a mesh listener on `socket_path`."""
    return f'[mesh]\nlisten = "unix:{socket_path}"\ntrust_forwarded_client_cert = true\n{config_text(pki)}'


class Mesh:
    """A server with both listeners, and calls on either."""

    def __init__(self, harness: ServerHarness, server: RunningServer, socket_path: Path, watch: LeakWatch) -> None:
        self._channel = grpc.insecure_channel(f"unix:{socket_path}")
        self._stub = token_service_pb2_grpc.TokenServiceStub(self._channel)
        self.tls = harness.client(server, "bff")
        self.watch = watch

    def issue(self, request: pb.IssueTokenRequest, *headers: str) -> pb.IssueTokenResponse:
        """IssueToken over the Unix socket with these x-forwarded-client-cert values."""
        response = self._stub.IssueToken(
            request, metadata=tuple(("x-forwarded-client-cert", h) for h in headers), timeout=10
        )
        self.watch.tokens.add(response.token)
        return response

    def refused(self, request: pb.IssueTokenRequest, *headers: str) -> tuple[grpc.StatusCode, str, str]:
        """An IssueToken over the socket that must fail: code, reason and message."""
        error, info, _ = rpc_error(lambda: self.issue(request, *headers))
        return error.code(), info.reason, error.details() or ""

    def caller_id(self, *headers: str) -> str:
        """GetCallerIdentity over the socket: whom these x-forwarded-client-cert values name."""
        response = self._stub.GetCallerIdentity(
            pb.GetCallerIdentityRequest(), metadata=tuple(("x-forwarded-client-cert", h) for h in headers), timeout=10
        )
        return response.caller_id

    def close(self) -> None:
        self._channel.close()


@pytest.fixture
def mesh(harness: ServerHarness, pki: Pki, socket_path: Path, leak_watch: LeakWatch) -> Iterator[Mesh]:
    """A mesh-mode server and its clients."""
    server = harness.start(mesh_config(pki, socket_path))
    mesh = Mesh(harness, server, socket_path, leak_watch)
    yield mesh
    mesh.close()


class TestTrustedListener:
    """On the mesh listener the header names the caller, under the same rules as a certificate."""

    def test_valid_header(self, mesh: Mesh) -> None:
        """A caller the policy allows, named by the header, gets its token."""
        response = mesh.issue(ALICE, xfcc(BFF_ID))
        assert response.token

    def test_nearest_element_wins(self, mesh: Mesh) -> None:
        """With several proxies, the element the nearest one added (the last) names the caller."""
        assert mesh.issue(ALICE, f"{xfcc(STRANGER_ID)},{xfcc(BFF_ID)}").token

    def test_appended_to_a_forged_header(self, mesh: Mesh) -> None:
        """APPEND_FORWARD (Istio's default) keeps what the client sent in front: the sidecar's element, last, wins.

        The client forged an element naming the BFF; the sidecar appended the one for the
        certificate the client really presented (a stranger's): the caller is the stranger.
        """
        forged = f"By=spiffe://example.org/ns/web/sa/anything;URI={BFF_ID}"
        header = f"{forged},{xfcc(STRANGER_ID)}"
        assert mesh.caller_id(header) == STRANGER_ID
        code, reason, _ = mesh.refused(ALICE, header)
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED")
        assert mesh.caller_id(f"{xfcc(STRANGER_ID)},{xfcc(BFF_ID)}") == BFF_ID

    @pytest.mark.parametrize(
        ("uri", "request_", "reason"),
        [
            (STRANGER_ID, ALICE, "CALLER_NOT_ALLOWED"),
            (
                CHAT_WORKER_ID,
                pb.IssueTokenRequest(identity="user-1", sync=pb.SyncGrant(service_sid=SERVICE_C)),
                "SERVICE_NOT_ALLOWED",
            ),
            (
                CHAT_WORKER_ID,
                pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant(service_sid="IS" + "b" * 32)),
                "IDENTITY_NOT_ALLOWED",
            ),
        ],
    )
    def test_policy_applies(self, mesh: Mesh, uri: str, request_: pb.IssueTokenRequest, reason: str) -> None:
        """The policy is enforced on the header's URI exactly as on a certificate's."""
        code, got, _ = mesh.refused(request_, xfcc(uri))
        assert (code, got) == (grpc.StatusCode.PERMISSION_DENIED, reason)

    @pytest.mark.parametrize(
        ("headers", "why"),
        [
            ((), "the mesh listener needs exactly one x-forwarded-client-cert header"),
            ((xfcc(BFF_ID), xfcc(BFF_ID)), "the mesh listener needs exactly one x-forwarded-client-cert header"),
            (
                (f'By={SIDECAR};Subject="unterminated;URI={BFF_ID}',),
                "the header is malformed: an unterminated quote from offset 54",
            ),
            (
                (f"By={SIDECAR};Hash=c0ffee",),
                "the header is malformed: the nearest proxy's element has 0 URI values, not one",
            ),
            (
                (f"By={SIDECAR};URI={BFF_ID};URI={CHAT_WORKER_ID}",),
                "the header is malformed: the nearest proxy's element has 2 URI values, not one",
            ),
            ((xfcc("spiffe://evil.example/ns/web/sa/bff"),), "trust domain evil.example is not trusted"),
            ((xfcc("https://bff.example.org"),), "its URI is not a SPIFFE ID"),
            ((xfcc("spiffe://example.org"),), "its URI names a trust domain, not a workload (it has no path)"),
        ],
    )
    def test_refused(self, mesh: Mesh, headers: tuple[str, ...], why: str) -> None:
        """A missing, repeated or malformed header, or a URI that is no acceptable SPIFFE ID, is refused."""
        code, reason, message = mesh.refused(ALICE, *headers)
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNAUTHENTICATED")
        # There is no client certificate on this listener: the message names what there is.
        assert message == f"x-forwarded-client-cert has no acceptable caller id: {why}"


def forwarded_certificates(pki: Pki, size: int) -> str:
    """An XFCC element as a sidecar writes it when told to forward whole certificates, about `size` bytes long.

    Cert= is the caller's URL-encoded PEM, Chain= repeats it (a long chain) until the header has the size.
    """
    cert_file, _ = pki.files("bff")
    pem = urllib.parse.quote(cert_file.read_text(), safe="")
    head = f'By={SIDECAR};Hash=c0ffee;Cert="{pem}";URI={BFF_ID};Chain="'
    chain = (pem * (size // len(pem) + 1))[: size - len(head) - 1]
    return f'{head}{chain}"'


class TestForwardedCertificateSize:
    """Sidecars that forward whole certificates (Cert=, Chain=) make long headers; gRPC limits all headers."""

    def test_under_the_limit_always_served(self, mesh: Mesh, pki: Pki) -> None:
        """12 KiB of XFCC is served every time (gRPC's default soft limit would refuse it about half the time)."""
        header = forwarded_certificates(pki, 12 * 1024)
        assert len(header) == 12 * 1024
        for _ in range(20):
            assert mesh.caller_id(header) == BFF_ID

    def test_over_the_limit_refused(self, mesh: Mesh, pki: Pki) -> None:
        """Headers over 16 KiB are refused by gRPC itself, before synctoken sees the call: no ErrorInfo."""
        header = forwarded_certificates(pki, MAX_METADATA_BYTES + 1)
        with pytest.raises(grpc.RpcError) as caught:
            mesh.caller_id(header)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "received metadata size exceeds hard limit" in (caught.value.details() or "")


class TestTlsListener:
    """The mTLS listener keeps working, and never reads the header."""

    def test_still_serves(self, mesh: Mesh) -> None:
        """A caller with a certificate gets its token as before."""
        assert mesh.tls.issue(ALICE).token

    def test_spoofed_header_refused(self, mesh: Mesh) -> None:
        """A header on the mTLS listener is refused with a reason that says so, even naming the caller itself."""
        error, info, _ = rpc_error(
            lambda: mesh.tls.stub.IssueToken(ALICE, metadata=(("x-forwarded-client-cert", xfcc(BFF_ID)),), timeout=10)
        )
        assert (error.code(), info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "FORWARDED_CLIENT_CERT_UNTRUSTED")

    def test_header_refused_without_mesh(self, harness: ServerHarness, pki: Pki) -> None:
        """Without mesh mode the header is refused all the same."""
        client = harness.client(harness.start(config_text(pki)), "bff")
        _, info, _ = rpc_error(
            lambda: client.stub.IssueToken(ALICE, metadata=(("x-forwarded-client-cert", xfcc(BFF_ID)),), timeout=10)
        )
        assert info.reason == "FORWARDED_CLIENT_CERT_UNTRUSTED"


class TestGrpcurl:
    """The README's grpcurl call over the socket."""

    @pytest.mark.usefixtures("mesh")
    def test_issue_token(self, socket_path: Path, leak_watch: LeakWatch) -> None:
        """grpcurl -plaintext -unix with -H gets a token for the header's caller."""
        result = subprocess.run(
            [
                GRPCURL, "-plaintext", "-unix",
                "-H", f"x-forwarded-client-cert: By={SIDECAR};URI={BFF_ID}",
                "-d", '{"identity":"alice","sync":{}}',
                str(socket_path), "synctoken.v1.TokenService/IssueToken",
            ],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        response = json.loads(result.stdout)
        leak_watch.tokens.add(response["token"])
        assert response["identity"] == "alice"


class TestStartedLine:
    """server.started names every listener, as bound, so that an operator sees what is reachable."""

    def test_names_every_listener(
        self,
        pki: Pki,
        tmp_path: Path,
        write_config: WriteConfig,
        socket_path: Path,
        leak_watch: LeakWatch,
        processes: list[Process],
    ) -> None:
        """The mTLS port, the mesh socket and the metrics address (its real port, configured as :0)."""
        text = mesh_config(pki, socket_path) + '\n[metrics]\nlisten = "127.0.0.1:0"\n'
        path = write_config(text)
        process = Process(["serve", "--config", str(path)], tmp_path, leak_watch, env=os.environ | SECRET_ENV)
        processes.append(process)
        [started] = process.wait_for_records("server.started")
        assert (started["listen"], started["mesh"]) == ("127.0.0.1:0", [f"unix:{socket_path}"])
        assert isinstance(started["port"], int)
        assert started["port"] > 0
        host, _, port = started["metrics"].rpartition(":")
        assert (host, port != "0") == ("127.0.0.1", True)
        with urllib.request.urlopen(f"http://{started['metrics']}/", timeout=10) as scrape:
            assert b"synctoken_tokens_issued_total" in scrape.read()
        assert process.terminate() == 0

    def test_loopback_mesh_as_bound(
        self, pki: Pki, tmp_path: Path, write_config: WriteConfig, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """A mesh port configured as localhost:0 is named by the addresses and port bound; no metrics: null."""
        text = '[mesh]\nlisten = "localhost:0"\ntrust_forwarded_client_cert = true\n' + config_text(pki)
        path = write_config(text)
        process = Process(["serve", "--config", str(path)], tmp_path, leak_watch, env=os.environ | SECRET_ENV)
        processes.append(process)
        [started] = process.wait_for_records("server.started")
        assert started["metrics"] is None
        assert started["mesh"]
        for address in started["mesh"]:
            host, _, port = address.rpartition(":")
            assert host in {"127.0.0.1", "[::1]"}
            assert int(port) not in {0, started["port"]}
        assert process.terminate() == 0


class TestConfig:
    """The [mesh] table."""

    @pytest.mark.parametrize(
        ("table", "message"),
        [
            (
                '[mesh]\nlisten = "unix:/tmp/x.sock"',
                "mesh.trust_forwarded_client_cert: must be true: the mesh listener exists to trust it",
            ),
            (
                '[mesh]\nlisten = "0.0.0.0:50052"\ntrust_forwarded_client_cert = true',
                (
                    "mesh.listen: '0.0.0.0:50052' resolves to 0.0.0.0, which is not loopback: only the sidecar may "
                    "reach the mesh listener (use 127.0.0.1, [::1] or unix:<path>)"
                ),
            ),
            ('[mesh]\nlisten = "unix:"\ntrust_forwarded_client_cert = true', "mesh.listen: unix: needs a socket path"),
            (
                '[mesh]\nlisten = "unix:/x"\ntrust_forwarded_client_cert = true\nport = 1',
                "mesh.port: unknown key; expected one of listen, socket_group, trust_forwarded_client_cert",
            ),
            (
                '[mesh]\nlisten = "localhost"\ntrust_forwarded_client_cert = true',
                "mesh.listen: 'localhost' is neither unix:<path> nor a loopback host:port",
            ),
            ("[mesh]\ntrust_forwarded_client_cert = true", "mesh.listen: missing"),
        ],
    )
    def test_invalid(self, pki: Pki, write_config: WriteConfig, table: str, message: str) -> None:
        """Each defect names the file and the key."""
        path = write_config(f"{table}\n{config_text(pki)}")
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ=SECRET_ENV)
        assert str(caught.value) == f"{path}: {message}"

    def test_needs_spiffe(self, pki: Pki, write_config: WriteConfig) -> None:
        """Mesh mode takes the caller from a URI, so it needs identity.source = spiffe."""
        identity = '[identity]\nsource = "dns_san"\n'
        text = config_text(pki, identity=identity, policy="")
        path = write_config(f'[mesh]\nlisten = "127.0.0.1:0"\ntrust_forwarded_client_cert = true\n{text}')
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ=SECRET_ENV)
        assert (
            str(caught.value)
            == f"{path}: mesh: needs identity.source = spiffe: the caller is taken from the header's URI"
        )
