"""Global rate limits in a real redis-server: shared by servers and workers, and what happens while Redis is away."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.rpc.error_details_pb2 import QuotaFailure, RetryInfo
from grpc_status import rpc_status

from support.calls import channel, rpc_error
from support.configs import SECRET_ENV, config_text
from support.constants import BFF_ID, SERVICE_A
from support.inprocess import Client, RunningServer, ServerHarness
from support.logcapture import LeakWatch, LogSink
from support.pki import Pki
from support.processes import Process, check_config, free_port, serve
from support.redisserver import RedisServer, RedisTls
from synctoken.v1 import token_service_pb2 as pb
from synctoken.v1 import token_service_pb2_grpc
from synctoken_server.config.schema import load_config
from synctoken_server.durations import format_milliseconds, parse_milliseconds
from synctoken_server.policy.limitbackend import Breaker
from synctoken_server.policy.limits import identity_digest
from synctoken_server.process.reloading import restart_only

SLOW_CALL = 1.0
"""A call while Redis hangs takes its timeout (200 ms there) plus a little; this is far above that, not a timing goal."""


def request(identity: str = "alice", *, validate_only: bool = False) -> pb.IssueTokenRequest:
    """An IssueToken request for `identity` (the caller's default Sync service)."""
    return pb.IssueTokenRequest(identity=identity, sync=pb.SyncGrant(), validate_only=validate_only)


def limited(
    pki: Pki,
    redis: RedisServer | None,
    limits: str,
    *,
    url: str | None = None,
    redis_keys: str = "",
    limits_keys: str = "",
) -> str:
    """A config whose one caller (the BFF) has `limits` (rate keys), kept in `redis`.

    Redis calls time out after 250 ms (room for a busy machine: a slow answer would fall back and change
    the count), and 3 failures in a row open the breaker for 1 s, unless `redis_keys` says.
    """
    for line in ('timeout = "250ms"', "breaker_failures = 3", 'breaker_cooldown = "1s"'):
        if line.split(" = ")[0] not in redis_keys:
            redis_keys += f"\n{line}"
    policy = f"""
[[callers]]
id = "{BFF_ID}"
sync_services = ["{SERVICE_A}"]
default_sync_service = "{SERVICE_A}"
{limits}

[limits]
backend = "redis"
{limits_keys}

[limits.redis]
url = "{url or (redis.url if redis else "")}"
{redis_keys}

[metrics]
listen = "127.0.0.1:0"
"""
    return config_text(pki, policy=policy)


def ok_count(client: Client | Callable[[], Client], calls: int, identity: str = "alice") -> int:
    """How many of `calls` IssueToken calls went through; every other one must be RATE_LIMITED."""
    granted, refused = 0, []
    for _ in range(calls):
        target = client() if callable(client) else client
        try:
            target.issue(request(identity))
        except grpc.RpcError as exc:
            refused.append(exc.code())
        else:
            granted += 1
    assert set(refused) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}, refused
    return granted


CONCURRENT_CALLS = 60
"""Calls made at once: many more than the burst, enough for checks to meet in the batch window."""


def concurrent_verdicts(clients: list[Client], identities: list[str]) -> dict[str, grpc.StatusCode]:
    """One IssueToken call per identity, all started before any is awaited, spread over `clients`: each status."""
    futures = [
        (name, clients[i % len(clients)], clients[i % len(clients)].stub.IssueToken.future(request(name), timeout=10))
        for i, name in enumerate(identities)
    ]
    verdicts: dict[str, grpc.StatusCode] = {}
    for name, client, future in futures:
        try:
            response = future.result()
        except grpc.RpcError as exc:
            verdicts[name] = exc.code()
        else:
            client.watch.tokens.add(response.token)  # for the session's leak check, as Client.issue does
            verdicts[name] = grpc.StatusCode.OK
    return verdicts


def alternating(*clients: Client) -> Callable[[], Client]:
    """Each call to the next client in turn."""
    turn = iter(range(1_000_000))
    return lambda: clients[next(turn) % len(clients)]


def sample(server: RunningServer, name: str, labels: dict[str, str] | None = None) -> float:
    """A metric's value in the server's registry (0 when not counted yet)."""
    registry = server.token_server.metrics.registry
    assert registry is not None
    return registry.get_sample_value(name, labels or {}) or 0.0


