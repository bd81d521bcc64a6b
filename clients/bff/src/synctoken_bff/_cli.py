"""synctoken-bff: serve the BFF with uvicorn, settings from SYNCTOKEN_* and BFF_* variables."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn

from synctoken.client import AsyncTokenClient
from synctoken_bff._app import create_app
from synctoken_bff._settings import Settings


def run(argv: list[str] | None = None) -> None:
    """Parse the command line, read the environment, and serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="synctoken-bff", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on; 0 picks a free one (default: 8080)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = Settings.from_env(os.environ)
        client = AsyncTokenClient.from_env()
    except (OSError, ValueError) as exc:
        print(f"synctoken-bff: {exc}", file=sys.stderr)
        sys.exit(2)
    app = create_app(client, settings)
    # The access log shows paths and query strings (?device=...), never a response body, so no token.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", proxy_headers=True)
