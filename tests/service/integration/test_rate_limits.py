"""Rate limits end to end: real servers, real mTLS, RetryInfo and QuotaFailure as a client sees them.

Every load is bounded in calls; no assertion depends on how fast anything ran.
"""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.rpc.error_details_pb2 import ErrorInfo, QuotaFailure, RetryInfo
from grpc_status import rpc_status

from support.calls import channel, rpc_error
from support.configs import POLICY_TOML, config_text
from support.constants import BFF_ID, CHAT_WORKER_ID, SERVICE_B
from support.files import replace_file
from support.inprocess import Client, ServerHarness
from support.logcapture import LeakWatch, LogSink
from support.pki import Pki
from support.processes import Process, free_port, serve
from synctoken.v1 import token_service_pb2 as pb
from synctoken.v1 import token_service_pb2_grpc
from synctoken_server.policy.limits import TABLE_FULL_SUBJECT, identity_digest

BFF_LIMIT = f'id = "{BFF_ID}"'
CHAT_LIMIT = 'default_ttl = "10m"'  # only the chat/* entry sets this
MAX_CALLS = 50
"""No test makes more calls than this to run a bucket dry."""


def policy(bff: str = "", chat: str = "", top: str = "") -> str:
    """The suite's policy with limit lines added to the BFF and chat/* entries, and `top` before them."""
    text = POLICY_TOML.replace(BFF_LIMIT, f"{BFF_LIMIT}\n{bff}", 1).replace(CHAT_LIMIT, f"{CHAT_LIMIT}\n{chat}", 1)
    return f"{top}\n{text}"


def ask(identity: str = "alice", service: str = "") -> pb.IssueTokenRequest:
    """An IssueTokenRequest the BFF's policy allows (and the chat workers', with SERVICE_B)."""
    return pb.IssueTokenRequest(identity=identity, sync=pb.SyncGrant(service_sid=service))


def details(error: grpc.RpcError) -> tuple[ErrorInfo, RetryInfo, QuotaFailure]:
    """The ErrorInfo, RetryInfo and QuotaFailure of a refusal, in that order (and nothing else)."""
    status = rpc_status.from_call(error)
    assert status is not None
    info, retry, quota = ErrorInfo(), RetryInfo(), QuotaFailure()
    assert len(status.details) == 3
    for detail, message in zip(status.details, (info, retry, quota), strict=True):
        assert detail.Unpack(message)
    return info, retry, quota


def until_refused(client: Client, request: pb.IssueTokenRequest) -> tuple[int, grpc.RpcError]:
    """Issue until the first refusal (at most MAX_CALLS calls); how many succeeded, and the refusal."""
    for succeeded in range(MAX_CALLS):
        try:
            client.issue(request)
        except grpc.RpcError as exc:
            return succeeded, exc
    pytest.fail(f"no refusal in {MAX_CALLS} calls")


class TestCallerLimit:
    """A caller over its rate: RESOURCE_EXHAUSTED, RATE_LIMITED, RetryInfo, QuotaFailure."""

    def test_over_limit_then_after_delay(self, harness: ServerHarness, pki: Pki) -> None:
        """The burst goes through; then a refusal whose RetryInfo delay, waited out, lets the next call through."""
        server = harness.start(config_text(pki, policy=policy(bff="rate = 1\nburst = 3")))
        client = harness.client(server, "bff")
        succeeded, error = until_refused(client, ask())
        assert succeeded >= 3
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info, retry, quota = details(error)
        assert (info.domain, info.reason) == ("synctoken.v1", "RATE_LIMITED")
        assert info.metadata["quotaSubject"] == f"caller:{BFF_ID}"
        delay = retry.retry_delay.ToTimedelta().total_seconds()
        assert 0 < delay <= 1
        [violation] = quota.violations
        assert violation.subject == f"caller:{BFF_ID}"
        time.sleep(delay)
        assert client.issue(ask()).token

    def test_validate_only_counts(self, harness: ServerHarness, pki: Pki) -> None:
        """validate_only requests use up the limit too: they are cheap to send in a loop."""
        server = harness.start(config_text(pki, policy=policy(bff="rate = 0.01\nburst = 2")))
        client = harness.client(server, "bff")
        check = pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant(), validate_only=True)
        succeeded, error = until_refused(client, check)
        assert succeeded == 2
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    def test_refusal_is_audited(self, harness: ServerHarness, pki: Pki, log_sink: LogSink) -> None:
        """The refusal is a denied decision in the audit log, naming the limit; the identity is not in the limit."""
        server = harness.start(config_text(pki, policy=policy(bff="rate = 0.01\nburst = 1")))
        client = harness.client(server, "bff")
        client.issue(ask())
        start = len(log_sink.lines)
        rpc_error(lambda: client.issue(ask()))
        [record] = [r for r in log_sink.records(start) if r["event"] == "token.decision"]
        assert (record["outcome"], record["code"], record["reason"]) == ("denied", "RESOURCE_EXHAUSTED", "RATE_LIMITED")
        assert record["limit"] == f"caller:{BFF_ID}"
        assert record["retry_after_ms"] > 0

    def test_unlimited_caller_untouched(self, harness: ServerHarness, pki: Pki) -> None:
        """A limit on one entry does not touch the others."""
        server = harness.start(config_text(pki, policy=policy(chat="rate = 0.01\nburst = 1")))
        client = harness.client(server, "bff")
        for _ in range(10):
            assert client.issue(ask()).token