def errors(server: RunningServer) -> float:
    """Every failed call to Redis the server counted, whatever the kind."""
    kinds = ("timeout", "connection", "auth", "error")
    return sum(sample(server, "synctoken_ratelimit_backend_errors_total", {"kind": kind}) for kind in kinds)


class TestGlobalLimit:
    """Two servers sharing one Redis share one limit."""

    def test_burst_is_shared(self, harness: ServerHarness, redis_server: RedisServer) -> None:
        """Calls alternating between two servers get the burst once in all, not once per server."""
        text = limited(harness.pki, redis_server, "rate = 0.01\nburst = 5")
        one, two = harness.start(text), harness.start(text)
        clients = alternating(harness.client(one, "bff"), harness.client(two, "bff"))
        assert ok_count(clients, 12) == 5

    def test_rate_is_shared(self, harness: ServerHarness, redis_server: RedisServer) -> None:
        """After the burst, two servers together refill at the rate, not twice it."""
        text = limited(harness.pki, redis_server, "rate = 4\nburst = 2")
        one, two = harness.start(text), harness.start(text)
        clients = alternating(harness.client(one, "bff"), harness.client(two, "bff"))
        ok_count(clients, 6)  # the burst, and whatever refilled meanwhile
        time.sleep(1.0)
        # 1 s at 4/s is 4 tokens (the burst caps it at 2 only while full: 2 + refill while calling);
        # per server it would be 2 x 2. One token of slack for the calls' own time.
        granted = ok_count(clients, 8)
        assert 2 <= granted <= 3

    def test_identity_limit_is_shared(self, harness: ServerHarness, redis_server: RedisServer) -> None:
        """The per-identity limit holds across servers, for each identity on its own."""
        text = limited(harness.pki, redis_server, "identity_rate = 0.01\nidentity_burst = 2")
        one, two = harness.start(text), harness.start(text)
        clients = alternating(harness.client(one, "bff"), harness.client(two, "bff"))
        assert ok_count(clients, 5, "alice") == 2
        assert ok_count(clients, 5, "bob") == 2

    def test_concurrent_calls_share_the_burst_exactly(self, harness: ServerHarness, redis_server: RedisServer) -> None:
        """Calls made all at once on two servers (checks sharing writes in the window) get the burst exactly."""
        text = limited(harness.pki, redis_server, "rate = 0.01\nburst = 25")
        one, two = harness.start(text), harness.start(text)
        clients = [harness.client(one, "bff"), harness.client(two, "bff")]
        verdicts = concurrent_verdicts(clients, [f"user-{i}" for i in range(CONCURRENT_CALLS)])
        assert set(verdicts.values()) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, verdicts
        assert list(verdicts.values()).count(grpc.StatusCode.OK) == 25

    def test_concurrent_calls_get_their_own_verdicts(self, harness: ServerHarness, redis_server: RedisServer) -> None:
        """Spent and fresh identities called all at once on two servers: each call gets its own identity's verdict."""
        text = limited(harness.pki, redis_server, "identity_rate = 0.01\nidentity_burst = 1")
        one, two = harness.start(text), harness.start(text)
        clients = [harness.client(one, "bff"), harness.client(two, "bff")]
        half = CONCURRENT_CALLS // 2
        for i in range(half):
            assert ok_count(clients[i % 2], 1, f"spent-{i}") == 1
        identities = [name for i in range(half) for name in (f"spent-{i}", f"fresh-{i}")]
        verdicts = concurrent_verdicts(clients, identities)
        expected = {
            name: grpc.StatusCode.RESOURCE_EXHAUSTED if name.startswith("spent") else grpc.StatusCode.OK
            for name in identities
        }
        assert verdicts == expected

    def test_retry_info_and_subjects(self, harness: ServerHarness, redis_server: RedisServer) -> None:
        """A refusal says which limit, by the identity's digest, and how long until a token: Redis's time."""
        text = limited(harness.pki, redis_server, "rate = 0.5\nburst = 1\nidentity_rate = 0.25\nidentity_burst = 1")
        client = harness.client(harness.start(text), "bff")
        client.issue(request("alice"))
        error, info, _ = rpc_error(lambda: client.issue(request("alice")))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.reason == "RATE_LIMITED"
        retry, quota = RetryInfo(), QuotaFailure()
        status = rpc_status.from_call(error)
        assert status is not None
        assert status.details[1].Unpack(retry)
        assert status.details[2].Unpack(quota)
        assert quota.violations[0].subject == f"caller:{BFF_ID}"
        assert 1.5 <= retry.retry_delay.ToMilliseconds() / 1000 <= 2.0
        time.sleep(retry.retry_delay.ToMilliseconds() / 1000)
        # The caller bucket has a token again; the identity's (0.25/s) does not yet.
        error, _, _ = rpc_error(lambda: client.issue(request("alice")))
        status = rpc_status.from_call(error)
        assert status is not None
        assert status.details[2].Unpack(quota)
        assert quota.violations[0].subject == f"identity:{BFF_ID}/{identity_digest('alice')}"
        assert status.details[1].Unpack(retry)
        assert 1.5 <= retry.retry_delay.ToMilliseconds() / 1000 <= 2.0

    def test_refusal_takes_nothing(self, harness: ServerHarness, redis_server: RedisServer) -> None:
        """A request one limit refuses takes nothing from the other: both buckets or neither."""
        text = limited(harness.pki, redis_server, "rate = 0.01\nburst = 3\nidentity_rate = 0.01\nidentity_burst = 1")
        client = harness.client(harness.start(text), "bff")
        assert ok_count(client, 4, "alice") == 1  # three refused by alice's limit take nothing from the caller's
        assert ok_count(client, 1, "bob") == 1
        assert ok_count(client, 1, "carol") == 1
        assert ok_count(client, 1, "dave") == 0  # the caller's 3 are gone

    def test_validate_only_counts(self, harness: ServerHarness, redis_server: RedisServer) -> None:
        """validate_only takes a token, as a real request does."""
        text = limited(harness.pki, redis_server, "rate = 0.01\nburst = 2")
        client = harness.client(harness.start(text), "bff")
        assert client.issue(request(validate_only=True)).token == ""
        assert client.issue(request(validate_only=True)).token == ""
        assert ok_count(client, 1) == 0

    def test_shadow_refuses_nothing(self, harness: ServerHarness, redis_server: RedisServer, log_sink: LogSink) -> None:
        """A shadow limit lets every request through and logs and counts those it would refuse."""
        text = limited(harness.pki, redis_server, "rate = 0.01\nburst = 2\nshadow = true")
        server = harness.start(text)
        start = len(log_sink.lines)
        assert ok_count(harness.client(server, "bff"), 5) == 5
        shadowed = [r for r in log_sink.records(start) if r["event"] == "rate_limit.shadow"]
        assert len(shadowed) == 3
        assert shadowed[0]["limit"] == f"caller:{BFF_ID}"
        assert sample(server, "synctoken_rate_limited_total", {"caller": BFF_ID, "shadow": "true"}) == 3

    def test_keys_are_tagged_hashed_and_expire(self, harness: ServerHarness, redis_server: RedisServer) -> None:
        """Each key has the caller's hash tag, no raw identity, and a TTL no longer than a full refill."""
        identity = "raw-identity-4711"
        text = limited(harness.pki, redis_server, "rate = 2\nburst = 4\nidentity_rate = 1\nidentity_burst = 3")
        client = harness.client(harness.start(text), "bff")
        client.issue(request(identity))
        keys = redis_server.keys()
        assert keys == sorted(
            [f"synctoken:{{{BFF_ID}}}:caller", f"synctoken:{{{BFF_ID}}}:identity:{identity_digest(identity)}"]
        )
        looking = redis_server.client()
        for key in keys:
            assert identity not in key
            assert "4711" not in key
            # One token taken: full again after 1/rate seconds (0.5 s and 1 s).
            assert 0 < looking.pttl(key) <= 1000
        time.sleep(1.1)
        assert redis_server.keys() == []

    def test_reload_and_restart_keep_state(self, harness: ServerHarness, redis_server: RedisServer) -> None:
        """A new server on the same Redis (a restart, or a replica) finds the buckets as they were."""
        text = limited(harness.pki, redis_server, "rate = 0.01\nburst = 2")
        first = harness.start(text)
        assert ok_count(harness.client(first, "bff"), 1) == 1
        first.close()
        assert ok_count(harness.client(harness.start(text), "bff"), 3) == 1


