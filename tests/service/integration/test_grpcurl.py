"""The real grpcurl binary against a real server: reflection, health, tokens and error details."""

from __future__ import annotations

import json
import subprocess

import jwt

from support.constants import API_SECRET, BFF_ID, GRPCURL
from support.inprocess import RunningServer
from support.logcapture import LeakWatch
from support.pki import Pki


def grpcurl(
    pki: Pki, server: RunningServer, *command: str, data: str | None = None, client: str = "bff"
) -> subprocess.CompletedProcess[str]:
    """Run `grpcurl [flags] localhost:PORT command...` with the client's certificate; no proto files given."""
    cert, key = pki.files(client)
    flags = ["-cacert", str(pki.directory / "ca.pem"), "-cert", str(cert), "-key", str(key)]
    if data is not None:
        flags += ["-d", data]
    return subprocess.run(
        [GRPCURL, *flags, f"localhost:{server.port}", *command],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class TestReflection:
    """Server reflection lets grpcurl work with no proto file at hand."""

    def test_list(self, pki: Pki, shared_server: RunningServer) -> None:
        """grpcurl lists the token, health and reflection services."""
        result = grpcurl(pki, shared_server, "list")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "synctoken.v1.TokenService",
        ]

    def test_describe(self, pki: Pki, shared_server: RunningServer) -> None:
        """grpcurl can describe the request message, field names and all."""
        result = grpcurl(pki, shared_server, "describe", "synctoken.v1.IssueTokenRequest")
        assert result.returncode == 0, result.stderr
        for field in ("string identity = 1;", ".synctoken.v1.SyncGrant sync = 2;", "bool validate_only = 16;"):
            assert field in result.stdout


class TestCalls:
    """The README's walk-through, as a user types it."""

    def test_issue_token(self, pki: Pki, shared_server: RunningServer, leak_watch: LeakWatch) -> None:
        """The README's IssueToken command returns a token signed with the API secret."""
        result = grpcurl(
            pki, shared_server, "synctoken.v1.TokenService/IssueToken", data='{"identity":"alice","sync":{}}'
        )
        assert result.returncode == 0, result.stderr
        response = json.loads(result.stdout)
        leak_watch.tokens.add(response["token"])
        claims = jwt.decode(response["token"], API_SECRET, algorithms=["HS256"])
        assert claims["grants"]["identity"] == "alice"
        assert set(response) == {"token", "identity", "issued_at", "expires_at", "refresh_after", "token_id"}

    def test_caller_identity(self, pki: Pki, shared_server: RunningServer) -> None:
        """GetCallerIdentity shows the caller id and its rule."""
        result = grpcurl(pki, shared_server, "synctoken.v1.TokenService/GetCallerIdentity")
        assert result.returncode == 0, result.stderr
        response = json.loads(result.stdout)
        assert response["caller_id"] == BFF_ID
        assert response["policy"]["matched_caller"] == BFF_ID

    def test_error_details_are_readable(self, pki: Pki, shared_server: RunningServer) -> None:
        """grpcurl shows the status code and decodes ErrorInfo and BadRequest details."""
        result = grpcurl(
            pki, shared_server, "synctoken.v1.TokenService/IssueToken", data='{"identity":"a/b","sync":{}}'
        )
        assert result.returncode != 0
        assert "Code: InvalidArgument" in result.stderr
        assert '"reason":"INVALID_REQUEST"' in result.stderr.replace(" ", "")
        assert '"field":"identity"' in result.stderr.replace(" ", "")

    def test_permission_denied(self, pki: Pki, shared_server: RunningServer) -> None:
        """A stranger sees PermissionDenied with the CALLER_NOT_ALLOWED reason."""
        result = grpcurl(
            pki,
            shared_server,
            "synctoken.v1.TokenService/IssueToken",
            data='{"identity":"alice","sync":{}}',
            client="stranger",
        )
        assert "Code: PermissionDenied" in result.stderr
        assert '"reason":"CALLER_NOT_ALLOWED"' in result.stderr.replace(" ", "")

    def test_health(self, pki: Pki, shared_server: RunningServer) -> None:
        """The standard health service reports SERVING for the server and for TokenService."""
        for service in ("", "synctoken.v1.TokenService"):
            result = grpcurl(pki, shared_server, "grpc.health.v1.Health/Check", data=json.dumps({"service": service}))
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout) == {"status": "SERVING"}
