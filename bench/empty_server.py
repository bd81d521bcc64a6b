"""The stack's ceiling: a gRPC server with synctoken's flavour and TLS set-up, whose one RPC does nothing.

Same grpc.aio server on the same event loop (uvloop), same options, same mTLS
credentials (client certificate required), same raw-bytes handler
registration; the handler returns an empty message at once.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

import grpc
import uvloop

# This module alone: importing the rest of synctoken would add its libraries to the ceiling's memory.
from synctoken_server.serveroptions import ServerTimeouts, server_options

METHOD = "/bench.Empty/Call"


async def _call(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    del request, context
    return b""


async def _serve(port: int, directory: Path) -> None:
    # synctoken's own options at their defaults (message size, connection timeouts and ages): the same stack.
    server = grpc.aio.server(options=server_options(ServerTimeouts(), reuse_port=False))
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(_call)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Empty", {"Call": handler}),))
    credentials = grpc.ssl_server_credentials(
        [((directory / "server-key.pem").read_bytes(), (directory / "server.pem").read_bytes())],
        root_certificates=(directory / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    bound = server.add_secure_port(f"localhost:{port}", credentials)
    await server.start()
    print(f"listening on {bound}", flush=True)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await server.stop(1)


def main() -> None:
    """Serve until SIGTERM."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pki", type=Path, required=True, help="folder with ca.pem, server.pem, server-key.pem")
    args = parser.parse_args()
    # The loop synctoken serve runs on (process/running.py's new_event_loop), named here, not imported:
    # running.py would bring the rest of synctoken with it.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(args.port, args.pki))


if __name__ == "__main__":
    main()
