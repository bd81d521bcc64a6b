"""The stand-in SPIFFE Workload API agent's own process: a grpc.aio server on a Unix socket, driven over stdin.

Run by support.workloadagent (`python -m support.agentprocess SOCKET`), never imported by the tests: its
stubs, generated from the standard's workload.proto, declare the same top-level message names as
py-spiffe's bundled copy, and protobuf refuses two files defining one name in a process (the suite's
process loads py-spiffe's through synctoken_server). A separate process is also what a real agent is.

The control protocol is one JSON object a line on stdin, each answered by one JSON line on stdout:
  {"op": "set", "svids": [{"spiffe_id", "chain", "key", "bundle", "hint"}], "federated": {td_id: der}}
      (base64 DER) replaces what the agent serves and pushes it down every open stream;
  {"op": "silent", "on": bool}: new streams are accepted and never answered (or answered again);
  {"op": "drop"}: every open stream ends with UNAVAILABLE, as when an agent fails;
  {"op": "status"}: {"streams": open streams, "opened": streams ever opened, "rejected": calls without the header}.
The first line written is {"ready": true} once the socket serves. End of stdin stops the agent and removes
its socket, as SPIRE's agent does on a clean stop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from support.workloadapi import workload_pb2, workload_pb2_grpc

# SPIRE's answers (pkg/agent/endpoints/workload): a call without the header, and a caller with no identity.
HEADER = ("workload.spiffe.io", "true")
HEADER_MISSING = "security header missing from request"
NO_IDENTITY = "no identity issued"


@dataclass
class _Served:
    """What the agent serves now, decoded from the last "set"."""

    svids: list[workload_pb2.X509SVID] = field(default_factory=list)
    federated: dict[str, bytes] = field(default_factory=dict)

    def svid_response(self) -> workload_pb2.X509SVIDResponse:
        return workload_pb2.X509SVIDResponse(svids=self.svids, federated_bundles=self.federated)

    def bundles_response(self) -> workload_pb2.X509BundlesResponse:
        own = {_trust_domain_id(s.spiffe_id): s.bundle for s in self.svids}
        return workload_pb2.X509BundlesResponse(bundles=own | self.federated)


def _trust_domain_id(spiffe_id: str) -> str:
    """spiffe://domain/path -> spiffe://domain, the key the standard's bundle maps use."""
    return "spiffe://" + spiffe_id.removeprefix("spiffe://").split("/", 1)[0]


_DROP = object()
"""Put on a stream's queue: end that stream with UNAVAILABLE."""


class StandInAgent(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """The X.509 half of the Workload API; the JWT methods answer UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.served = _Served()
        self.silent = False
        self.opened = 0
        self.rejected = 0
        self._queues: set[asyncio.Queue[object]] = set()

    def push(self) -> None:
        """Wake every open stream: each sends what is served now."""
        for queue in self._queues:
            queue.put_nowait(None)

    def drop(self) -> None:
        for queue in self._queues:
            queue.put_nowait(_DROP)

    @property
    def streams(self) -> int:
        return len(self._queues)

    async def _check_header(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if HEADER not in tuple(context.invocation_metadata() or ()):
            self.rejected += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, HEADER_MISSING)

    async def _stream(
        self, context: grpc.aio.ServicerContext[Any, Any], respond: Callable[[], Any]
    ) -> AsyncIterator[Any]:
        await self._check_header(context)
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._queues.add(queue)
        self.opened += 1
        try:
            if not self.silent:
                if not self.served.svids:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY)
                yield respond()
            while True:
                item = await queue.get()
                if item is _DROP:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "stand-in agent dropped the stream")
                if not self.silent and self.served.svids:
                    yield respond()
        finally:
            self._queues.discard(queue)

    async def FetchX509SVID(  # noqa: N802 - the standard's method name
        self, _request: workload_pb2.X509SVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        # An async generator itself: grpc.aio tells streaming handlers by that.
        async for response in self._stream(context, self.served_svids):
            yield response

    async def FetchX509Bundles(  # noqa: N802 - the standard's method name
        self, _request: workload_pb2.X509BundlesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        # An async generator itself: grpc.aio tells streaming handlers by that.
        async for response in self._stream(context, self.served_bundles):
            yield response

    def served_svids(self) -> workload_pb2.X509SVIDResponse:
        return self.served.svid_response()

    def served_bundles(self) -> workload_pb2.X509BundlesResponse:
        return self.served.bundles_response()

    async def FetchJWTSVID(  # noqa: N802 - the standard's method name
        self, _request: workload_pb2.JWTSVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> workload_pb2.JWTSVIDResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the stand-in agent serves X509-SVIDs only")

    async def FetchJWTBundles(  # noqa: N802 - the standard's method name
        self, _request: workload_pb2.JWTBundlesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the stand-in agent serves X509-SVIDs only")
        yield workload_pb2.JWTBundlesResponse()  # never reached: makes this an async generator, as grpc.aio wants

    async def ValidateJWTSVID(  # noqa: N802 - the standard's method name
        self, _request: workload_pb2.ValidateJWTSVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the stand-in agent serves X509-SVIDs only")

    def apply(self, command: dict[str, Any]) -> dict[str, Any]:
        """Carry out one control command; return its answer."""
        op = command["op"]
        if op == "set":
            self.served = _Served(
                svids=[
                    workload_pb2.X509SVID(
                        spiffe_id=s["spiffe_id"],
                        x509_svid=base64.b64decode(s["chain"]),
                        x509_svid_key=base64.b64decode(s["key"]),
                        bundle=base64.b64decode(s["bundle"]),
                        hint=s.get("hint", ""),
                    )
                    for s in command["svids"]
                ],
                federated={td: base64.b64decode(der) for td, der in command["federated"].items()},
            )
            self.push()
        elif op == "silent":
            self.silent = bool(command["on"])
        elif op == "drop":
            self.drop()
        elif op != "status":
            return {"ok": False, "error": f"unknown op {op!r}"}
        return {"ok": True, "streams": self.streams, "opened": self.opened, "rejected": self.rejected}


def _answer(answer: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


async def _serve(socket_path: Path) -> None:
    agent = StandInAgent()
    server = grpc.aio.server()
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(agent, server)
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    _answer({"ready": True})
    try:
        while line := await stdin.readline():
            _answer(agent.apply(json.loads(line)))
    finally:
        await server.stop(grace=None)
        socket_path.unlink(missing_ok=True)  # noqa: ASYNC240 - the last thing the process does


if __name__ == "__main__":
    asyncio.run(_serve(Path(sys.argv[1])))