class TestWorkers:
    """`synctoken serve --workers 2` with Redis: the workers share the whole limit, and SIGHUP keeps the state."""

    @pytest.mark.slow
    def test_workers_share_the_global_limit(
        self,
        pki: Pki,
        tmp_path: Path,
        leak_watch: LeakWatch,
        processes: list[Process],
        redis_server: RedisServer,
    ) -> None:
        """Across two workers the burst is given once, a reload keeps what was taken; without Redis, half each."""
        # Each worker alone would allow half: 3 (locally 6/2). Globally, 6 in all.
        text = limited(pki, redis_server, "rate = 0.01\nburst = 6").replace(
            'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{free_port()}"', 1
        )
        process = serve(text, tmp_path, leak_watch, processes, workers=2)
        port = int(text.split('listen = "127.0.0.1:', 1)[1].split('"', 1)[0])

        def fresh_calls(count: int) -> int:
            # A new connection per call: the kernel spreads them over both workers.
            granted, refused = 0, []
            for _ in range(count):
                with channel(pki, port) as ch:
                    try:
                        token_service_pb2_grpc.TokenServiceStub(ch).IssueToken(request(), timeout=10)
                    except grpc.RpcError as exc:
                        refused.append(exc.code())
                    else:
                        granted += 1
            assert set(refused) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}, refused
            return granted

        assert fresh_calls(4) == 4
        process.proc.send_signal(signal.SIGHUP)
        process.wait_for_records("config.reloaded", 2)
        assert fresh_calls(6) == 2
        # Redis gone: the fallback is this process's share. One connection reaches one worker: 6 / 2.
        redis_server.kill()
        with channel(pki, port) as ch:
            stub = token_service_pb2_grpc.TokenServiceStub(ch)
            granted = 0
            for _ in range(6):
                with contextlib.suppress(grpc.RpcError):
                    stub.IssueToken(request(), timeout=10)
                    granted += 1
        assert granted == 3
        assert process.terminate() == 0


