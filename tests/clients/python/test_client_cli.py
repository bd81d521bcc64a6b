"""`synctoken-client` as users run it, in a subprocess against a real server: JSON out, exit codes, no token on stderr."""

from __future__ import annotations

import datetime as dt
import json

import jwt
import pytest

from support.clients import bare_env, client_flags, env_for, run_client
from support.constants import API_SECRET, BFF_ID, SERVICE_A, SERVICE_B, SERVICE_C
from support.inprocess import RunningServer
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import free_port


def rfc3339(seconds: object) -> str:
    """A JWT time claim the way the CLI prints times."""
    assert isinstance(seconds, int)
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TestIssue:
    """`issue` prints the IssuedToken as one JSON object on stdout."""

    def test_defaults(self, pki: Pki, shared_server: RunningServer, leak_watch: LeakWatch) -> None:
        """With flags for the connection, the token and its times are printed; stderr stays empty."""
        code, out, err = run_client(
            *client_flags(pki, "bff", shared_server.port),
            "issue",
            "--identity",
            "alice",
            env=bare_env(),
            watch=leak_watch,
        )
        assert (code, err) == (0, "")
        assert out is not None
        assert set(out) == {"token", "identity", "issued_at", "expires_at", "refresh_after", "token_id"}
        claims = jwt.decode(str(out["token"]), API_SECRET, algorithms=["HS256"])
        assert claims["grants"] == {"identity": "alice", "data_sync": {"service_sid": SERVICE_A}}
        assert (out["issued_at"], out["expires_at"]) == (rfc3339(claims["nbf"]), rfc3339(claims["exp"]))
        assert out["issued_at"] <= out["refresh_after"] < out["expires_at"]  # type: ignore[operator]

    def test_every_option(self, pki: Pki, shared_server: RunningServer, leak_watch: LeakWatch) -> None:
        """--service, --endpoint-id, --ttl and --region reach the token."""
        code, out, _ = run_client(
            *client_flags(pki, "bff", shared_server.port),
            "issue",
            "--identity",
            "bob",
            "--service",
            SERVICE_B,
            "--endpoint-id",
            "device-1",
            "--ttl",
            "1h30m",
            "--region",
            "ie1",
            env=bare_env(),
            watch=leak_watch,
        )
        assert code == 0
        assert out is not None
        token = str(out["token"])
        claims = jwt.decode(token, API_SECRET, algorithms=["HS256"])
        assert jwt.get_unverified_header(token)["twr"] == "ie1"
        assert claims["grants"]["data_sync"] == {"service_sid": SERVICE_B, "endpoint_id": "device-1"}
        assert claims["exp"] - claims["nbf"] == 90 * 60

    def test_validate_only(self, pki: Pki, shared_server: RunningServer) -> None:
        """--validate-only prints the identity and times; no token or token_id key, as grpcurl omits empty fields."""
        code, out, _ = run_client(
            *client_flags(pki, "bff", shared_server.port),
            "issue",
            "--identity",
            "alice",
            "--validate-only",
            env=bare_env(),
        )
        assert code == 0
        assert out is not None
        assert set(out) == {"identity", "issued_at", "expires_at", "refresh_after"}
        assert out["identity"] == "alice"

    def test_settings_from_the_environment(self, pki: Pki, shared_server: RunningServer, leak_watch: LeakWatch) -> None:
        """With no flags, SYNCTOKEN_* variables say where and who; a flag beats its variable."""
        env = env_for(pki, "stranger", f"localhost:{shared_server.port}")
        code, out, _ = run_client("whoami", env=env)
        assert code == 0
        assert out == {"caller_id": "spiffe://example.org/ns/other/sa/stranger", "policy": None}
        cert_file, key_file = pki.files("bff")
        code, out, _ = run_client("--cert", str(cert_file), "--key", str(key_file), "whoami", env=env, watch=leak_watch)
        assert code == 0
        assert out is not None
        assert out["caller_id"] == BFF_ID


