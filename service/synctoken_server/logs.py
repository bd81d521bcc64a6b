"""structlog set-up: JSON lines (a console renderer on a TTY), configured once by the entry point.

Lines go out through `LineSink`, which writes each record whole or reports it
unwritten: the audit log's fail-closed rule depends on knowing that every byte
of a record, newline included, reached the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

import orjson
import structlog

AUDIT_LOGGER = "synctoken.audit"
"""The one logger whose failed writes are errors (see AuditLog); every other line is best effort."""

# Characters that JSON allows raw but that line-splitting readers (Python's
# str.splitlines, many log shippers, JavaScript) treat as line ends: escaped,
# so one record is always one line.
_LINE_BREAKS_UTF8 = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))
_LINE_BREAKS_TEXT = str.maketrans({"\x85": "\\x85", "\u2028": "\\u2028", "\u2029": "\\u2029"})


class LineSink:
    """Writes whole lines to one output, shared by every logger that writes there.

    A write that fails part-way leaves a torn line behind; the next line then
    starts with a newline of its own, so the fragment never merges with it.
    """

    def __init__(self, write: Callable[[bytes], int]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._torn = False

    @classmethod
    def for_stream(cls, stream: BinaryIO) -> LineSink:
        """A sink on `stream`: straight to its file descriptor when it has one, bypassing Python's buffer."""
        try:
            fd = stream.fileno()
        except (OSError, ValueError):  # in-memory streams, such as the tests' sink
            return cls(stream.write)
        return cls(lambda data: os.write(fd, data))

    def write_line(self, line: bytes) -> None:
        """Write `line` and a newline; raise OSError unless every byte was written."""
        data = b"\n" + line + b"\n" if self._torn else line + b"\n"
        with self._lock:
            written = 0
            try:
                while written < len(data):
                    written += self._write(data[written:])
            except BaseException:
                self._torn = self._torn or written > 0
                raise
            self._torn = False


class LineLogger:
    """The structlog logger over a LineSink; only the audit logger lets write errors through."""

    def __init__(self, sink: LineSink, *, strict: bool) -> None:
        self._sink = sink
        self._strict = strict

    def msg(self, message: str | bytes) -> None:
        """Write one rendered record."""
        data = message.encode("utf-8") if isinstance(message, str) else message
        if self._strict:
            self._sink.write_line(data)
            return
        # An operational line that cannot be written must never stop what
        # logged it: a stop handler, a supervisor, a health change.
        with contextlib.suppress(OSError, ValueError):
            self._sink.write_line(data)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class LineLoggerFactory:
    """Gives the audit logger a strict LineLogger and every other logger a lenient one, on one sink."""

    def __init__(self, sink: LineSink) -> None:
        self._sink = sink

    def __call__(self, *args: Any) -> LineLogger:
        """Structlog passes get_logger's positional arguments: the first is the logger's name."""
        return LineLogger(self._sink, strict=bool(args) and args[0] == AUDIT_LOGGER)


def shared_processors(worker: int | None = None) -> list[structlog.typing.Processor]:
    """Processors every synctoken log line goes through, renderer excluded."""
    processors: list[structlog.typing.Processor] = [
        # Context first: each RPC clears and binds its own (see servicer._serve).
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Plain formatted tracebacks: never the frame locals, which may hold the API secret.
        structlog.processors.format_exc_info,
    ]
    if worker is not None:
        # With --workers, every line (audit records included) says which process wrote it.
        processors.insert(1, _AddWorker(worker))
    return processors


class _AddWorker:
    def __init__(self, worker: int) -> None:
        self._worker = worker

    def __call__(
        self, _logger: Any, _method: str, event_dict: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        event_dict["worker"] = self._worker
        return event_dict


def json_dumps(value: Any, **_kwargs: Any) -> bytes:
    """orjson, with the line-ending characters JSON leaves raw escaped."""
    data = orjson.dumps(value)
    if b"\xc2" in data or b"\xe2" in data:  # cheap test first: most lines are ASCII
        for raw, escaped in _LINE_BREAKS_UTF8:
            data = data.replace(raw, escaped)
    return data


def json_renderer() -> structlog.typing.Processor:
    """JSON as bytes via orjson: the audit line is on every RPC's path, and this cuts its cost by a third."""
    return structlog.processors.JSONRenderer(serializer=json_dumps)


def _escape_console_line(_logger: Any, _method: str, rendered: str) -> str:
    return rendered.translate(_LINE_BREAKS_TEXT)


def configure(stream: BinaryIO | None = None, *, worker: int | None = None) -> None:
    """Send all structlog output to `stream` as JSON lines; by default to stdout, for humans on a TTY."""
    renderers: list[structlog.typing.Processor]
    if stream is None and sys.stdout.isatty():
        renderers = [structlog.dev.ConsoleRenderer(colors=False), _escape_console_line]  # type: ignore[list-item]
    else:
        renderers = [json_renderer()]
    sink = LineSink.for_stream(stream or sys.stdout.buffer)
    structlog.configure(
        processors=[*shared_processors(worker), *renderers],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=LineLoggerFactory(sink),
        cache_logger_on_first_use=True,
    )
