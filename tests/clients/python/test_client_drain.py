"""A client's calls to a server whose health for balancing clients says NOT_SERVING: they wait, and say why.

A synctoken server says so in the last moment of its drain, so that clients
with other replicas move off before it stops; a client with one address (an
L4 balancer, a ClusterIP) has nowhere to go until the stop's GOAWAY makes it
connect anew, so its calls wait rather than fail at once. A server that does
not report that status at all (an older synctoken) is not called either, and
the error says what to look at.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from support.calls import channel
from support.clients import client_kwargs
from support.configs import config_text
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import START_TIMEOUT, Process, free_port, serve
from support.topology import SERVER_NAME
from synctoken.client import Cause, SynctokenError, TokenClient
from synctoken_server.process.server import BALANCING_HEALTH, CLIENT_MOVE_SECONDS

DRAIN_DELAY = 3.0

pytestmark = pytest.mark.slow


def test_a_call_in_the_last_moment_of_a_drain_waits(
    pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
) -> None:
    """A call made once the balancing status is NOT_SERVING waits out its deadline: it does not fail at once."""
    timeout = CLIENT_MOVE_SECONDS / 2
    port = free_port()
    text = config_text(pki, listen=f"127.0.0.1:{port}").replace(
        "[tls]", f'drain_delay = "{DRAIN_DELAY:.0f}s"\ngrace = "1s"\n\n[tls]'
    )
    process = serve(text, tmp_path, leak_watch, processes)
    with (
        TokenClient(
            f"127.0.0.1:{port}", server_name=SERVER_NAME, timeout=timeout, **client_kwargs(pki, "bff")
        ) as client,
        channel(pki, port) as health_channel,
    ):
        leak_watch.tokens.add(client.issue_token("alice").token)
        watch = health_pb2_grpc.HealthStub(health_channel).Watch(
            health_pb2.HealthCheckRequest(service=BALANCING_HEALTH), timeout=START_TIMEOUT
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        process.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        called = time.monotonic()
        with pytest.raises(SynctokenError) as waited:
            client.whoami()
        took = time.monotonic() - called
        watch.cancel()
    assert waited.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert took >= timeout, "the call failed at once instead of waiting"
    assert process.proc.wait(timeout=DRAIN_DELAY + START_TIMEOUT) == 0


@pytest.fixture
def older_server(pki: Pki) -> Iterator[int]:
    """A gRPC server with the suite's certificate and gRPC health, which does not report BALANCING_HEALTH."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    credentials = grpc.ssl_server_credentials([(pki.server.key_pem, pki.server.cert_pem)])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield port
    server.stop(grace=None).wait(timeout=10)


def test_a_server_without_the_status_is_not_called(pki: Pki, older_server: int) -> None:
    """SERVICE_UNKNOWN is not SERVING: the call waits out its deadline, and the error names the status to report."""
    with (
        TokenClient(
            f"127.0.0.1:{older_server}", server_name=SERVER_NAME, timeout=3, **client_kwargs(pki, "bff")
        ) as client,
        pytest.raises(SynctokenError) as waited,
    ):
        client.whoami()
    assert (waited.value.code, waited.value.cause) == (grpc.StatusCode.DEADLINE_EXCEEDED, Cause.CONNECTION_FAILED)
    assert (
        f"its last attempt found: ipv4:127.0.0.1:{older_server} takes no new calls: "
        f"its health for balancing clients ({BALANCING_HEALTH}) is not SERVING"
    ) in str(waited.value)