class TestRedisAway:
    """Redis hung, dead or refusing: calls stay fast and fall back as configured; Redis back, limits global again."""

    def test_hung_redis_costs_the_timeout_then_nothing(self, harness: ServerHarness, redis_server: RedisServer) -> None:
        """SIGSTOP: each call waits at most about the timeout, the breaker then skips Redis; SIGCONT: global again."""
        # 200 ms, not less: after SIGCONT the probe opens a new connection (TCP, AUTH, the script) within it,
        # which a loaded CI machine can take longer than 50 ms to schedule.
        text = limited(harness.pki, redis_server, "rate = 0.01\nburst = 3", redis_keys='timeout = "200ms"')
        one, two = harness.start(text), harness.start(text)
        client, other = harness.client(one, "bff"), harness.client(two, "bff")
        assert ok_count(client, 1) == 1  # global: 2 left
        redis_server.pause()
        try:
            durations = []
            for _ in range(3):  # the breaker's 3 failures: each a timed-out call, and yet granted
                started = time.monotonic()
                client.issue(request())
                durations.append(time.monotonic() - started)
            assert max(durations) < SLOW_CALL, durations
            assert sample(one, "synctoken_ratelimit_backend_errors_total", {"kind": "timeout"}) >= 3
            assert one.token_server.global_limiter is not None
            assert not one.token_server.global_limiter.breaker_closed
            failed = errors(one)
            fallbacks = sample(one, "synctoken_ratelimit_backend_fallbacks_total", {"on_backend_failure": "local"})
            # Breaker open: no call to Redis, so no error and no wait; the local bucket (3) is spent.
            started = time.monotonic()
            assert ok_count(client, 3) == 0
            assert time.monotonic() - started < SLOW_CALL
            assert errors(one) == failed
            assert (
                sample(one, "synctoken_ratelimit_backend_fallbacks_total", {"on_backend_failure": "local"})
                == fallbacks + 3
            )
        finally:
            redis_server.resume()
        time.sleep(1.1)  # the cool-down: the next call probes
        # Global again: once one server has spent the bucket, the other has nothing either (its local
        # bucket, untouched, would give 3). How much was left is not known: the scripts of the calls
        # that timed out were queued in Redis's socket buffers, and it may have run them on SIGCONT.
        ok_count(client, 4)
        assert one.token_server.global_limiter.breaker_closed, "the probe after SIGCONT did not close the breaker"
        assert ok_count(other, 3) == 0
        assert errors(two) == 0

    def test_killed_and_restarted_redis(self, harness: ServerHarness, redis_server: RedisServer) -> None:
        """A dead Redis refuses connections: calls fall back at once; a restarted one is used again (script reloaded)."""
        text = limited(harness.pki, redis_server, "rate = 0.01\nburst = 2")
        server = harness.start(text)
        client = harness.client(server, "bff")
        assert ok_count(client, 1) == 1
        redis_server.kill()
        started = time.monotonic()
        assert ok_count(client, 4) == 2  # local share: a fresh local bucket of 2
        assert time.monotonic() - started < SLOW_CALL
        assert sample(server, "synctoken_ratelimit_backend_errors_total", {"kind": "connection"}) >= 1
        redis_server.start()  # empty, on the same port; the script is not cached there
        time.sleep(1.1)
        assert ok_count(client, 4) == 2
        assert len(redis_server.keys()) == 1

    @pytest.mark.parametrize(
        ("on_failure", "granted"),
        [("allow", 5), ("deny", 0), ("local", 2)],
    )
    def test_on_backend_failure(
        self, harness: ServerHarness, redis_server: RedisServer, on_failure: str, granted: int
    ) -> None:
        """With Redis dead, allow lets all through, deny refuses UNAVAILABLE with RetryInfo, local uses the share."""
        text = limited(
            harness.pki, redis_server, "rate = 0.01\nburst = 2", limits_keys=f'on_backend_failure = "{on_failure}"'
        )
        client = harness.client(harness.start(text), "bff")
        redis_server.kill()
        outcomes = []
        for _ in range(5):
            try:
                client.issue(request())
                outcomes.append("OK")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
        assert outcomes.count("OK") == granted
        if on_failure == "deny":
            assert set(outcomes) == {"UNAVAILABLE"}
            error, info, _ = rpc_error(lambda: client.issue(request()))
            assert info.reason == "RATE_LIMIT_UNAVAILABLE"
            assert info.domain == "synctoken.v1"
            status = rpc_status.from_call(error)
            assert status is not None
            retry = RetryInfo()
            assert status.details[1].Unpack(retry)
            assert 0 < retry.retry_delay.ToMilliseconds() <= 1000

    def test_deny_does_not_touch_unlimited_callers(self, harness: ServerHarness, redis_server: RedisServer) -> None:
        """A caller without limits never waits for Redis, nor is refused for its absence."""
        text = limited(harness.pki, redis_server, "", limits_keys='on_backend_failure = "deny"')
        client = harness.client(harness.start(text), "bff")
        redis_server.kill()
        assert ok_count(client, 3) == 3


