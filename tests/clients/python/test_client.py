"""The client library against a real server over mTLS: typed results field by field, typed errors, retries, settings."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import errno
import hashlib
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc.code_pb2 import Code
from google.rpc.error_details_pb2 import ErrorInfo, RetryInfo
from google.rpc.status_pb2 import Status
from grpc_status import rpc_status

from support.clients import Driver, ScriptedServer, client_kwargs, keep
from support.configs import SECRET_ENV, WriteConfig, config_text
from support.constants import API_SECRET, BFF_ID, CHAT_WORKER_ID, SERVICE_A, SERVICE_B, SERVICE_C, STRANGER_ID
from support.inprocess import RunningServer, ServerHarness, break_signing
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import free_port
from synctoken.client import (
    AsyncTokenClient,
    CallerIdentity,
    CallerPolicy,
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    SynctokenError,
    TokenClient,
    Unauthenticated,
    Unavailable,
)
from synctoken.client._channel import RETRY_POLICY
from synctoken_server.audit.record import AuditLog
from synctoken_server.config.schema import load_config

MakeClient = Callable[..., Driver]


def claims(token: str) -> tuple[dict[str, object], dict[str, object]]:
    """The token's header and its payload, its signature verified with the API secret."""
    return jwt.get_unverified_header(token), jwt.decode(token, API_SECRET, algorithms=["HS256"])


def at(seconds: object) -> dt.datetime:
    """A JWT time claim as an aware UTC datetime."""
    assert isinstance(seconds, int)
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def failure(call: Callable[[], object]) -> SynctokenError:
    """Run a call that must fail; return its exception, which is never a raw grpc.RpcError."""
    with pytest.raises(SynctokenError) as caught:
        call()
    assert not isinstance(caught.value, grpc.RpcError)
    return caught.value


class TestIssueToken:
    """issue_token returns an IssuedToken whose fields are what the token says."""

    def test_every_field_matches_the_claims(
        self, make_client: MakeClient, shared_server: RunningServer, leak_watch: LeakWatch
    ) -> None:
        """identity, issued_at, expires_at and token_id match the signed token; refresh_after is 3m+ before expiry."""
        token = make_client(shared_server.port).issue_token(
            "bob@example.com",
            service_sid=SERVICE_B,
            endpoint_id="device-1",
            ttl=dt.timedelta(minutes=15),
            region="ie1",
        )
        keep(leak_watch, token)
        header, payload = claims(token.token)
        assert header["twr"] == "ie1"
        assert payload["grants"] == {
            "identity": "bob@example.com",
            "data_sync": {"service_sid": SERVICE_B, "endpoint_id": "device-1"},
        }
        assert token.identity == "bob@example.com"
        assert token.issued_at == at(payload["nbf"])
        assert token.expires_at == at(payload["exp"]) == token.issued_at + dt.timedelta(minutes=15)
        assert token.issued_at <= token.refresh_after <= token.expires_at - dt.timedelta(minutes=3)
        assert token.token_id == hashlib.sha256(token.token.encode()).hexdigest()[:32]
        for moment in (token.issued_at, token.expires_at, token.refresh_after):
            assert moment.utcoffset() == dt.timedelta(0)

    def test_defaults_are_the_policys(
        self, make_client: MakeClient, shared_server: RunningServer, leak_watch: LeakWatch
    ) -> None:
        """With only an identity, the caller's default Sync service and TTL apply, and no region header."""
        token = make_client(shared_server.port).issue_token("alice")
        keep(leak_watch, token)
        header, payload = claims(token.token)
        assert "twr" not in header
        assert payload["grants"] == {"identity": "alice", "data_sync": {"service_sid": SERVICE_A}}
        assert token.expires_at - token.issued_at == dt.timedelta(hours=1)

    def test_validate_only_signs_nothing(self, make_client: MakeClient, shared_server: RunningServer) -> None:
        """validate_only returns the times with an empty token and token_id."""
        token = make_client(shared_server.port).issue_token("alice", validate_only=True)
        assert (token.token, token.token_id, token.identity) == ("", "", "alice")
        assert token.expires_at - token.issued_at == dt.timedelta(hours=1)

    def test_repr_leaves_the_token_out(
        self, make_client: MakeClient, shared_server: RunningServer, leak_watch: LeakWatch
    ) -> None:
        """Printing or logging an IssuedToken shows its token_id, never the token; and it cannot be changed."""
        token = make_client(shared_server.port).issue_token("alice")
        keep(leak_watch, token)
        assert token.token not in repr(token)
        assert token.token_id in repr(token)
        with pytest.raises(dataclasses.FrozenInstanceError):
            token.token = ""  # type: ignore[misc]


