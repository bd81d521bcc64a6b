"""Health: SERVING once started, NOT_SERVING before shutdown so balancers drain first."""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support.inprocess import ServerHarness

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
