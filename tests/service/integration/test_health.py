"""Health: SERVING once started, NOT_SERVING before shutdown so balancers drain first."""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support.calls import ALICE
from support.inprocess import ServerHarness
from synctoken.client import _channel
from synctoken_server.process import server as token_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_watch_sees_not_serving_on_stop(harness: ServerHarness) -> None:
    """A Watch stream on TokenService goes SERVING, then NOT_SERVING when the server stops."""
    server = harness.start()
    client = harness.client(server, "bff")
    stub = health_pb2_grpc.HealthStub(client.channel)
    request = health_pb2.HealthCheckRequest(service="synctoken.v1.TokenService")
    seen: list[int] = []
    first = threading.Event()

    def watch() -> None:
        try:
            for update in stub.Watch(request, timeout=20):
                seen.append(update.status)
                first.set()
        except grpc.RpcError:
            pass  # the stream ends when the server goes away

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert first.wait(timeout=10)
    server.close()
    watcher.join(timeout=20)
    assert seen[:2] == [SERVING, NOT_SERVING]


def test_balancing_clients_are_told_at_the_end_of_the_drain(harness: ServerHarness) -> None:
    """Stopping: the server-wide status says NOT_SERVING at once, the balancing clients' one near the drain's end.

    Balancers (HAProxy, Kubernetes) take seconds to notice; clients that balance
    themselves notice within a round trip, and some (one address behind an L4
    balancer) have nowhere else to go: so they are told only at the end, while
    the server still serves.
    """
    drain_delay = 3.0
    server = harness.start()
    client = harness.client(server, "bff")
    health = health_pb2_grpc.HealthStub(client.channel)

    def status(service: str) -> int:
        return int(health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)

    watch = health.Watch(health_pb2.HealthCheckRequest(service=token_server.BALANCING_HEALTH), timeout=20)
    assert next(watch).status == SERVING
    began = time.monotonic()
    stopping = server.stop_soon(drain_delay=drain_delay, grace=1)
    deadline = began + 1
    while status("") != NOT_SERVING:
        assert time.monotonic() < deadline, "the server-wide status is still SERVING"
    assert status("synctoken.v1.TokenService") == NOT_SERVING
    assert status(token_server.BALANCING_HEALTH) == SERVING
    assert next(watch).status == NOT_SERVING
    assert time.monotonic() - began >= drain_delay - token_server.CLIENT_MOVE_SECONDS
    # Still serving: only the clients were told to move.
    assert client.issue(ALICE).token
    stopping.result(timeout=drain_delay + 10)


def test_the_client_watches_the_name_the_server_keeps() -> None:
    """The Python client's healthCheckConfig names the status the server keeps for it."""
    assert _channel.SERVICE_CONFIG["healthCheckConfig"] == {"serviceName": token_server.BALANCING_HEALTH}