class TestWhoami:
    """whoami returns the caller id and its policy as plain values."""

    def test_known_caller(self, make_client: MakeClient, shared_server: RunningServer) -> None:
        """A caller under a prefix rule sees its id and that rule, TTLs as timedeltas."""
        assert make_client(shared_server.port, "chat_worker").whoami() == CallerIdentity(
            caller_id=CHAT_WORKER_ID,
            policy=CallerPolicy(
                matched_caller="spiffe://example.org/ns/chat/*",
                sync_service_sids=(SERVICE_B,),
                default_sync_service_sid=None,
                identity_pattern="user-[0-9]+",
                allowed_identity_characters="",
                default_ttl=dt.timedelta(minutes=10),
                max_ttl=dt.timedelta(minutes=30),
            ),
        )

    def test_defaults_inherited(self, make_client: MakeClient, shared_server: RunningServer) -> None:
        """A caller with its own default service and no pattern sees them so."""
        policy = make_client(shared_server.port, "bff").whoami().policy
        assert policy is not None
        assert (policy.default_sync_service_sid, policy.identity_pattern) == (SERVICE_A, None)
        assert (policy.default_ttl, policy.max_ttl) == (dt.timedelta(hours=1), dt.timedelta(hours=4))

    def test_unknown_caller(self, make_client: MakeClient, shared_server: RunningServer) -> None:
        """A caller outside the policy gets its id and None."""
        assert make_client(shared_server.port, "stranger").whoami() == CallerIdentity(STRANGER_ID, None)