class TestIdentityLimit:
    """A caller may not mint too many tokens for one end user."""

    def test_per_identity(self, harness: ServerHarness, pki: Pki) -> None:
        """One identity over its limit is refused, naming it by digest; another identity still gets tokens."""
        server = harness.start(config_text(pki, policy=policy(chat="identity_rate = 0.01\nidentity_burst = 2")))
        client = harness.client(server, "chat_worker")
        succeeded, error = until_refused(client, ask("user-1", SERVICE_B))
        assert succeeded == 2
        _, _, quota = details(error)
        assert quota.violations[0].subject == f"identity:{CHAT_WORKER_ID}/{identity_digest('user-1')}"
        assert "user-1" not in str(error.details())
        assert client.issue(ask("user-2", SERVICE_B)).token


class TestBucketTable:
    """The bucket table: refused requests leave nothing in it, and no flood of identities resets a drained one."""

    TABLE = 8
    HOURLY = "identity_rate = 0.000278\nidentity_burst = 1"  # one token an hour
    VICTIM = "user-0"

    def test_drained_identity_outlives_a_flood(self, harness: ServerHarness, pki: Pki) -> None:
        """Once the table is full of live buckets, new identities are refused, and the drained one stays drained."""
        server = harness.start(config_text(pki, policy=policy(chat=self.HOURLY)), max_buckets=self.TABLE)
        client = harness.client(server, "chat_worker")
        succeeded, _ = until_refused(client, ask(self.VICTIM, SERVICE_B))
        assert succeeded == 1
        others = [ask(f"user-{i}", SERVICE_B) for i in range(1, 3 * self.TABLE)]
        outcomes = [code_of(functools.partial(client.issue, other)) for other in others]
        error = rpc_error(lambda: client.issue(ask(self.VICTIM, SERVICE_B)))[0]
        _, _, quota = details(error)
        assert quota.violations[0].subject == f"identity:{CHAT_WORKER_ID}/{identity_digest(self.VICTIM)}"
        assert outcomes.count(grpc.StatusCode.OK) == self.TABLE - 1
        assert server.buckets == self.TABLE
        error = rpc_error(lambda: client.issue(ask("user-999", SERVICE_B)))[0]
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info, retry, quota = details(error)
        assert (info.reason, info.metadata["quotaSubject"]) == ("RATE_LIMITED", TABLE_FULL_SUBJECT)
        assert retry.retry_delay.ToTimedelta().total_seconds() > 0
        assert quota.violations[0].subject == TABLE_FULL_SUBJECT

    def test_refused_requests_make_no_buckets(self, harness: ServerHarness, pki: Pki) -> None:
        """A caller over its own limit sends new identities: each is refused, and none gets a bucket."""
        limits = "rate = 0.001\nburst = 1\nidentity_rate = 1\nidentity_burst = 5"
        server = harness.start(config_text(pki, policy=policy(bff=limits)), max_buckets=self.TABLE)
        client = harness.client(server, "bff")
        assert client.issue(ask()).token
        assert server.buckets == 2
        for i in range(3 * self.TABLE):
            _, info, _ = rpc_error(functools.partial(client.issue, ask(f"user-{i}")))
            assert info.metadata["quotaSubject"] == f"caller:{BFF_ID}"
        assert server.buckets == 2


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code a call ends with."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