class TestCredentialsAndTls:
    """A password from a file, a wrong one, Redis over TLS with a client certificate, and over a unix socket."""

    def test_unix_socket(self, harness: ServerHarness, tmp_path: Path) -> None:
        """unix:///path?db=0 reaches a Redis that listens on a socket only."""
        redis = RedisServer(tmp_path / "redis", unix=True)
        try:
            text = limited(harness.pki, redis, "rate = 0.01\nburst = 2")
            server = harness.start(text)
            assert ok_count(harness.client(server, "bff"), 3) == 2
            assert errors(server) == 0
            assert len(redis.keys()) == 1
        finally:
            redis.kill()

    def test_password_file(self, harness: ServerHarness, tmp_path: Path, leak_watch: LeakWatch) -> None:
        """With the right password the limit is global (its keys are in Redis); the password is in no log."""
        password = "redis-pass-" + "q" * 20
        leak_watch.secrets.add(password)
        redis = RedisServer(tmp_path / "redis", password=password)
        try:
            (tmp_path / "redis_password").write_text(password + "\n", encoding="utf-8")
            (tmp_path / "redis_password").chmod(0o600)
            text = limited(
                harness.pki, redis, "rate = 0.01\nburst = 2", redis_keys=f'password_file = "{tmp_path}/redis_password"'
            )
            server = harness.start(text)
            assert ok_count(harness.client(server, "bff"), 3) == 2
            assert len(redis.keys()) == 1
            assert errors(server) == 0
        finally:
            redis.kill()

    def test_wrong_password_is_a_clear_error(
        self, harness: ServerHarness, tmp_path: Path, leak_watch: LeakWatch, log_sink: LogSink
    ) -> None:
        """A wrong password is logged at start-up as an error naming the password file; calls fall back."""
        password, wrong = "redis-pass-" + "r" * 20, "wrong-pass-" + "s" * 20
        leak_watch.secrets |= {password, wrong}
        redis = RedisServer(tmp_path / "redis", password=password)
        try:
            (tmp_path / "redis_password").write_text(wrong, encoding="utf-8")
            (tmp_path / "redis_password").chmod(0o600)
            text = limited(
                harness.pki, redis, "rate = 0.01\nburst = 2", redis_keys=f'password_file = "{tmp_path}/redis_password"'
            )
            start = len(log_sink.lines)
            server = harness.start(text)
            failed = [r for r in log_sink.records(start) if r["event"] == "rate_limit.backend_failed"]
            assert len(failed) == 1
            assert failed[0]["level"] == "error"
            assert failed[0]["kind"] == "auth"
            assert "limits.redis.password_file" in failed[0]["problem"]
            assert ok_count(harness.client(server, "bff"), 3) == 2  # the local share meanwhile
            assert sample(server, "synctoken_ratelimit_backend_errors_total", {"kind": "auth"}) >= 1
            assert redis.keys() == []
        finally:
            redis.kill()

    def test_tls_with_client_certificate(self, harness: ServerHarness, tmp_path: Path) -> None:
        """rediss:// with the CA file and a client certificate: the limit is global over TLS."""
        pki = harness.pki
        tls = RedisTls(
            cert_file=pki.directory / "server.pem",
            key_file=pki.directory / "server-key.pem",
            ca_file=pki.directory / "ca.pem",
            client_cert=pki.directory / "bff.pem",
            client_key=pki.directory / "bff-key.pem",
        )
        redis = RedisServer(tmp_path / "redis", tls=tls)
        try:
            files = f'ca_file = "{tls.ca_file}"\ncert_file = "{tls.client_cert}"\nkey_file = "{tls.client_key}"'
            text = limited(pki, redis, "rate = 0.01\nburst = 2", redis_keys=files)
            assert redis.url.startswith("rediss://127.0.0.1:")
            one, two = harness.start(text), harness.start(text)
            assert ok_count(alternating(harness.client(one, "bff"), harness.client(two, "bff")), 4) == 2
            assert errors(one) == errors(two) == 0
            assert len(redis.keys()) == 1
        finally:
            redis.kill()

    def test_tls_without_the_ca_fails_closed_to_the_fallback(self, harness: ServerHarness, tmp_path: Path) -> None:
        """A Redis whose certificate the client cannot verify is never used: its errors are counted."""
        pki = harness.pki
        tls = RedisTls(pki.directory / "server.pem", pki.directory / "server-key.pem", pki.directory / "ca.pem")
        redis = RedisServer(tmp_path / "redis", tls=tls)
        try:
            text = limited(
                pki, redis, "rate = 0.01\nburst = 2", redis_keys=f'ca_file = "{pki.directory / "open-ca.pem"}"'
            )
            server = harness.start(text)
            assert ok_count(harness.client(server, "bff"), 3) == 2
            assert errors(server) >= 1
            assert redis.keys() == []
        finally:
            redis.kill()


