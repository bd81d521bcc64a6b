"""The audit log: one record per decision, the right fields, never a secret or token, fail closed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from support.calls import rpc_error
from support.configs import POLICY_TOML, SECRET_ENV, WriteConfig, config_text
from support.constants import API_SECRET, BFF_ID, SERVICE_A, STRANGER_ID
from support.inprocess import Client, ServerHarness, break_signing
from support.logcapture import LogSink, chain_logger
from synctoken.v1 import token_service_pb2 as pb
from synctoken_server.audit.linesink import LineSink
from synctoken_server.audit.record import AuditLog
from synctoken_server.config.schema import load_config

REQUEST = pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant())


def decisions(sink: LogSink, start: int) -> list[dict[str, Any]]:
    """token.decision records written since line `start`."""
    return [r for r in sink.records(start) if r["event"] == "token.decision"]


class TestRecords:
    """What each decision writes."""

    def test_issued(self, harness: ServerHarness, log_sink: LogSink) -> None:
        """An issued token gets one record with the decision's fields and the token's fingerprint only."""
        client = harness.client(harness.start(), "bff")
        start = len(log_sink.lines)
        response = client.issue(REQUEST)
        [record] = decisions(log_sink, start)
        assert record["outcome"] == "issued"
        assert record["caller_id"] == BFF_ID
        assert record["identity"] == "alice"
        assert record["service_sid"] == SERVICE_A
        assert record["ttl"] == 3600
        assert record["region"] == ""
        assert record["token_id"] == response.token_id
        assert record["expires_at"] == response.expires_at.seconds
        assert record["rpc"] == "IssueToken"
        assert record["duration_ms"] >= 0
        assert record["level"] == "info"
        assert "token" not in record
        assert response.token not in log_sink.lines[-1]

    def test_denied(self, harness: ServerHarness, log_sink: LogSink) -> None:
        """A denial gets one record with the status code and reason."""
        client = harness.client(harness.start(), "stranger")
        start = len(log_sink.lines)
        rpc_error(lambda: client.issue(REQUEST))
        [record] = decisions(log_sink, start)
        assert record["outcome"] == "denied"
        assert record["code"] == "PERMISSION_DENIED"
        assert record["reason"] == "CALLER_NOT_ALLOWED"
        assert record["caller_id"] == STRANGER_ID
        assert "token_id" not in record

    def test_unauthenticated_denied(self, harness: ServerHarness, log_sink: LogSink) -> None:
        """A peer with no acceptable id is recorded as denied, with no caller id."""
        client = harness.client(harness.start(), "no_san")
        start = len(log_sink.lines)
        rpc_error(lambda: client.issue(REQUEST))
        [record] = decisions(log_sink, start)
        assert (record["outcome"], record["reason"]) == ("denied", "CALLER_UNAUTHENTICATED")
        assert "caller_id" not in record

    def test_validated(self, harness: ServerHarness, log_sink: LogSink) -> None:
        """validate_only is recorded as validated, without a token id."""
        client = harness.client(harness.start(), "bff")
        start = len(log_sink.lines)
        client.issue(pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant(), validate_only=True))
        [record] = decisions(log_sink, start)
        assert record["outcome"] == "validated"
        assert "token_id" not in record

    def test_context_does_not_leak_between_rpcs(self, harness: ServerHarness, log_sink: LogSink) -> None:
        """Fields bound for one RPC do not show up in the next one's record."""
        server = harness.start()
        harness.client(server, "bff").issue(REQUEST)
        start = len(log_sink.lines)
        harness.client(server, "stranger").whoami()
        [record] = [r for r in log_sink.records(start) if r["event"] == "caller.lookup"]
        assert record["caller_id"] == STRANGER_ID
        assert record["policy_rule"] is None
        assert "identity" not in record
        assert "service_sid" not in record


class TestFailClosed:
    """If the audit record cannot be written, no token leaves the server."""

    @pytest.fixture
    def full_disk_audit(self) -> Iterator[AuditLog]:
        """An audit log writing to /dev/full, where every write fails with ENOSPC."""
        with Path("/dev/full").open("wb") as full:
            logger = chain_logger(LineSink.for_fd(full.fileno()))
            yield AuditLog(logger)

    @pytest.mark.parametrize("validate_only", [False, True])
    def test_unwritable_audit_log(self, harness: ServerHarness, full_disk_audit: AuditLog, validate_only: bool) -> None:
        """The RPC fails UNAVAILABLE with AUDIT_UNAVAILABLE, and no token is returned."""
        client = harness.client(harness.start(audit_log=full_disk_audit), "bff")
        request = pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant(), validate_only=validate_only)
        error, info, _ = rpc_error(lambda: client.issue(request))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert info.reason == "AUDIT_UNAVAILABLE"
        assert error.details() == "the audit log cannot be written; no token was issued"