class TestErrors:
    """Every failure is a SynctokenError subclass carrying the status's code, reason and details."""

    @pytest.mark.parametrize(
        ("kwargs", "violations"),
        [
            (
                {"identity": "a/b"},
                [
                    (
                        "identity",
                        "must not contain the URI-reserved character '/' unless the caller's policy allows them",
                    )
                ],
            ),
            ({"identity": "alice", "ttl": dt.timedelta(0)}, [("ttl", "0s is below the 3m minimum")]),
            (
                {"identity": "alice", "ttl": dt.timedelta(minutes=10, microseconds=5)},
                [("ttl", "must be a positive whole number of seconds")],
            ),
            (
                {"identity": "", "service_sid": "bad", "ttl": dt.timedelta(seconds=1), "region": "x"},
                [
                    ("identity", "must not be empty"),
                    ("sync.service_sid", "must be IS followed by 32 lower-case hex digits"),
                    ("ttl", "1s is below the 3m minimum"),
                    ("region", "must be a Twilio region such as us1, ie1 or au1"),
                ],
            ),
        ],
    )
    def test_invalid_request(
        self,
        make_client: MakeClient,
        shared_server: RunningServer,
        kwargs: dict[str, object],
        violations: list[tuple[str, str]],
    ) -> None:
        """INVALID_ARGUMENT is InvalidRequest with every BadRequest violation as (field, description)."""
        client = make_client(shared_server.port)
        error = failure(lambda: client.issue_token(**kwargs))  # type: ignore[arg-type]
        assert type(error) is InvalidRequest
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
        assert error.field_violations == violations
        assert error.message == "invalid request: " + "; ".join(f"{f}: {d}" for f, d in violations)
        assert error.retry_after is None

    @pytest.mark.parametrize(
        ("cert", "kwargs", "reason", "metadata"),
        [
            ("bff", {"service_sid": SERVICE_C}, "SERVICE_NOT_ALLOWED", {"callerId": BFF_ID, "serviceSid": SERVICE_C}),
            ("chat_worker", {"service_sid": SERVICE_B}, "IDENTITY_NOT_ALLOWED", {"callerId": CHAT_WORKER_ID}),
            ("stranger", {}, "CALLER_NOT_ALLOWED", {"callerId": STRANGER_ID}),
        ],
    )
    def test_permission_denied(
        self,
        make_client: MakeClient,
        shared_server: RunningServer,
        cert: str,
        kwargs: dict[str, Any],
        reason: str,
        metadata: dict[str, str],
    ) -> None:
        """PERMISSION_DENIED is PermissionDenied with the ErrorInfo reason and metadata."""
        client = make_client(shared_server.port, cert)
        error = failure(lambda: client.issue_token("alice", **kwargs))
        assert type(error) is PermissionDenied
        assert (error.code, error.reason, error.metadata) == (grpc.StatusCode.PERMISSION_DENIED, reason, metadata)
        assert list(error.metadata) == sorted(metadata)
        assert error.field_violations == []

    def test_unauthenticated(self, make_client: MakeClient, shared_server: RunningServer) -> None:
        """A certificate with no acceptable caller id is Unauthenticated with the server's reason and message."""
        error = failure(make_client(shared_server.port, "no_san").whoami)
        assert type(error) is Unauthenticated
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "CALLER_UNAUTHENTICATED")
        assert (
            error.message
            == "client certificate has no acceptable caller id: it must have exactly one URI SAN, a SPIFFE ID"
        )
        assert str(error) == f"UNAUTHENTICATED CALLER_UNAUTHENTICATED: {error.message}"

    def test_oversized_request_is_rate_limited(self, make_client: MakeClient, shared_server: RunningServer) -> None:
        """gRPC's own RESOURCE_EXHAUSTED (a request over 4 KiB) is RateLimited with no reason."""
        error = failure(lambda: make_client(shared_server.port).issue_token("a" * 5000))
        assert type(error) is RateLimited
        assert (error.code, error.reason, error.metadata, error.retry_after) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            None,
            {},
            None,
        )

    def test_retry_info_becomes_retry_after(self, make_client: MakeClient, pki: Pki) -> None:
        """A RetryInfo detail (synctoken sends none yet) is decoded into retry_after, beside the ErrorInfo."""

        def refuse(_request: bytes, context: grpc.ServicerContext) -> bytes:
            info, retry = any_pb2.Any(), any_pb2.Any()
            info.Pack(ErrorInfo(reason="RATE_LIMITED", domain="synctoken.v1", metadata={"callerId": BFF_ID}))
            retry.Pack(RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000)))
            status = Status(code=Code.RESOURCE_EXHAUSTED, message="slow down", details=[info, retry])
            context.abort_with_status(rpc_status.to_status(status))
            raise AssertionError  # abort_with_status raises

        server = ScriptedServer(pki, {"IssueToken": refuse})
        try:
            error = failure(lambda: make_client(server.port).issue_token("alice"))
        finally:
            server.close()
        assert type(error) is RateLimited
        assert (error.reason, error.message, error.metadata) == ("RATE_LIMITED", "slow down", {"callerId": BFF_ID})
        assert error.retry_after == dt.timedelta(seconds=2.5)

    def test_internal_is_the_base_class(
        self,
        make_client: MakeClient,
        harness: ServerHarness,
        write_config: WriteConfig,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A code with no class of its own (INTERNAL) is a plain SynctokenError."""
        path = write_config(config_text(harness.pki))
        break_signing(monkeypatch)
        server = harness.start_config(load_config(path, environ=SECRET_ENV))
        error = failure(lambda: make_client(server.port).issue_token("alice"))
        assert type(error) is SynctokenError
        assert (error.code, error.reason, error.message) == (grpc.StatusCode.INTERNAL, "INTERNAL", "internal error")


class _FullDiskLogger:
    """An audit logger whose every write fails as on a full disk; counts the tokens it was asked to record."""

    def __init__(self) -> None:
        self.issued = 0

    def info(self, _event: str, **fields: object) -> None:
        if fields.get("outcome") == "issued":
            self.issued += 1
        raise OSError(errno.ENOSPC, "No space left on device")


class TestRetries:
    """UNAVAILABLE is retried by gRPC from the service config; a late server is waited for, up to the deadline."""

    def test_unavailable_is_retried_then_raised(self, make_client: MakeClient, harness: ServerHarness) -> None:
        """AUDIT_UNAVAILABLE is tried maxAttempts times in one call, then raised as Unavailable with its reason."""
        logger = _FullDiskLogger()
        server = harness.start(audit_log=AuditLog(logger))
        error = failure(lambda: make_client(server.port).issue_token("alice"))
        assert type(error) is Unavailable
        assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "AUDIT_UNAVAILABLE")
        assert logger.issued == RETRY_POLICY["maxAttempts"] == 5

    def test_deadline(self, make_client: MakeClient) -> None:
        """With nothing listening, a call waits for a connection until its deadline, then raises Unavailable."""
        client = make_client(free_port(), timeout=0.5)
        started = time.monotonic()
        error = failure(client.whoami)
        assert 0.4 < time.monotonic() - started < 5
        assert type(error) is Unavailable
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED

    def test_server_started_late(self, make_client: MakeClient, harness: ServerHarness, leak_watch: LeakWatch) -> None:
        """A server that starts a second after the first call is connected to, and the call succeeds in its deadline."""
        port = free_port()
        client = make_client(port, timeout=10)
        sent = threading.Event()

        def call() -> tuple[float, object]:
            started = time.monotonic()
            sent.set()
            token = client.issue_token("alice")
            keep(leak_watch, token)
            return time.monotonic() - started, token

        with futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(call)
            sent.wait(timeout=5)
            time.sleep(1)
            harness.start(listen=f"127.0.0.1:{port}")
            elapsed, _ = pending.result(timeout=15)
        assert 1 <= elapsed < 10


class TestSettings:
    """Constructor arguments, SYNCTOKEN_* variables, the TLS name, and closing."""

    @pytest.mark.parametrize("asynchronous", [False, True])
    def test_from_env(self, pki: Pki, shared_server: RunningServer, asynchronous: bool) -> None:
        """from_env reads the target, the three files, the TLS name and the timeout from the variables."""
        paths = client_kwargs(pki, "chat_worker")
        environ = {
            "SYNCTOKEN_TARGET": f"127.0.0.1:{shared_server.port}",
            "SYNCTOKEN_CA_FILE": str(paths["ca_file"]),
            "SYNCTOKEN_CERT_FILE": str(paths["cert_file"]),
            "SYNCTOKEN_KEY_FILE": str(paths["key_file"]),
            "SYNCTOKEN_SERVER_NAME": "localhost",
            "SYNCTOKEN_TIMEOUT": "7.5",
        }

        async def ask_async() -> tuple[float, list[tuple[str, str | int]], str]:
            async with AsyncTokenClient.from_env(environ) as client:
                return client._timeout, client._options, (await client.whoami()).caller_id

        if asynchronous:
            timeout, options, caller = asyncio.run(ask_async())
        else:
            with TokenClient.from_env(environ) as client:
                timeout, options, caller = client._timeout, client._options, client.whoami().caller_id
        assert (timeout, caller) == (7.5, CHAT_WORKER_ID)
        assert ("grpc.ssl_target_name_override", "localhost") in options

    @pytest.mark.parametrize(
        ("missing_or_bad", "message"),
        [
            ({"SYNCTOKEN_TARGET": ""}, "SYNCTOKEN_TARGET is not set"),
            ({"SYNCTOKEN_KEY_FILE": ""}, "SYNCTOKEN_KEY_FILE is not set"),
            ({"SYNCTOKEN_TIMEOUT": "soon"}, "SYNCTOKEN_TIMEOUT must be a number of seconds above 0, not 'soon'"),
            ({"SYNCTOKEN_TIMEOUT": "0"}, "SYNCTOKEN_TIMEOUT must be a number of seconds above 0, not '0'"),
            ({"SYNCTOKEN_TIMEOUT": "inf"}, "SYNCTOKEN_TIMEOUT must be a number of seconds above 0, not 'inf'"),
        ],
    )
    def test_from_env_refuses(self, pki: Pki, missing_or_bad: dict[str, str], message: str) -> None:
        """A missing variable or a bad timeout is a ValueError naming the variable."""
        paths = client_kwargs(pki, "bff")
        environ = {
            "SYNCTOKEN_TARGET": "localhost:1",
            "SYNCTOKEN_CA_FILE": str(paths["ca_file"]),
            "SYNCTOKEN_CERT_FILE": str(paths["cert_file"]),
            "SYNCTOKEN_KEY_FILE": str(paths["key_file"]),
        } | missing_or_bad
        with pytest.raises(ValueError, match="^" + message.replace("(", r"\(") + "$"):
            TokenClient.from_env(environ)

    @pytest.mark.parametrize(("server_name", "works"), [("localhost", True), ("elsewhere.example", False)])
    def test_server_name(self, pki: Pki, shared_server: RunningServer, server_name: str, works: bool) -> None:
        """server_name is the name the server certificate is checked against, whatever the target says."""
        with TokenClient(
            f"127.0.0.1:{shared_server.port}", server_name=server_name, timeout=1, **client_kwargs(pki, "bff")
        ) as client:
            if works:
                assert client.whoami().caller_id == BFF_ID
            else:
                assert isinstance(failure(client.whoami), Unavailable)

    @pytest.mark.parametrize("timeout", [0, -1])
    def test_timeout_must_be_positive(self, pki: Pki, timeout: float) -> None:
        """A deadline of zero or less is refused at construction."""
        with pytest.raises(ValueError, match="timeout must be above 0 seconds"):
            TokenClient("localhost:1", timeout=timeout, **client_kwargs(pki, "bff"))

    def test_closed_client_refuses_calls(self, make_client: MakeClient, shared_server: RunningServer) -> None:
        """After close(), a call raises RuntimeError instead of reopening anything."""
        client = make_client(shared_server.port)
        client.whoami()
        client.close()
        with pytest.raises(RuntimeError, match="is closed"):
            client.whoami()