class TestRedisConfig:
    """check-config shows the backend and refuses what would not work, naming the key."""

    def test_check_config_shows_the_backend(self, pki: Pki, write_config: Callable[[str], Path]) -> None:
        """The dump names the backend and the Redis settings (defaults included), never the password."""
        path = write_config(limited(pki, None, "rate = 1", url="redis://cache.internal:6380/2"))
        result = check_config(path)
        assert result.returncode == 0, result.stderr
        assert '"backend": "redis"' in result.stdout
        assert '"url": "redis://cache.internal:6380/2"' in result.stdout
        assert '"on_backend_failure": "local"' in result.stdout
        assert '"replicas": 1' in result.stdout
        assert '"timeout": "250ms"' in result.stdout
        assert '"batch_window": "1ms"' in result.stdout
        assert '"breaker_cooldown": "1s"' in result.stdout

    @pytest.mark.parametrize(("window", "shown"), [('"0ms"', "0ms"), ('"4ms"', "4ms"), (None, "1ms")])
    def test_batch_window_is_read_and_restart_only(
        self, pki: Pki, write_config: Callable[[str], Path], window: str | None, shown: str
    ) -> None:
        """batch_window as written (unset: 1ms) reaches the Redis settings and is restart-only (client made at start)."""
        keys = f"batch_window = {window}" if window else ""
        text = limited(pki, None, "rate = 1", url="redis://127.0.0.1:6379/0", redis_keys=keys)
        config = load_config(write_config(text), environ=SECRET_ENV)
        assert config.limits_backend is not None
        assert format_milliseconds(config.limits_backend.batch_window_ms) == shown
        assert restart_only(config)["limits.redis.batch_window"] == shown

    @pytest.mark.parametrize("timeout", ["1ms", "2ms"])
    def test_a_tight_timeout_alone_still_loads(
        self, pki: Pki, write_config: Callable[[str], Path], timeout: str
    ) -> None:
        """A timeout too short for the default window, batch_window unset, loads (as before) with a window of 0ms."""
        text = limited(pki, None, "rate = 1", url="redis://127.0.0.1:6379/0", redis_keys=f'timeout = "{timeout}"')
        result = check_config(write_config(text))
        assert result.returncode == 0, result.stderr
        assert f'"timeout": "{timeout}"' in result.stdout
        assert '"batch_window": "0ms"' in result.stdout

    @pytest.mark.parametrize(
        ("url", "redis_keys", "limits_keys", "message"),
        [
            (
                "redis://:hunter2-inline@127.0.0.1:6379/0",
                "",
                "",
                (
                    "limits.redis.url: the URL holds a password, and the URL is shown by check-config and in logs: "
                    "put the password in limits.redis.password_file"
                ),
            ),
            (
                "redis://user:hunter2-inline@127.0.0.1:6379/0",
                "",
                "",
                "limits.redis.url: the URL holds a password",
            ),
            ("redis://127.0.0.1:6379/0?password=hunter2-inline", "", "", "limits.redis.url: the URL holds a password"),
            (
                "unix:///run/redis.sock?db=0&password=hunter2-inline",
                "",
                "",
                "limits.redis.url: the URL holds a password",
            ),
            ("http://127.0.0.1:6379/0", "", "", "limits.redis.url: 'http://127.0.0.1:6379/0' is not a URL like"),
            (
                "redis://limits@127.0.0.1:6379/0",
                "",
                "",
                "redis.password_file: missing: the URL names the user 'limits'",
            ),
            ("redis://127.0.0.1:6379/x", "", "", "the database is a number"),
            ("unix://host/path", "", "", "a unix socket URL is unix:///absolute/path"),
            ("unix:///run/redis.sock?timeout=1", "", "", "the only query a unix socket URL may have is ?db=N"),
            ("redis://127.0.0.1:6379/0", 'ca_file = "ca.pem"', "", "limits.redis.ca_file: applies only to a rediss://"),
            ("redis://127.0.0.1:6379/0", 'timeout = "5m"', "", "limits.redis.timeout: '5m' is not a duration like"),
            ("redis://127.0.0.1:6379/0", 'timeout = "9s"', "", "limits.redis.timeout: 9s is not between 1ms and 5s"),
            ("redis://127.0.0.1:6379/0", "breaker_failures = 0", "", "is not between 1 and 1000"),
            (
                "redis://127.0.0.1:6379/0",
                'batch_window = "11ms"',
                "",
                "limits.redis.batch_window: 11ms is not between 0ms and 10ms",
            ),
            (
                "redis://127.0.0.1:6379/0",
                'timeout = "10ms"\nbatch_window = "5ms"',
                "",
                "limits.redis.batch_window: must be less than half of limits.redis.timeout (10ms), or 0ms",
            ),
            ("redis://127.0.0.1:6379/0", 'batch_window = "1.5ms"', "", "limits.redis.batch_window: '1.5ms' is not a"),
            ("redis://127.0.0.1:6379/0", 'key_prefix = "a{b}"', "", "limits.redis.key_prefix: must be non-empty"),
            ("redis://127.0.0.1:6379/0", "", 'on_backend_failure = "retry"', "'retry' is not one of local, allow"),
            ("redis://127.0.0.1:6379/0", "", "", "limits.redis.password_file: cannot read the file it names"),
        ],
    )
    def test_invalid(
        self,
        pki: Pki,
        write_config: Callable[[str], Path],
        url: str,
        redis_keys: str,
        limits_keys: str,
        message: str,
    ) -> None:
        """Each mistake is refused by check-config with the key and what is wrong, never echoing a password."""
        if message.startswith("limits.redis.password_file"):
            redis_keys = 'password_file = "missing-password-file"'
        text = limited(pki, None, "rate = 1", url=url, redis_keys=redis_keys, limits_keys=limits_keys)
        result = check_config(write_config(text))
        assert result.returncode != 0
        assert message in result.stderr
        assert "hunter2-inline" not in result.stderr + result.stdout
        assert "missing-password-file" not in result.stderr

    def test_backend_redis_needs_the_table(self, pki: Pki, write_config: Callable[[str], Path]) -> None:
        """backend = "redis" without [limits.redis] is refused."""
        text = limited(pki, None, "rate = 1").split("[limits.redis]")[0]
        result = check_config(write_config(text))
        assert 'limits.redis: missing table: backend = "redis" needs [limits.redis] with its url' in result.stderr

    def test_local_backend_checks_but_ignores_the_table(self, pki: Pki, write_config: Callable[[str], Path]) -> None:
        """With backend = "local", [limits.redis] is checked and shown but not used: no Redis is needed to serve."""
        text = limited(pki, None, "rate = 1", url="redis://127.0.0.1:1/0").replace(
            'backend = "redis"', 'backend = "local"'
        )
        result = check_config(write_config(text))
        assert result.returncode == 0, result.stderr
        assert '"backend": "local"' in result.stdout


