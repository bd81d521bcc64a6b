"""Three replicas sharing one Redis: the global limit holds over all of them, and survives Redis hanging or dying.

Each window sends IssueToken back to back from several threads for a few
seconds and counts every outcome: with the bucket full at the start, a
limit of `rate` and `burst` grants burst + rate x elapsed in all (elapsed:
from the window's first audit record to its last), give or take a token per
replica, however the calls are spread; three replicas each with its own
buckets would grant three times that. While Redis is away each replica
grants its local share instead: the whole limit, or the limit / 3 with
`[limits] replicas = 3`.
"""

from __future__ import annotations

import datetime as dt
import itertools
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from support.constants import BFF_ID, SERVICE_A
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import START_TIMEOUT, Process
from support.topology import ClientLoad, Replica, Setup, Topology
from synctoken.client import TokenClient
from synctoken_server.audit.record import OUTCOME_DENIED, OUTCOME_ISSUED

REPLICAS = 3
RATE, BURST = 15.0, 6.0
"""The caller's limit: a window of 2 s grants 36 in all (108 if each replica kept its own)."""
IDENTITY_RATE, IDENTITY_BURST = 6.0, 3.0
"""One identity's limit, within the caller's: 2 s grant 15 (45 per replica)."""
WINDOW = 2.0
TIMEOUT_MS = 250
"""Each Redis call's bound: room for a busy machine, where a slower answer would fall back and change the count."""
SLOW_CALL = 1.0
"""Far above the timeout plus the call itself: a loose bound, not a timing goal (the figures are printed)."""
POLICY = f"""
[defaults]
default_ttl = "1h"
max_ttl = "4h"

[[callers]]
id = "{BFF_ID}"
sync_services = ["{SERVICE_A}"]
default_sync_service = "{SERVICE_A}"
rate = {RATE}
burst = {BURST:.0f}
identity_rate = {IDENTITY_RATE}
identity_burst = {IDENTITY_BURST:.0f}
"""
BREAKER_COOLDOWN = 1.0
REDIS_KEYS = f'timeout = "{TIMEOUT_MS}ms"\nbreaker_failures = 3\nbreaker_cooldown = "{BREAKER_COOLDOWN:.0f}s"'


Made = Callable[[str], Topology]


def each_call_new() -> Callable[[], str]:
    """A new identity per call, so that only the caller's limit can refuse (a refused call takes nothing)."""
    numbers = itertools.count()
    return lambda: f"u{next(numbers)}"


@dataclass(frozen=True)
class Window:
    """What a window of calls got: counts by code, its length, each call's duration, and each replica's records."""

    codes: Counter[grpc.StatusCode]
    elapsed: float
    """From the first call's start to the last one's end."""
    durations: list[float]
    issued: dict[str, int]
    """Audit records of issued tokens, by replica."""
    denied: dict[str, int]
    """Audit records of calls refused by a rate limit, by replica."""
    spans: dict[str, float]
    """From each replica's first audit record of the window to its last: the time its own buckets saw."""
    span: float
    """From the first audit record of the window to the last, on any replica: the time the shared buckets saw."""

    @property
    def granted(self) -> int:
        """Calls that got a token."""
        return self.codes[grpc.StatusCode.OK]

    def describe(self, rate: float, burst: float) -> str:
        """The figures, for -s."""
        return (
            f"{self.granted} granted, {self.codes[grpc.StatusCode.RESOURCE_EXHAUSTED]} refused in {self.elapsed:.2f}s "
            f"({self.span:.2f}s from first to last audit record: burst + rate x that = "
            f"{bound(rate, burst, self.span):.1f}); issued by replica {self.issued}; "
            f"call max {max(self.durations) * 1000:.0f} ms, median {statistics.median(self.durations) * 1000:.1f} ms"
        )


def bound(rate: float, burst: float, elapsed: float) -> float:
    """What one token bucket, full at the start, grants over `elapsed` seconds of steady demand."""
    return burst + rate * elapsed