class TestUnexpectedFault:
    """A fault nobody planned for: INTERNAL to the caller, the traceback to the log."""

    def test_internal(
        self,
        harness: ServerHarness,
        log_sink: LogSink,
        write_config: WriteConfig,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A signing failure (here: a ValueError from the minter) gives a generic INTERNAL and a logged traceback."""
        path = write_config(config_text(harness.pki))
        # The loader and the minter refuse an unusable secret before serving, so the fault is injected.
        break_signing(monkeypatch)
        client = harness.client(harness.start_config(load_config(path, environ=SECRET_ENV)), "bff")
        start = len(log_sink.lines)
        error, info, _ = rpc_error(lambda: client.issue(REQUEST))
        assert error.code() == grpc.StatusCode.INTERNAL
        assert error.details() == "internal error"
        assert info.reason == "INTERNAL"
        [failure] = [r for r in log_sink.records(start) if r["event"] == "rpc.failed"]
        assert "Traceback" in failure["exception"]
        assert "ValueError" in failure["exception"]
        [record] = decisions(log_sink, start)
        assert (record["outcome"], record["code"]) == ("denied", "INTERNAL")


class TestSecretsStayOut:
    """The secret is not in reprs that end up in tracebacks or debug output."""

    def test_credentials_repr(self, harness: ServerHarness, write_config: WriteConfig) -> None:
        """Neither the config nor the credentials print the API secret or the TLS key."""
        path = write_config(config_text(harness.pki))
        config = load_config(path, environ=SECRET_ENV)
        assert API_SECRET not in repr(config)
        assert "PRIVATE KEY" not in repr(config)
        assert API_SECRET not in str(config.credentials)


AUDITED_EVENTS = ("token.decision", "caller.lookup")
LIMITED_BFF = POLICY_TOML.replace(f'id = "{BFF_ID}"', f'id = "{BFF_ID}"\nrate = 0.01\nburst = 1', 1)
SHADOW_LIMITED_BFF = LIMITED_BFF.replace("burst = 1", "burst = 1\nshadow = true", 1)
MALFORMED = b"\x0a\x05ab"
"""No message at all: a field that claims five bytes and has two."""


class _FailsOnce:
    """An audit logger whose first write fails, as a full disk's would, and which keeps every later record."""

    def __init__(self) -> None:
        self.failed = False
        self.records: list[dict[str, object]] = []

    def info(self, event: str, **fields: object) -> None:
        if not self.failed:
            self.failed = True
            raise OSError(28, "No space left on device")
        self.records.append({**fields, "event": event})


def _raw(client: Client, method: str) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    return client.channel.unary_unary(f"/synctoken.v1.TokenService/{method}")


def _call(call: Callable[[], object]) -> None:
    """Make the call; a refusal is part of what is being recorded, not a failure."""
    with contextlib.suppress(grpc.RpcError):
        call()


# Each scenario: the policy to serve (None: the suite's), the client's certificate, and the calls
# to make; only the last call's record is looked at, the ones before set the scene.
_SCENARIOS: dict[str, tuple[str | None, str | None, Callable[[Client], list[Callable[[], object]]]]] = {
    "issued": (None, "bff", lambda c: [lambda: c.issue(REQUEST)]),
    "validated": (
        None,
        "bff",
        lambda c: [lambda: c.issue(pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant(), validate_only=True))],
    ),
    "caller not allowed": (None, "stranger", lambda c: [lambda: c.issue(REQUEST)]),
    "unauthenticated": (None, "foreign_trust_domain", lambda c: [lambda: c.issue(REQUEST)]),
    "invalid request": (None, "bff", lambda c: [lambda: c.issue(pb.IssueTokenRequest(identity=""))]),
    "malformed request": (None, "bff", lambda c: [lambda: _raw(c, "IssueToken")(MALFORMED, timeout=10)]),
    "rate limited": (LIMITED_BFF, "bff", lambda c: [lambda: c.issue(REQUEST)] * 2),
    "shadow limited": (SHADOW_LIMITED_BFF, "bff", lambda c: [lambda: c.issue(REQUEST)] * 2),
    "lookup answered": (None, "bff", lambda c: [c.whoami]),
    "lookup of an unknown caller": (None, "stranger", lambda c: [c.whoami]),
    "lookup unauthenticated": (None, "foreign_trust_domain", lambda c: [c.whoami]),
    "lookup malformed": (None, "bff", lambda c: [lambda: _raw(c, "GetCallerIdentity")(MALFORMED, timeout=10)]),
}
_RECORD_START = ["rpc", "peer"]
_ASKED = ["caller_id", "identity", "service_sid", "region"]
_DENIED = ["outcome", "code", "reason", "message"]
_WRITTEN = ["duration_ms", "event", "level", "timestamp"]
_EXPECTED: dict[str, tuple[str, str, list[str]]] = {
    "issued": ("token.decision", "issued", [*_ASKED, "outcome", "ttl", "token_id", "expires_at"]),
    "validated": ("token.decision", "validated", [*_ASKED, "outcome", "ttl"]),
    "caller not allowed": ("token.decision", "denied", [*_ASKED, *_DENIED]),
    "unauthenticated": ("token.decision", "denied", [*_DENIED, "presented_san"]),
    "invalid request": ("token.decision", "denied", [*_ASKED, *_DENIED]),
    "malformed request": ("token.decision", "denied", ["caller_id", *_DENIED]),
    "rate limited": ("token.decision", "denied", [*_ASKED, *_DENIED, "limit", "retry_after_ms"]),
    "shadow limited": ("token.decision", "issued", [*_ASKED, "outcome", "ttl", "token_id", "expires_at"]),
    "lookup answered": ("caller.lookup", "answered", ["caller_id", "outcome", "policy_rule"]),
    "lookup of an unknown caller": ("caller.lookup", "answered", ["caller_id", "outcome", "policy_rule"]),
    "lookup unauthenticated": ("caller.lookup", "denied", [*_DENIED, "presented_san"]),
    "lookup malformed": ("caller.lookup", "denied", ["caller_id", *_DENIED]),
}


