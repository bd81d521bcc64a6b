"""A probe as the kubelet's gRPC probe (and grpc_health_probe) makes it: plaintext, a fresh connection, one Check."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def probe(port: int, service: str = "", timeout: float = 5.0) -> str:
    """SERVING, NOT_SERVING or another status name; else the status code's name (UNAVAILABLE, UNIMPLEMENTED, ...).

    Each probe opens its own connection and closes it, as the kubelet's does: nothing is carried from
    one probe to the next, so with --workers each probe may reach any worker.
    """
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return str(exc.code().name)  # a call's error is also a grpc.Call
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
