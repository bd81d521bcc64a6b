"""structlog set-up: JSON lines (a console renderer on a TTY), configured once by the entry point.

Lines go out through a `LineSink` (linesink.py), which writes each record whole
or reports it unwritten; only the audit logger lets that report through.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, BinaryIO

import orjson
import structlog
from structlog.typing import EventDict

from synctoken_server.audit.linesink import Flag, LineSink, Lock, nonblocking_unless_terminal

AUDIT_LOGGER = "synctoken.audit"
"""The one logger whose failed writes are errors (see AuditLog); every other line is best effort."""

# Characters that JSON allows raw but that line-splitting readers (Python's
# str.splitlines, many log shippers, JavaScript) treat as line ends: escaped,
# so one record is always one line.
_LINE_BREAKS_UTF8 = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))
# On a terminal every control character is escaped too: escape sequences in
# a value (an identity, a SAN) must not drive the operator's terminal.
_CONSOLE_ESCAPES = str.maketrans(
    {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]} | {0x2028: "\\u2028", 0x2029: "\\u2029"}
)
MAX_VALUE_CHARACTERS = 1024
"""Longer string values are cut (a refused request may carry 4 KiB of anything); tracebacks as below."""

MAX_TRACEBACK_CHARACTERS = 8192
"""A traceback (`exception`, a stack) has each line cut at MAX_VALUE_CHARACTERS, and is cut at this many
characters in all, in its middle: its first frames and its last ones, with the exception's type, are kept."""

_TRACEBACK_KEYS = frozenset({"exception", "stack", "stack_info"})

MAX_ITEMS = 8
MAX_ITEM_CHARACTERS = 256
"""List values keep their first MAX_ITEMS items, each cut at MAX_ITEM_CHARACTERS."""

_output: LineSink | None = None
_worker: int | None = None
_json_lines = False
"""Whether the output takes JSON lines (not the console renderer): then audit records skip structlog's chain."""


class LineLogger:
    """The structlog logger over a LineSink; only the audit logger lets write errors through."""

    def __init__(self, sink: LineSink, *, strict: bool) -> None:
        self._sink = sink
        self._strict = strict

    def msg(self, message: str | bytes) -> None:
        """Write one rendered record."""
        # backslashreplace: a lone surrogate (a file name not in UTF-8) is written escaped, not raised.
        data = message.encode("utf-8", "backslashreplace") if isinstance(message, str) else message
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


class AuditLogger:
    """The audit logger: each record rendered as structlog's JSON chain renders it, and written whole, or raised.

    Every IssueToken writes one record, and structlog's chain of bound logger
    and processors cost twice the rendering and the write themselves
    (`python -m bench.micro`), so records take this shorter path to the same
    bytes: the same fields, worker, level and timestamp, cut and escaped the
    same way (a parity test holds the two together). On a terminal, or before
    `configure`, the record goes through structlog after all.
    """

    def info(self, event: str, **fields: object) -> None:
        """Write one record at level info; raise OSError or ValueError unless all of it was written."""
        if _output is None or not _json_lines:
            structlog.get_logger(AUDIT_LOGGER).info(event, **fields)
            return
        _output.write_line(render_json(event, fields, _worker))


def render_json(event: str, fields: Mapping[str, object], worker: int | None = None) -> bytes:
    """One record as the JSON chain (`shared_processors(worker)`, `json_renderer`) renders it at level info."""
    record: dict[str, Any] = {**fields, "event": event}
    if worker is not None:
        record["worker"] = worker
    record["level"] = "info"
    record["timestamp"] = utc_timestamp(time.time_ns())
    return json_dumps(_truncate_long_values(None, "info", record))


_second_text: tuple[int, str] = (-1, "")
"""The last whole second formatted, and its text: records come many to a second."""


def utc_timestamp(ns: int) -> str:
    """`ns` (Unix time, nanoseconds) as structlog's TimeStamper(fmt="iso", utc=True) writes the time.

    That is datetime.isoformat() with "Z" for "+00:00": microseconds, and none at all when they are zero.
    """
    global _second_text  # noqa: PLW0603 - a cache; a race only formats one second twice
    second, micro = divmod(ns // 1000, 1_000_000)
    cached_second, text = _second_text
    if second != cached_second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second_text = (second, text)
    return f"{text}.{micro:06d}Z" if micro else f"{text}Z"


def _sink_for(stream: BinaryIO) -> LineSink:
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # in-memory streams, such as the tests' sink
        return LineSink(stream.write)
    return LineSink.for_fd(fd)


def share_output(lock: Lock, torn: Flag) -> None:
    """Share one output's lock and torn state between processes.

    Then they never interleave lines, and none glues its line to another's fragment.
    """
    if _output is not None:
        _output.share(lock, torn)


def output_last_write_ok() -> bool:
    """Whether the output's last write, audit or not, worked (True when none is configured)."""
    return _output is None or _output.writable


def output_looks_ready() -> bool:
    """Whether the output looks able to take a record, found without writing (True when none is configured)."""
    return _output is None or _output.check()


def shared_processors(worker: int | None = None) -> list[structlog.typing.Processor]:
    """Processors every synctoken log line goes through, renderer excluded."""
    # No context variables: an RPC passes what its lines say about it explicitly (see servicer._Rpc).
    processors: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Plain formatted tracebacks: never the frame locals, which may hold the API secret.
        structlog.processors.format_exc_info,
        _truncate_long_values,
    ]
    if worker is not None:
        # With --workers, every line (audit records included) says which process wrote it.
        processors.insert(0, _AddWorker(worker))
    return processors