class TestBreaker:
    """The circuit breaker: closed, open after N failures in a row, one probe after the cool-down."""

    def test_opens_after_failures_in_a_row(self) -> None:
        """Failures count only in a row; the Nth opens it, and it says so once."""
        breaker = Breaker(failures=3, cooldown=1.0)
        assert [breaker.failed(0.0), breaker.failed(0.0)] == [False, False]
        breaker.succeeded()
        assert [breaker.failed(0.0), breaker.failed(0.0), breaker.failed(0.0)] == [False, False, True]
        assert not breaker.is_closed
        assert not breaker.allows(0.5)
        assert breaker.retry_after(0.25) == 0.75

    def test_one_probe_after_the_cooldown(self) -> None:
        """After the cool-down one caller probes and the others wait; a failed probe opens it again at once."""
        breaker = Breaker(failures=3, cooldown=1.0)
        for _ in range(3):
            breaker.failed(0.0)
        assert breaker.allows(1.0)
        assert not breaker.allows(1.0)
        assert not breaker.failed(1.0)  # already open: not a new opening
        assert not breaker.allows(1.5)
        assert breaker.allows(2.0)
        assert breaker.succeeded()
        assert breaker.is_closed
        assert breaker.allows(2.0)

    def test_an_abandoned_probe_hands_the_probe_on(self) -> None:
        """A probe that ends without an answer (cancelled) lets the next caller probe, and the breaker stays open."""
        breaker = Breaker(failures=1, cooldown=1.0)
        breaker.failed(0.0)
        assert breaker.allows(1.0)
        breaker.abandoned()
        assert not breaker.is_closed
        assert breaker.allows(1.0)
        assert not breaker.allows(1.0)


