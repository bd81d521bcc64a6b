"""structlog set-up: JSON lines (a console renderer on a TTY), configured once by the entry point."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def shared_processors() -> list[structlog.typing.Processor]:
    """Processors every synctoken log line goes through, renderer excluded."""
    return [
        # Context first: pool threads are reused, and each RPC clears and binds its own.
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Plain formatted tracebacks: never the frame locals, which may hold the API secret.
        structlog.processors.format_exc_info,
    ]


def configure(stream: TextIO | None = None, *, json: bool | None = None) -> None:
    """Send all structlog output to `stream` (default stdout) as JSON, or for humans on a TTY."""
    out = stream or sys.stdout
    use_json = not out.isatty() if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared_processors(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