class _AddWorker:
    def __init__(self, worker: int) -> None:
        self._worker = worker

    def __call__(
        self, _logger: Any, _method: str, event_dict: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        event_dict["worker"] = self._worker
        return event_dict


def _truncate_long_values(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    # On every audit record: the common case (short strings, numbers) costs one type check and one length.
    for key, value in event_dict.items():
        if isinstance(value, str):
            if len(value) > MAX_VALUE_CHARACTERS:
                event_dict[key] = _cut_traceback(value) if key in _TRACEBACK_KEYS else _cut(value, MAX_VALUE_CHARACTERS)
        elif isinstance(value, (list, tuple)) and value:
            # Lists too (the SANs a refused certificate offered): at most a few short items.
            kept = [_cut(item, MAX_ITEM_CHARACTERS) if isinstance(item, str) else item for item in value[:MAX_ITEMS]]
            if len(value) > MAX_ITEMS:
                kept.append(f"...[{len(value) - MAX_ITEMS} more items]")
            event_dict[key] = kept
    return event_dict


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...[{len(text) - limit} more characters]"


def _cut_traceback(text: str) -> str:
    # A traceback's text comes from outside too: an exception's message (a library's, a peer's bytes) may be
    # of any length, and a chain of exceptions of any depth. Line by line first, so that a long message keeps
    # the exception's type; then the middle frames go, which say least about where and what.
    text = "\n".join(_cut(line, MAX_VALUE_CHARACTERS) for line in text.split("\n"))
    if len(text) <= MAX_TRACEBACK_CHARACTERS:
        return text
    head = MAX_TRACEBACK_CHARACTERS // 4
    tail = MAX_TRACEBACK_CHARACTERS - head
    return f"{text[:head]}\n...[{len(text) - head - tail} characters cut]...\n{text[-tail:]}"


def json_dumps(value: Any, **_kwargs: Any) -> bytes:
    """orjson, with the line-ending characters JSON leaves raw escaped, and lone surrogates written as escapes."""
    try:
        data = orjson.dumps(value)
    except orjson.JSONEncodeError:
        # A lone surrogate is no UTF-8, and orjson refuses it: a file name that is not UTF-8 holds one as
        # Python decodes it. Escaped rather than raised into whatever logged it (a reload, a stop).
        data = orjson.dumps(_surrogates_escaped(value))
    if b"\xc2" in data or b"\xe2" in data:  # cheap test first: most lines are ASCII
        for raw, escaped in _LINE_BREAKS_UTF8:
            data = data.replace(raw, escaped)
    return data


def _surrogates_escaped(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_surrogates_escaped(key): _surrogates_escaped(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_surrogates_escaped(item) for item in value]
    return value


def json_renderer() -> structlog.typing.Processor:
    """JSON as bytes via orjson: the audit line is on every RPC's path, and this cuts its cost by a third."""
    return structlog.processors.JSONRenderer(serializer=json_dumps)


def _escape_console_line(_logger: Any, _method: str, rendered: str) -> str:
    # Newlines too, the renderer's own before a traceback included: one record, one line.
    return rendered.translate(_CONSOLE_ESCAPES)


def configure(stream: BinaryIO | None = None, *, worker: int | None = None) -> None:
    """Send all structlog output to `stream` as JSON lines; by default to stdout, for humans on a TTY."""
    console = stream is None and sys.stdout.isatty()
    renderers: list[structlog.typing.Processor] = (
        [structlog.dev.ConsoleRenderer(colors=False), _escape_console_line]  # type: ignore[list-item]
        if console
        else [json_renderer()]
    )
    # The process has one log output, configured once here.
    global _output, _worker, _json_lines  # noqa: PLW0603
    _output = _sink_for(stream or sys.stdout.buffer)
    _worker = worker
    _json_lines = not console
    if stream is None:
        # gRPC's core writes its own ERROR lines to stderr: a stalled stderr
        # pipe must drop them, not freeze the threads that wrote them.
        nonblocking_unless_terminal(sys.stderr.fileno())
    sink = _output
    structlog.configure(
        processors=[*shared_processors(worker), *renderers],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=LineLoggerFactory(sink),
        cache_logger_on_first_use=True,
    )
    _route_standard_logging(sink, worker, console=console)


def _route_standard_logging(sink: LineSink, worker: int | None, *, console: bool) -> None:
    """Send the standard library's log records (asyncio's, gRPC's) into the same output, the same way.

    Without this, a record such as asyncio's "Task exception was never retrieved"
    reaches stderr as free text through logging's last resort: neither JSON nor
    one line. Warnings and above, as logging's default; each record says its `logger`.
    """
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=False)
        if console
        else structlog.processors.JSONRenderer(serializer=lambda value, **_: json_dumps(value).decode())
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared_processors(worker)],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
            *([_escape_console_line] if console else []),  # type: ignore[list-item]
        ],
    )
    handler = _LineHandler(LineLogger(sink, strict=False))
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LineHandler)]:  # configure again: one handler
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


class _LineHandler(logging.Handler):
    """A logging handler that writes each formatted record as one line, never raising (as LineLogger)."""

    def __init__(self, line_logger: LineLogger) -> None:
        super().__init__()
        self._line_logger = line_logger

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record; one that cannot be formatted (arguments that do not fit) is said without its arguments.

        Not logging's handleError: it prints a traceback on stderr, free text over
        many lines, ending with the record's arguments, which may hold anything.
        """
        try:
            line = self.format(record)
        except Exception as exc:  # noqa: BLE001 - a handler never raises into the code that logged
            said = logging.LogRecord(
                record.name,
                record.levelno,
                record.pathname,
                record.lineno,
                "log record not formatted (%s): %s",
                (type(exc).__name__, _cut(str(record.msg), MAX_VALUE_CHARACTERS)),
                None,
            )
            try:
                line = self.format(said)
            except Exception:  # noqa: BLE001 - nothing more to say that could be written
                return
        self._line_logger.msg(line)