class TestWhoami:
    """`whoami` prints the caller and its policy."""

    def test_policy(self, pki: Pki, shared_server: RunningServer) -> None:
        """The policy's durations print as grpcurl prints them ("600s")."""
        code, out, err = run_client(*client_flags(pki, "chat_worker", shared_server.port), "whoami", env=bare_env())
        assert (code, err) == (0, "")
        assert out == {
            "caller_id": "spiffe://example.org/ns/chat/sa/worker",
            "policy": {
                "matched_caller": "spiffe://example.org/ns/chat/*",
                "sync_service_sids": [SERVICE_B],
                "default_sync_service_sid": None,
                "identity_pattern": "user-[0-9]+",
                "allowed_identity_characters": "",
                "default_ttl": "600s",
                "max_ttl": "1800s",
            },
        }


class TestFailures:
    """A failed call prints the error as JSON on stderr, nothing on stdout, and exits 1."""

    @pytest.mark.parametrize(
        ("args", "expected"),
        [
            (
                ["--service", SERVICE_C],
                {
                    "code": "PERMISSION_DENIED",
                    "reason": "SERVICE_NOT_ALLOWED",
                    "cause": None,
                    "message": f"caller {BFF_ID} may not mint tokens for Sync service {SERVICE_C}",
                    "field_violations": [],
                },
            ),
            (
                ["--ttl", "25h", "--region", "x"],
                {
                    "code": "INVALID_ARGUMENT",
                    "reason": "INVALID_REQUEST",
                    "cause": None,
                    "message": "invalid request: ttl: 25h is above the 24h limit; region: must be a Twilio region such as us1, ie1 or au1",
                    "field_violations": [
                        {"field": "ttl", "description": "25h is above the 24h limit"},
                        {"field": "region", "description": "must be a Twilio region such as us1, ie1 or au1"},
                    ],
                },
            ),
        ],
    )
    def test_refused(
        self, pki: Pki, shared_server: RunningServer, args: list[str], expected: dict[str, object]
    ) -> None:
        """The server's refusal: code, reason, message and field violations."""
        code, out, err = run_client(
            *client_flags(pki, "bff", shared_server.port), "issue", "--identity", "alice", *args, env=bare_env()
        )
        assert (code, out) == (1, None)
        assert json.loads(err) == expected

    def test_no_server(self, pki: Pki) -> None:
        """Nothing listening: the deadline passes, and the error has gRPC's code and no reason."""
        code, out, err = run_client(
            *client_flags(pki, "bff", free_port()), "--timeout", "0.5", "issue", "--identity", "alice", env=bare_env()
        )
        assert (code, out) == (1, None)
        assert json.loads(err) == {
            "code": "DEADLINE_EXCEEDED",
            "reason": None,
            "cause": None,
            "message": "Deadline Exceeded",
            "field_violations": [],
        }


class TestUsage:
    """Bad usage exits 2 with a message on stderr, before any call."""

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            ([], "the following arguments are required: command"),
            (["issue"], "the following arguments are required: --identity"),
            (
                ["issue", "--identity", "a", "--ttl", "10 minutes"],
                "'10 minutes' is not a duration like 90s, 15m, 1h or 1h30m",
            ),
            (["--timeout", "0", "whoami"], "--timeout must be a number of seconds above 0, not '0'"),
            (["--target", "", "whoami"], "give --target or set SYNCTOKEN_TARGET"),
        ],
    )
    def test_bad_flags(self, pki: Pki, args: list[str], message: str) -> None:
        """Missing or malformed flags, and a missing setting, are usage errors."""
        code, out, err = run_client(*args, env=bare_env() | {"SYNCTOKEN_CA_FILE": str(pki.directory / "ca.pem")})
        assert (code, out) == (2, None)
        assert err.startswith("usage: synctoken-client")
        assert message in err

    def test_missing_variable_named(self, pki: Pki) -> None:
        """Without --key or SYNCTOKEN_KEY_FILE, the message names both."""
        env = env_for(pki, "bff", "localhost:1")
        del env["SYNCTOKEN_KEY_FILE"]
        code, _, err = run_client("whoami", env=env)
        assert code == 2
        assert "error: give --key or set SYNCTOKEN_KEY_FILE" in err

    def test_mismatched_files(self, pki: Pki) -> None:
        """A key that does not match the certificate is refused before any call."""
        env = env_for(pki, "bff", "localhost:1")
        env["SYNCTOKEN_KEY_FILE"] = str(pki.files("stranger")[1])
        code, _, err = run_client("whoami", env=env)
        assert code == 2
        assert (
            f"error: the key in {pki.files('stranger')[1]} does not match the certificate in {pki.files('bff')[0]}"
            in err
        )
        assert "PRIVATE KEY" not in err
