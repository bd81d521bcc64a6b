"""Log lines: one record per line whatever the values hold, and whole records or none."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from synctoken_server import logs
from synctoken_server.audit import AuditLog
from synctoken_server.errors import AuditUnavailable


class FillingFile:
    """A real file that behaves like a disk filling up: it takes `room` more bytes, then ENOSPC."""

    def __init__(self, path: Path, room: int) -> None:
        self.path = path
        self.room = room
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def write(self, data: bytes) -> int:
        """Write what fits, as the kernel does; fail once nothing fits."""
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = os.write(self._fd, data[: self.room])
        self.room -= written
        return written

    def close(self) -> None:
        """Close the descriptor."""
        os.close(self._fd)


@pytest.fixture
def filling(tmp_path: Path) -> Iterator[FillingFile]:
    """A FillingFile with room for 40 bytes."""
    file = FillingFile(tmp_path / "audit.log", 40)
    yield file
    file.close()


class TestLineSink:
    """Whole lines or an error."""

    def test_torn_line_raises_and_next_line_starts_fresh(self, filling: FillingFile) -> None:
        """A line cut short raises; once there is room again, the next line does not merge with the fragment."""
        sink = logs.LineSink(filling.write)
        sink.write_line(b'{"n":1}')
        with pytest.raises(OSError, match="No space left"):
            sink.write_line(b'{"n":2,"padding":"' + b"x" * 40 + b'"}')
        filling.room = 1000
        sink.write_line(b'{"n":3}')
        lines = filling.path.read_bytes().split(b"\n")
        assert json.loads(lines[0]) == {"n": 1}
        assert lines[1].startswith(b'{"n":2')  # the fragment, on a line of its own
        assert json.loads(lines[2]) == {"n": 3}

    def test_short_writes_are_completed(self, filling: FillingFile) -> None:
        """A write that takes only part of a line is continued until the whole line is out."""
        filling.room = 1000
        taken: list[int] = []

        def two_bytes_at_a_time(data: bytes) -> int:
            taken.append(filling.write(data[:2]))
            return taken[-1]

        logs.LineSink(two_bytes_at_a_time).write_line(b'{"a":"b"}')
        assert filling.path.read_bytes() == b'{"a":"b"}\n'
        assert len(taken) == 5


class TestAuditLogHealth:
    """AuditLog knows whether its last write worked, and can find out again."""

    def test_unwritable_then_writable_again(self, filling: FillingFile) -> None:
        """A failed record marks the log unwritable; probe() writes a line once there is room again."""
        logger = structlog.wrap_logger(
            logs.LineLogger(logs.LineSink(filling.write), strict=True),
            processors=[*logs.shared_processors(), logs.json_renderer()],
        )
        audit = AuditLog(logger)
        filling.room = 0
        with pytest.raises(AuditUnavailable):
            audit.record("token.decision", outcome="issued")
        assert not audit.writable
        assert not audit.probe()
        filling.room = 1000
        assert audit.probe()
        assert audit.writable
        [line] = filling.path.read_bytes().splitlines()
        assert json.loads(line)["event"] == "audit.writable_again"

    def test_operational_lines_never_raise(self, filling: FillingFile) -> None:
        """Only the audit logger reports failed writes; other loggers drop the line."""
        filling.room = 0
        factory = logs.LineLoggerFactory(logs.LineSink(filling.write))
        factory("synctoken").info(b"{}")
        with pytest.raises(OSError, match="No space left"):
            factory(logs.AUDIT_LOGGER).info(b"{}")


class TestLineBreaks:
    """Characters that line-splitting readers take as line ends are escaped."""

    @pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"])
    def test_one_record_one_line(self, char: str) -> None:
        """A value holding any line-ending character still renders as one line that parses back to it."""
        rendered = logs.json_dumps({"identity": f"a{char}b", "event": "token.decision"}).decode("utf-8")
        assert len(rendered.splitlines()) == 1
        assert json.loads(rendered)["identity"] == f"a{char}b"

    def test_console_renderer_escapes_too(self) -> None:
        """On a TTY the console format escapes them as well."""
        assert logs._escape_console_line(None, "info", "x\u2028y\u2029z\x85") == "x\\u2028y\\u2029z\\x85"