def window(topology: Topology, clients: list[TokenClient], watch: LeakWatch, identity: Callable[[], str]) -> Window:
    """WINDOW seconds of calls from two threads per client; every outcome counted and matched to the audit."""
    before = {r.name: len(r.decisions()) for r in topology.replicas}
    load = ClientLoad(clients, watch, threads=2, identity=identity)
    time.sleep(WINDOW)
    outcomes = load.stop()
    records = audited(topology.replicas, before, len(outcomes))
    codes = Counter(o.code for o in outcomes)
    ends = [o.ended for o in outcomes if o.ended is not None]
    return Window(
        codes=codes,
        elapsed=max(ends) - min(o.sent for o in outcomes),
        durations=[o.ended - o.sent for o in outcomes if o.ended is not None],
        issued={name: sum(r["outcome"] == OUTCOME_ISSUED for r in rs) for name, rs in records.items()},
        spans={name: span(rs) for name, rs in records.items()},
        span=span([r for rs in records.values() for r in rs]),
        denied={
            name: sum(r["outcome"] == OUTCOME_DENIED and r.get("reason") == "RATE_LIMITED" for r in rs)
            for name, rs in records.items()
        },
    )


def span(records: list[dict[str, object]]) -> float:
    """Seconds from the first of `records` to the last, by their timestamps (one host: one clock)."""
    times = [dt.datetime.fromisoformat(str(r["timestamp"])) for r in records]
    return (max(times) - min(times)).total_seconds() if times else 0.0