class TestShadow:
    """Shadow mode: count and log what would be refused, refuse nothing."""

    @pytest.mark.parametrize(
        ("bff", "top"),
        [("rate = 0.01\nburst = 1\nshadow = true", ""), ("rate = 0.01\nburst = 1", "[limits]\nshadow = true")],
    )
    def test_refuses_nothing(self, harness: ServerHarness, pki: Pki, log_sink: LogSink, bff: str, top: str) -> None:
        """Every call succeeds; each that would have been refused is logged, per caller or globally."""
        server = harness.start(config_text(pki, policy=policy(bff=bff, top=top)))
        client = harness.client(server, "bff")
        start = len(log_sink.lines)
        for _ in range(4):
            assert client.issue(ask()).token
        shadows = [r for r in log_sink.records(start) if r["event"] == "rate_limit.shadow"]
        assert len(shadows) == 3
        assert {r["limit"] for r in shadows} == {f"caller:{BFF_ID}"}


class TestReload:
    """Limits are config: a reload changes them in the running server."""

    def test_limit_added_and_removed(
        self, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """A reloaded file adds a limit, which then refuses; removing it again lets calls through."""
        port = free_port()
        process = serve(config_text(pki, listen=f"127.0.0.1:{port}"), tmp_path, leak_watch, processes)
        path = tmp_path / "synctoken.toml"

        def issue() -> grpc.StatusCode:
            with channel(pki, port) as ch:
                try:
                    leak_watch.tokens.add(
                        token_service_pb2_grpc.TokenServiceStub(ch).IssueToken(ask(), timeout=10).token
                    )
                except grpc.RpcError as exc:
                    return exc.code()
            return grpc.StatusCode.OK

        assert [issue() for _ in range(3)] == [grpc.StatusCode.OK] * 3
        limited = config_text(pki, listen=f"127.0.0.1:{port}", policy=policy(bff="rate = 0.01\nburst = 1"))
        replace_file(path, limited.encode())
        process.wait_for_records("config.reloaded")
        assert [issue() for _ in range(2)] == [grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]
        replace_file(path, config_text(pki, listen=f"127.0.0.1:{port}").encode())
        process.wait_for_records("config.reloaded", 2)
        assert issue() == grpc.StatusCode.OK

    @pytest.mark.parametrize(
        "change",
        [
            # The old rate would refill the 30 in 3 s; the new one keeps what came back before the reload.
            ("rate = 10\nburst = 30", "rate = 0.001\nburst = 30", 0.0, 3.5),
            # 3.5 s at the new rate would be a whole burst; before the reload the bucket refilled at the old one.
            ("rate = 0.001\nburst = 30", "rate = 10\nburst = 30", 3.5, 0.0),
        ],
        ids=["rate lowered", "rate raised"],
    )
    def test_no_fresh_burst_on_sighup(
        self,
        pki: Pki,
        tmp_path: Path,
        leak_watch: LeakWatch,
        processes: list[Process],
        change: tuple[str, str, float, float],
    ) -> None:
        """A drained caller, its rate changed by SIGHUP: it gets back what each rate refilled, never a fresh burst.

        `change`: the old limit, the new one, and how long to wait before the reload and after it. Waiting is
        how the time for refilling passes; no assertion is on how long anything took.
        """
        old, new, before, after = change
        port = free_port()

        def text(limits: str) -> str:
            written = config_text(pki, listen=f"127.0.0.1:{port}", policy=policy(bff=limits))
            return written.replace("[server]\n", '[server]\nwatch_interval = "0s"\n', 1)

        process = serve(text(old), tmp_path, leak_watch, processes)
        with channel(pki, port) as ch:
            stub = token_service_pb2_grpc.TokenServiceStub(ch)

            def granted() -> int:
                """Calls that go through before the first refusal."""
                for count in range(100):
                    code = code_of(lambda: leak_watch.tokens.add(stub.IssueToken(ask(), timeout=10).token))
                    if code != grpc.StatusCode.OK:
                        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                        return count
                pytest.fail("no refusal in 100 calls")

            assert granted() >= 30
            time.sleep(before)
            replace_file(tmp_path / "synctoken.toml", text(new).encode())
            process.proc.send_signal(signal.SIGHUP)
            process.wait_for_records("config.reloaded")
            time.sleep(after)
            assert granted() < 30
