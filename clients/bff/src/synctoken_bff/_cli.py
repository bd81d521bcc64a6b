"""synctoken-bff: serve the BFF with uvicorn, settings from SYNCTOKEN_* and BFF_* variables."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType

import uvicorn

from synctoken.client import AsyncTokenClient
from synctoken_bff._app import create_app
from synctoken_bff._settings import Settings
from synctoken_bff._tracing import start_from_env

# uvicorn's exit status for a server that could not start (uvicorn.run's); its module for it
# moved between the versions the range allows, the value never did.
STARTUP_FAILURE = 3


def run(argv: list[str] | None = None) -> None:
    """Parse the command line, read the environment, and serve until SIGINT or SIGTERM; then exit 0."""
    parser = argparse.ArgumentParser(prog="synctoken-bff", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on; 0 picks a free one (default: 8080)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = Settings.from_env(os.environ)
        # Before the client and the app: both check for a tracer provider when they are made.
        stop_tracing = start_from_env(os.environ)
        client = AsyncTokenClient.from_env()
    # OSError: a TimeoutError too (no SVID from the SPIFFE Workload API in time); ImportError: its extra missing.
    except (OSError, ValueError, ImportError) as exc:
        print(f"synctoken-bff: {exc}", file=sys.stderr)
        sys.exit(2)
    app = create_app(client, settings)
    # The access log shows paths and query strings (?device=...), never a response body, so no token.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", proxy_headers=True)
    server = uvicorn.Server(config)
    _stop_cleanly_on_signals(server)
    server.run()
    if stop_tracing is not None:
        stop_tracing()  # exports the last spans
    if not server.started:
        # As uvicorn.run does when it could not start (a port in use, say).
        sys.exit(STARTUP_FAILURE)


def _stop_cleanly_on_signals(server: uvicorn.Server) -> None:
    """Make SIGINT and SIGTERM a clean stop with exit status 0, so that `make bff` stopped by them is no error.

    While it serves, uvicorn handles both itself (a graceful shutdown), then
    restores the handlers it found and raises the signal again to end the
    process by it, which a shell reports as 130 or 143. The handlers it finds
    are these: they take the re-raised signal as done, and the process exits 0.
    One that arrives before uvicorn took over asks the server to stop as soon as it starts.
    """

    def stop(_signum: int, _frame: FrameType | None) -> None:
        server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
