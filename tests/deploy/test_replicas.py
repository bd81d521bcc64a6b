"""Several replicas: the Python client balancing over them, and HAProxy in front of them with its gRPC health check."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from deploy.haproxy import health_frames
from support.calls import Outcome
from support.clients import CLIENT, client_kwargs
from support.constants import BFF_ID
from support.inprocess import ServerHarness
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import Process
from support.topology import HAPROXY_CONFIG, HAPROXY_SOURCE, SERVER_NAME, ClientLoad, Topology
from synctoken.client import AsyncTokenClient, TokenClient
from synctoken_server.serveroptions import ServerTimeouts

DRAIN_DELAY = ServerTimeouts().drain_delay
WARM_UP_CALLS = 300
"""At most this many calls before every replica has answered one: a bound, not a timing goal."""
"""The replicas run with the default drain_delay: the timings in haproxy.cfg are meant for it."""


@pytest.fixture
def topology(pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]) -> Iterator[Topology]:
    """Three replicas on loopback, not yet started; everything stopped at teardown."""
    made = Topology(pki, tmp_path, leak_watch, processes)
    yield made
    made.stop()


def failures(outcomes: list[Outcome]) -> Counter[grpc.StatusCode]:
    """The codes of the calls that failed, counted."""
    return Counter(o.code for o in outcomes if o.code != grpc.StatusCode.OK)


def unanswered(topology: Topology, outcomes: list[Outcome]) -> int:
    """Tokens the replicas issued beyond those the clients got: calls served, then retried when their answer was lost."""
    return sum(topology.decisions().values()) - sum(o.code == grpc.StatusCode.OK for o in outcomes)


def busiest(topology: Topology) -> str:
    """The replica with the most audit records: one the load is certainly reaching."""
    counts = topology.decisions()
    return max(counts, key=lambda name: counts[name])


class TestHealthFrames:
    """The bytes of HAProxy's health check, from deploy/haproxy/health_frames.py."""

    def test_haproxy_cfg_holds_what_the_script_writes(self) -> None:
        """haproxy.cfg's tcp-check lines are exactly the script's: edit the script, then paste its output."""
        written = subprocess.run(
            [sys.executable, HAPROXY_CONFIG.parent / "health_frames.py"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()
        assert written == health_frames.haproxy_lines()
        assert len(written) == 3
        config_lines = {line.strip() for line in HAPROXY_CONFIG.read_text().splitlines()}
        for line in written:
            assert line in config_lines

    def test_a_real_server_answers_serving(self, harness: ServerHarness, pki: Pki) -> None:
        """Sent over mutual TLS with ALPN h2, the frames are a health check the server answers with SERVING."""
        server = harness.start()
        context = ssl.create_default_context(cafile=pki.directory / "ca.pem")
        context.load_cert_chain(*pki.files("bff"))
        context.set_alpn_protocols(["h2"])
        received = b""
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
        ):
            assert tls.selected_alpn_protocol() == "h2"
            tls.sendall(health_frames.health_check_request())
            deadline = time.monotonic() + 5
            while health_frames.serving_response() not in received and time.monotonic() < deadline:
                received += tls.recv(65536)
        assert health_frames.serving_response() in received

    def test_hpack_integers_past_their_prefix(self) -> None:
        """An integer at or above its prefix's maximum continues in 7-bit groups (RFC 7541, C.1.2: 1337 in 5 bits)."""
        assert health_frames.hpack_integer(1337, 5, 0) == bytes([31, 154, 10])
        assert health_frames.hpack_integer(31, 4, 0) == bytes([15, 16])
        assert health_frames.hpack_integer(10, 5, 0) == bytes([10])


class TestClientTargets:
    """What the Python client accepts as a target of several replicas."""

    def test_a_list_of_addresses_needs_a_server_name(self, pki: Pki) -> None:
        """gRPC would check the whole list as one certificate name, so it is refused at once, naming the setting."""
        with pytest.raises(ValueError, match="lists several addresses: give server_name"):
            TokenClient("ipv4:127.0.0.1:1,127.0.0.1:2", **client_kwargs(pki, "bff"))

    def test_the_command_says_so_as_a_usage_error(self, pki: Pki) -> None:
        """synctoken-client with such a target and no --server-name exits 2 with the same message, calling nothing."""
        files = client_kwargs(pki, "bff")
        result = subprocess.run(
            [
                CLIENT,
                *("--target", "ipv4:127.0.0.1:1,127.0.0.1:2"),
                *("--ca", str(files["ca_file"]), "--cert", str(files["cert_file"]), "--key", str(files["key_file"])),
                "whoami",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2
        assert "lists several addresses: give server_name (SYNCTOKEN_SERVER_NAME)" in result.stderr


@pytest.mark.slow
class TestClientBalancing:
    """The Python client spreads its calls over every replica a target lists, and loses none when one dies."""

    def test_calls_spread_over_every_replica(self, topology: Topology, leak_watch: LeakWatch) -> None:
        """Round robin: of 30 calls from one blocking client, and 30 from one asyncio client, every replica gets some."""
        topology.start()
        with topology.client(topology.direct_target()) as client:
            # Round robin picks among connected replicas: on a loaded machine one may connect later than the
            # first calls, so the count starts once every replica has answered one (bounded).
            for _ in range(WARM_UP_CALLS):
                leak_watch.tokens.add(client.issue_token("alice").token)
                if len(warm := topology.decisions()) == 3 and all(warm.values()):
                    break
            warm = topology.decisions()
            for _ in range(30):
                leak_watch.tokens.add(client.issue_token("alice").token)
        first = topology.decisions()
        assert sum(first.values()) - sum(warm.values()) == 30
        assert all(first[name] - warm.get(name, 0) >= 5 for name in first), (warm, first)

        async def calls() -> None:
            cert_file, key_file = topology.pki.files("bff")
            async with AsyncTokenClient(
                topology.direct_target(),
                ca_file=topology.pki.directory / "ca.pem",
                cert_file=cert_file,
                key_file=key_file,
                server_name=SERVER_NAME,
            ) as client:
                for _ in range(30):
                    leak_watch.tokens.add((await client.issue_token("alice")).token)

        asyncio.run(calls())
        then = topology.decisions()
        assert all(then[name] - first[name] >= 5 for name in then), (first, then)

    def test_kill_9_under_load_fails_no_call(self, topology: Topology, leak_watch: LeakWatch) -> None:
        """A replica killed with SIGKILL mid-load: its calls are retried on the others (UNAVAILABLE), none fails."""
        topology.start()
        with topology.client(topology.direct_target()) as client:
            load = ClientLoad([client], leak_watch, threads=4)
            load.wait_for(150)
            victim = busiest(topology)
            killed = next(r for r in topology.replicas if r.name == victim)
            killed.process.proc.kill()
            killed_at = time.monotonic()
            load.wait_for(300)
            outcomes = load.stop()
        assert failures(outcomes) == Counter()
        after = [o for o in outcomes if o.sent > killed_at]
        assert len(after) >= 250
        # The survivors shared the load after the kill.
        survivors = [r for r in topology.replicas if r is not killed]
        assert all(r.decisions() for r in survivors)

    def test_sigterm_under_load_fails_no_call(self, topology: Topology, leak_watch: LeakWatch) -> None:
        """SIGTERM mid-load: the replica serves through its drain, the client moves off before it stops, none fails."""
        topology.start()
        with topology.client(topology.direct_target()) as client:
            # Eight threads: with four, a client that ignored health lost a call to the stop in only some runs.
            load = ClientLoad([client], leak_watch, threads=8)
            load.wait_for(150)
            victim = topology.replicas[0]
            victim.process.proc.send_signal(signal.SIGTERM)
            signalled_wall = dt.datetime.now(dt.UTC)
            assert victim.process.proc.wait(timeout=DRAIN_DELAY + 15) == 0
            load.wait_for(150)
            outcomes = load.stop()
        served_in_drain = [r for r in victim.decisions() if dt.datetime.fromisoformat(r["timestamp"]) > signalled_wall]
        print(  # noqa: T201 - the figures, with -s
            f"calls the draining replica served after SIGTERM: {len(served_in_drain)}; "
            f"failed: {failures(outcomes)}; served whose answer was lost, and retried: {unanswered(topology, outcomes)}"
        )
        # Its health for balancing clients said NOT_SERVING before it stopped, so no call reached it as
        # it stopped, where gRPC core would have cancelled it (CANCELLED, which nothing retries).
        assert failures(outcomes) == Counter()
        assert unanswered(topology, outcomes) == 0
        # It kept serving through the drain: the client did not leave at the first NOT_SERVING.
        assert served_in_drain


@pytest.mark.slow
class TestHAProxy:
    """deploy/haproxy/haproxy.cfg in front of three replicas: health over mutual TLS, kills and drains."""

    def test_audit_peer_is_haproxy_and_caller_is_the_client_certificate(
        self, topology: Topology, leak_watch: LeakWatch
    ) -> None:
        """Behind HAProxy, the audit's peer is HAProxy's address; the caller id is still the client certificate's."""
        topology.start(haproxy=True)
        with topology.client(f"127.0.0.1:{topology.balancer.port}", cert="bff") as client:
            leak_watch.tokens.add(client.issue_token("alice").token)
        (record,) = [r for replica in topology.replicas for r in replica.decisions()]
        assert record["peer"].startswith(f"ipv4:{HAPROXY_SOURCE}:")
        assert record["caller_id"] == BFF_ID
        assert record["outcome"] == "issued"

    def test_kill_9_under_load(self, topology: Topology, leak_watch: LeakWatch) -> None:
        """SIGKILL of a replica with traffic: HAProxy marks it down within seconds, and no call fails at all."""
        topology.start(haproxy=True)
        target = f"127.0.0.1:{topology.balancer.port}"
        # Three clients, so three connections through HAProxy, which leastconn puts on three replicas.
        clients = [topology.client(target) for _ in range(3)]
        try:
            load = ClientLoad(clients, leak_watch, threads=2)
            load.wait_for(150)
            victim = busiest(topology)
            next(r for r in topology.replicas if r.name == victim).process.proc.kill()
            killed_at = time.monotonic()
            down_at = topology.balancer.wait_for(victim, "DOWN")
            load.wait_for(200)
            outcomes = load.stop()
        finally:
            for client in clients:
                client.close()
        print(  # noqa: T201 - the figures, with -s
            f"kill -9 to marked down: {down_at - killed_at:.2f}s; "
            f"calls served whose answer was lost, and retried: {unanswered(topology, outcomes)}"
        )
        assert down_at - killed_at < DRAIN_DELAY
        # Allowed: nothing. Calls in flight on the dead replica's connections fail with UNAVAILABLE, which the
        # client retries; a new connection HAProxy gives the dead replica before the check marks it down is
        # refused, and HAProxy redispatches it (retries, option redispatch).
        assert failures(outcomes) == Counter()
        assert len([o for o in outcomes if o.sent > down_at]) >= 150

    def test_sigterm_marks_down_before_the_drain_ends(self, topology: Topology, leak_watch: LeakWatch) -> None:
        """SIGTERM: health says NOT_SERVING, HAProxy marks the replica down while it still serves, no call fails."""
        topology.start(haproxy=True)
        target = f"127.0.0.1:{topology.balancer.port}"
        clients = [topology.client(target) for _ in range(3)]
        try:
            load = ClientLoad(clients, leak_watch, threads=2)
            load.wait_for(150)
            name = busiest(topology)  # once: under load the busiest can change between two looks
            victim = next(r for r in topology.replicas if r.name == name)
            victim.process.proc.send_signal(signal.SIGTERM)
            signalled_at, signalled_wall = time.monotonic(), dt.datetime.now(dt.UTC)
            down_at = topology.balancer.wait_for(victim.name, "DOWN")
            still_running = victim.process.proc.poll() is None
            assert victim.process.proc.wait(timeout=DRAIN_DELAY + 15) == 0
            load.wait_for(150)
            outcomes = load.stop()
        finally:
            for client in clients:
                client.close()
        served_in_drain = [r for r in victim.decisions() if dt.datetime.fromisoformat(r["timestamp"]) > signalled_wall]
        print(  # noqa: T201 - the figures, with -s
            f"SIGTERM to marked down: {down_at - signalled_at:.2f}s (drain_delay {DRAIN_DELAY}s); "
            f"calls the draining replica served after SIGTERM: {len(served_in_drain)}; "
            f"calls served whose answer was lost in the cut, and retried: {unanswered(topology, outcomes)}"
        )
        # Marked down while it still served: HAProxy then closed its connections (on-marked-down
        # shutdown-sessions), so the calls in flight on them failed as UNAVAILABLE and were retried elsewhere.
        assert still_running
        assert down_at - signalled_at < DRAIN_DELAY / 2
        assert failures(outcomes) == Counter()