def audited(replicas: list[Replica], before: dict[str, int], calls: int) -> dict[str, list[dict[str, object]]]:
    """Each replica's audit records since `before`, once there is one per call (the log is written as calls end)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        records = {r.name: r.decisions()[before[r.name] :] for r in replicas}
        if sum(map(len, records.values())) >= calls or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def assert_global(result: Window, rate: float, burst: float) -> None:
    """The window granted one limit's worth over all replicas, each served some of it, and the audit agrees."""
    assert set(result.codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, result.codes
    # The calls asked for far more than three limits (twice, for an uneven spread), or the count would prove nothing.
    assert result.codes.total() > 2 * REPLICAS * bound(rate, burst, result.span)
    assert abs(result.granted - bound(rate, burst, result.span)) <= REPLICAS, result.describe(rate, burst)
    # Every call is one audit record: issued or refused by the limit, on the replica that served it.
    assert sum(result.issued.values()) == result.granted
    assert sum(result.denied.values()) == result.codes[grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert all(result.issued[name] + result.denied[name] > 0 for name in result.issued), result.issued
    # Tokens came from more than one replica: one bucket drained through several (not every replica need
    # grant one: 15 tokens over three replicas leave one without any now and then).
    assert sum(count > 0 for count in result.issued.values()) >= 2, result.issued


def wait_for_metric(replica: Replica, name: str, at_least: float, **labels: str) -> float:
    """Scrape until the metric reaches `at_least` (a scrape may show a render up to a second old); its value."""
    deadline = time.monotonic() + 10
    while (value := replica.metric(name, **labels)) < at_least:
        assert time.monotonic() < deadline, f"{replica.name}: {name}{labels} stayed at {value}"
        time.sleep(0.2)
    return value


def open_breakers(replicas: list[Replica]) -> float:
    """Wait until every replica counted the failed calls that open its breaker; 0."""
    for replica in replicas:
        wait_for_metric(replica, "synctoken_ratelimit_backend_errors_total", 3, kind="timeout")
    return 0.0


def figures(durations: list[float]) -> str:
    """Calls' durations in a few numbers, for -s."""
    return (
        f"{len(durations)} calls, max {max(durations) * 1000:.0f} ms, median {statistics.median(durations) * 1000:.1f} ms, "
        f"{sum(d >= TIMEOUT_MS / 1000 for d in durations)} waited the timeout"
    )


def recovery_after(replicas: list[Replica], bring_back: Callable[[], None]) -> float:
    """Under a load already running: let the breakers probe a while, `bring_back` Redis, and time the recovery.

    Seconds from `bring_back` to the last replica using Redis again: up to a
    breaker cool-down, since an open breaker tries Redis once per cool-down.
    """
    time.sleep(BREAKER_COOLDOWN + 0.2)
    since = dt.datetime.now(dt.UTC)
    bring_back()
    return recovered_after(replicas, since)


def recovered_after(replicas: list[Replica], since: dt.datetime) -> float:
    """Wait until every replica logged rate_limit.backend_recovered after `since`; the seconds to the last one."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        times = []
        for replica in replicas:
            found = [
                dt.datetime.fromisoformat(r["timestamp"])
                for r in replica.process.records()
                if r["event"] == "rate_limit.backend_recovered" and dt.datetime.fromisoformat(r["timestamp"]) > since
            ]
            times.extend(found[:1])
        if len(times) == len(replicas):
            return (max(times) - since).total_seconds()
        assert time.monotonic() < deadline, f"only {len(times)} replicas used Redis again"
        time.sleep(0.05)


@pytest.fixture
def topologies(pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]) -> Iterator[Made]:
    """Makes three replicas with the limited policy, sharing one Redis, each with metrics; all stopped at teardown.

    Its argument is lines for every replica's [limits] table.
    """
    made: list[Topology] = []

    def make(limits_keys: str = "") -> Topology:
        setup = Setup(
            count=REPLICAS, policy=POLICY, redis=True, limits_keys=limits_keys, redis_keys=REDIS_KEYS, metrics=True
        )
        made.append(Topology(pki, tmp_path, leak_watch, processes, setup))
        return made[-1]

    yield make
    for topology in made:
        topology.stop()


def haproxy_clients(topology: Topology, leak_watch: LeakWatch) -> list[TokenClient]:
    """One client per replica through HAProxy, each connected by a first call: checked, not assumed.

    leastconn gives a new connection the replica with the fewest; connecting the clients one call at a
    time, each to a replica none of the others holds, is what the tests' per-replica figures rely on.
    """
    clients: list[TokenClient] = []
    for _ in range(REPLICAS):
        client = topology.client(f"127.0.0.1:{topology.balancer.port}")
        before = topology.decisions()
        leak_watch.tokens.add(client.issue_token("alice").token)
        after = topology.decisions()
        clients.append(client)
        assert sum(after[name] > before[name] for name in after) == 1, (before, after)
    served = {name for name, count in topology.decisions().items() if count}
    assert len(served) == REPLICAS, served
    return clients


@pytest.mark.slow
class TestGlobalLimit:
    """Calls spread over three replicas get one limit in all, not one per replica."""

    def test_caller_and_identity_limits(self, topologies: Made, leak_watch: LeakWatch) -> None:
        """Through HAProxy and through the balancing client, per caller and per identity: burst + rate x time."""
        topology = topologies("").start(haproxy=True)
        routes = {
            "haproxy": haproxy_clients(topology, leak_watch),
            "balancing client": [topology.client(topology.direct_target())],
        }
        try:
            for route, clients in routes.items():
                for kind, identity, rate, burst in (
                    ("caller", each_call_new(), RATE, BURST),
                    ("identity", lambda: "alice", IDENTITY_RATE, IDENTITY_BURST),
                ):
                    topology.shared.client().flushdb()  # every bucket full
                    result = window(topology, clients, leak_watch, identity)
                    print(f"{route}, {kind} limit: {result.describe(rate, burst)}")  # noqa: T201 - the figures, with -s
                    assert_global(result, rate, burst)
        finally:
            for clients in routes.values():
                for client in clients:
                    client.close()


def assert_local(result: Window, rate: float, burst: float) -> None:
    """Each replica granted its own bucket's worth of `rate` and `burst` over the time it served, as its local share.

    Each bucket's count is whole tokens of a continuous refill, and an audit
    record's time is a little after its check: a bucket may come up to two
    tokens short, and one over.
    """
    for name, count in result.issued.items():
        expected = bound(rate, burst, result.spans[name])
        assert expected - 2 <= count <= expected + 1, (name, expected, result.issued)


def assert_quick(result: Window) -> None:
    """Every call ended well within a second, refused only by a limit: Redis's absence cost no call."""
    assert set(result.codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, result.codes
    assert max(result.durations) < SLOW_CALL, result.describe(RATE, BURST)


@pytest.mark.slow
class TestRedisAway:
    """Redis hung or killed under load over three replicas: calls stay quick on the local share; then global again."""

    def test_hung_redis(self, topologies: Made, leak_watch: LeakWatch) -> None:
        """SIGSTOP: each call waits at most the timeout, the replicas together grant about one limit (replicas = 3)."""
        topology = topologies(f"replicas = {REPLICAS}").start(haproxy=True)
        clients = haproxy_clients(topology, leak_watch)
        try:
            topology.shared.pause()
            # Calls until every replica's breaker is open: those that meet the hung Redis wait its timeout.
            _, stalled = window_while(clients, leak_watch, lambda: open_breakers(topology.replicas))
            print(f"Redis hung, breakers opening: {figures(stalled)}")  # noqa: T201 - the figures, with -s
            assert max(stalled) < SLOW_CALL
            # Let the local buckets those calls used fill up, so that the window starts full.
            time.sleep(BURST / RATE + 0.1)
            hung = window(topology, clients, leak_watch, each_call_new())
            print(f"Redis hung, breakers open: {hung.describe(RATE, BURST)}")  # noqa: T201 - the figures, with -s
            assert_quick(hung)
            # Each replica's local share is the limit / 3: together, about one limit.
            assert_local(hung, RATE / REPLICAS, BURST / REPLICAS)
            recovery, resuming = window_while(
                clients, leak_watch, lambda: recovery_after(topology.replicas, topology.shared.resume)
            )
            print(f"Redis hung, then SIGCONT, under load: {figures(resuming)}")  # noqa: T201 - the figures, with -s
            assert max(resuming) < SLOW_CALL
            topology.shared.client().flushdb()
            back = window(topology, clients, leak_watch, each_call_new())
        finally:
            for client in clients:
                client.close()
        print(f"SIGCONT to every replica using Redis again: {recovery:.2f}s; then {back.describe(RATE, BURST)}")  # noqa: T201
        assert_global(back, RATE, BURST)

    def test_killed_and_restarted_redis(self, topologies: Made, leak_watch: LeakWatch) -> None:
        """SIGKILL: calls fall back at once, each replica its whole limit (no replicas hint); a restart: global again."""
        topology = topologies("").start()
        clients = [topology.client(topology.direct_target())]
        try:
            topology.shared.kill()
            dead = window(topology, clients, leak_watch, each_call_new())
            print(f"Redis killed: {dead.describe(RATE, BURST)}, for each of {REPLICAS} replicas")  # noqa: T201 - the figures, with -s
            assert_quick(dead)
            # Without [limits] replicas each replica is its own whole limit: three limits in all.
            assert_local(dead, RATE, BURST)
            for replica in topology.replicas:
                wait_for_metric(replica, "synctoken_ratelimit_backend_errors_total", 1, kind="connection")
            # Started again empty, on the same port.
            recovery, restarting = window_while(
                clients, leak_watch, lambda: recovery_after(topology.replicas, topology.shared.start)
            )
            print(f"Redis dead, then restarted, under load: {figures(restarting)}")  # noqa: T201 - the figures, with -s
            assert max(restarting) < SLOW_CALL
            topology.shared.client().flushdb()
            back = window(topology, clients, leak_watch, each_call_new())
        finally:
            for client in clients:
                client.close()
        print(f"restart to every replica using Redis again: {recovery:.2f}s; then {back.describe(RATE, BURST)}")  # noqa: T201
        assert_global(back, RATE, BURST)


def window_while(clients: list[TokenClient], watch: LeakWatch, wait: Callable[[], float]) -> tuple[float, list[float]]:
    """Keep calling until `wait` returns; what it returned and each call's duration.

    Every call meanwhile was granted or refused by a limit, none failed.
    """
    load = ClientLoad(clients, watch, threads=2, identity=each_call_new())
    try:
        result = wait()
    finally:
        outcomes = load.stop()
    codes = Counter(o.code for o in outcomes)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    return result, [o.ended - o.sent for o in outcomes if o.ended is not None]
