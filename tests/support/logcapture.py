"""Log capture: the in-process sink every server writes to, and what the leak check searches for."""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from support.constants import API_SECRET
from synctoken_server.audit import logs
from synctoken_server.audit.linesink import LineSink


def callers(sink: LogSink, identity: str) -> list[str]:
    """The caller of each IssueToken audit record for `identity`, in order."""
    return [r["caller_id"] for r in sink.records() if r["event"] == "token.decision" and r.get("identity") == identity]


class LogSink(io.RawIOBase):
    """Where every in-process server's log lines go: kept in memory for assertions and the leak check."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def write(self, data: bytes) -> int:  # type: ignore[override]
        with self._lock:
            self.lines.extend(line for line in data.decode("utf-8").splitlines() if line)
        return len(data)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def records(self, start: int = 0) -> list[dict[str, Any]]:
        """The JSON records written since line `start`."""
        with self._lock:
            return [json.loads(line) for line in self.lines[start:]]


@dataclass
class LeakWatch:
    """What must never appear in any log: filled in as the suite runs."""

    secrets: set[str] = field(default_factory=lambda: {API_SECRET, "PRIVATE KEY"})
    tokens: set[str] = field(default_factory=set)
    log_files: list[Path] = field(default_factory=list)


def chain_logger(sink: LineSink, worker: int | None = None) -> Any:
    """A strict logger over `sink` on structlog's JSON chain, as logs.configure sets up every logger but the audit's."""
    return structlog.wrap_logger(
        logs.LineLogger(sink, strict=True),
        processors=[*logs.shared_processors(worker), logs.json_renderer()],
    )