class TestOneRecordPerDecision:
    """Every RPC that decides writes exactly one audit record (structlog's canonical log line), its fields in one order."""

    @pytest.mark.parametrize("scenario", list(_SCENARIOS))
    def test_each_outcome(self, harness: ServerHarness, log_sink: LogSink, scenario: str) -> None:
        """Whatever the outcome, the last call wrote one record: the expected event, outcome and fields, in order."""
        policy, cert, calls = _SCENARIOS[scenario]
        server = harness.start(config_text(harness.pki, policy=policy) if policy else None)
        *setup, call = calls(harness.client(server, cert))
        for earlier in setup:
            _call(earlier)
        start = len(log_sink.lines)
        _call(call)
        [record] = [r for r in log_sink.records(start) if r["event"] in AUDITED_EVENTS]
        event, outcome, fields = _EXPECTED[scenario]
        assert (record["event"], record["outcome"]) == (event, outcome)
        assert list(record) == [*_RECORD_START, *fields, *_WRITTEN]

    def test_shadow_limit_adds_its_warning_only(self, harness: ServerHarness, log_sink: LogSink) -> None:
        """A shadow limit's refusal is one warning beside the one record, with what was asked for, before it."""
        client = harness.client(harness.start(config_text(harness.pki, policy=SHADOW_LIMITED_BFF)), "bff")
        client.issue(REQUEST)
        start = len(log_sink.lines)
        client.issue(REQUEST)
        records = log_sink.records(start)
        assert [r["event"] for r in records] == ["rate_limit.shadow", "token.decision"]
        assert list(records[0]) == [
            *_RECORD_START,
            *_ASKED,
            "policy_rule",
            "limit",
            "message",
            "event",
            "level",
            "timestamp",
        ]

    def test_unwritable_record_gives_the_refusals_record_only(self, harness: ServerHarness) -> None:
        """If the issued record cannot be written, the one record written is the refusal's (fail closed)."""
        logger = _FailsOnce()
        client = harness.client(harness.start(audit_log=AuditLog(logger)), "bff")
        _, info, _ = rpc_error(lambda: client.issue(REQUEST))
        assert info.reason == "AUDIT_UNAVAILABLE"
        [record] = logger.records
        assert (record["outcome"], record["reason"]) == ("denied", "AUDIT_UNAVAILABLE")
        assert record["service_sid"] == ""  # what was asked for: the record of a grant was never written
        assert "token_id" not in record