class TestMilliseconds:
    """Short timeouts in the config: 50ms or 2s."""

    @pytest.mark.parametrize(("text", "milliseconds"), [("50ms", 50), ("2s", 2000), ("1500ms", 1500), ("0ms", 0)])
    def test_parse_and_format(self, text: str, milliseconds: int) -> None:
        """Each parses, and formats back to a text that parses to the same value."""
        assert parse_milliseconds(text) == milliseconds
        assert parse_milliseconds(format_milliseconds(milliseconds)) == milliseconds

    @pytest.mark.parametrize("text", ["", "50", "1m", "1s500ms", "ms", "-5ms", " 5ms"])
    def test_refused(self, text: str) -> None:
        """Anything else is refused with an example."""
        with pytest.raises(ValueError, match="is not a duration like 50ms or 2s"):
            parse_milliseconds(text)


class TestOff:
    """Without a Redis backend, no Redis client is loaded."""

    def test_redis_not_imported(self) -> None:
        """The server's modules load neither hiredis nor the script client (nor redis-py, which it never uses)."""
        script = (
            "import sys; import synctoken_server.cli, synctoken_server.process.server, synctoken_server.process.workers; "
            "print(*(name in sys.modules for name in "
            "('hiredis', 'redis', 'synctoken_server.limitstore.scriptclient')))"
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
        assert result.stdout.split() == ["False", "False", "False"]
