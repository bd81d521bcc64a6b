"""Log lines: one record per line whatever the values hold, and whole records or none."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import multiprocessing
import os
import pty
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.logcapture import chain_logger
from synctoken_server.audit import linesink, logs
from synctoken_server.audit.linesink import LineSink, OutputStalled
from synctoken_server.audit.record import AuditLog
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


def on_a_terminal(script: str) -> str:
    """What a Python `script` writes to stdout when stdout is a terminal (a pty), read as it is written."""
    leader, follower = pty.openpty()
    chunks: list[bytes] = []
    try:
        with subprocess.Popen([sys.executable, "-c", script], stdout=follower) as process:
            os.close(follower)
            follower = -1
            # Read while it writes: a pty holds a few kilobytes, and a writer beyond that waits for a reader.
            while select.select([leader], [], [], 60)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: every writer's end is closed
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            assert process.wait(timeout=60) == 0
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    return b"".join(chunks).decode()


class TestLineSink:
    """Whole lines or an error."""

    def test_torn_line_raises_and_next_line_starts_fresh(self, filling: FillingFile) -> None:
        """A line cut short raises; once there is room again, the next line does not merge with the fragment."""
        sink = LineSink(filling.write)
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

        LineSink(two_bytes_at_a_time).write_line(b'{"a":"b"}')
        assert filling.path.read_bytes() == b'{"a":"b"}\n'
        assert len(taken) == 5


class TestAuditLogHealth:
    """AuditLog knows whether its last write worked, and can find out again."""

    def test_unwritable_then_writable_again(self, filling: FillingFile) -> None:
        """A failed record marks the log unwritable; probe() writes a line once there is room again."""
        logger = chain_logger(LineSink(filling.write))
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
        factory = logs.LineLoggerFactory(LineSink(filling.write))
        factory("synctoken").info(b"{}")
        with pytest.raises(OSError, match="No space left"):
            factory(logs.AUDIT_LOGGER).info(b"{}")


# Values an audit record can hold: every JSON type it uses, and each kind of string the chain treats specially.
_AUDIT_VALUES: dict[str, object] = {
    "ascii": "alice",
    "empty": "",
    "none": None,
    "bool": True,
    "zero": 0,
    "int": 3600,
    "float": 1.25,
    "non-ascii-and-astral": "ålice 日本 \U0001f600",
    "line-breaks-and-controls": "a\u2028b\u2029c\x85d\ne\r\x00\x1b[2J",
    "quotes-and-slashes": '"quoted" \\ back/slash',
    "one-over-the-cut": "x" * (logs.MAX_VALUE_CHARACTERS + 1),
    "at-the-cut": "y" * logs.MAX_VALUE_CHARACTERS,
    "long-list": ["spiffe://td/a", "\x01" * 5000, *(f"dns{n}" for n in range(20))],
    "tuple": ("a", "b"),
    "empty-list": [],
    "dict": {"nested": "\u2028"},
}


def _rendered_by_chain(event: str, fields: dict[str, object], worker: int | None) -> bytes:
    """The line structlog's JSON chain writes for one audit record."""
    lines: list[bytes] = []

    def keep(data: bytes) -> int:
        lines.append(data)
        return len(data)

    logger = chain_logger(LineSink(keep), worker)
    logger.info(event, **fields)
    [line] = lines
    return line.removesuffix(b"\n")


def _without_timestamp(line: bytes) -> tuple[bytes, str]:
    """The line with its timestamp value blanked, and that value."""
    record = json.loads(line)
    stamp = record["timestamp"]
    return line.replace(f'"timestamp":"{stamp}"'.encode(), b'"timestamp":""'), stamp


class TestAuditLineParity:
    """Audit records skip structlog's chain for speed, and must come out as the chain would write them."""

    @pytest.mark.parametrize("worker", [None, 0, 3])
    @pytest.mark.parametrize("value", _AUDIT_VALUES.values(), ids=_AUDIT_VALUES.keys())
    def test_same_bytes_as_the_chain(self, value: object, worker: int | None) -> None:
        """Same fields in the same order, cut and escaped alike; the timestamps differ only in time."""
        fields: dict[str, object] = {
            "rpc": "IssueToken",
            "caller_id": "spiffe://td/bff",
            "identity": value,
            "outcome": "issued",
            "presented_sans": value,
            "duration_ms": 0.123,
        }
        lean, lean_stamp = _without_timestamp(logs.render_json("token.decision", fields, worker))
        chain, chain_stamp = _without_timestamp(_rendered_by_chain("token.decision", fields, worker))
        assert lean == chain
        assert len(lean.splitlines()) == 1
        stamp_form = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z"
        assert re.fullmatch(stamp_form, lean_stamp)
        assert re.fullmatch(stamp_form, chain_stamp)
        gap = dt.datetime.fromisoformat(chain_stamp) - dt.datetime.fromisoformat(lean_stamp)
        assert dt.timedelta(0) <= gap < dt.timedelta(seconds=5)

    @pytest.mark.parametrize(
        "ns",
        [
            0,
            1,
            999,
            1_000,
            999_999_999,
            1_000_000_000,
            1_764_421_200_000_000_000,
            1_764_421_200_123_456_789,
            4_102_444_799_999_999_000,
        ],
    )
    def test_timestamp_as_isoformat_writes_it(self, ns: int) -> None:
        """The audit line's time is datetime's isoformat for the same microsecond, with Z; no fraction on a whole second."""
        micro = ns // 1000
        expected = dt.datetime.fromtimestamp(micro // 1_000_000, tz=dt.UTC).replace(microsecond=micro % 1_000_000)
        assert logs.utc_timestamp(ns) == expected.isoformat().replace("+00:00", "Z")
        assert logs.utc_timestamp(ns) == logs.utc_timestamp(ns)  # the cached second gives the same text

    def test_on_a_terminal_records_go_through_structlog(self) -> None:
        """With stdout on a TTY the console renderer is in force, and audit records use it too."""
        script = (
            "from synctoken_server.audit import logs; from synctoken_server.audit.record import AuditLog; logs.configure(); "
            "AuditLog().record('token.decision', {'identity': 'a\\x1bb'}, outcome='issued')"
        )
        shown = on_a_terminal(script)
        assert "token.decision" in shown
        assert "outcome=issued" in shown
        assert "identity=a\\x1bb" in shown  # escaped by the console path
        assert not shown.lstrip().startswith("{")


# As the console script starts: library warnings silenced before any import, then the logs configured.
_UNRETRIEVED_TASK_EXCEPTION = """
import gc, sys
from synctoken._quiet import quiet_library_warnings
quiet_library_warnings()
from synctoken_server.audit import logs
from synctoken_server.process import running
logs.configure(worker=int(sys.argv[1]) if len(sys.argv) > 1 else None)

async def fails():
    raise ValueError("line one\\nline two")

async def main():
    task = running.asyncio.ensure_future(fails())
    await running.asyncio.sleep(0)
    del task  # never awaited: asyncio's logger reports its exception when it is collected
    gc.collect()

running.run_on_server_loop(main())
"""


class TestStandardLogging:
    """Records of the standard library's loggers (asyncio's, gRPC's) come out as synctoken's own lines."""

    @pytest.mark.parametrize("worker", [None, 2])
    def test_asyncio_record_is_one_json_line(self, worker: int | None) -> None:
        """An exception no task retrieved, on the server's event loop: one JSON record, nothing on stderr."""
        args = [] if worker is None else [str(worker)]
        result = subprocess.run(
            [sys.executable, "-c", _UNRETRIEVED_TASK_EXCEPTION, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert result.stderr == ""
        [line] = result.stdout.splitlines()
        record = json.loads(line)
        assert record["event"].startswith("Task exception was never retrieved")
        assert record["logger"] == "asyncio"
        assert record["level"] == "error"
        assert record["exception"].startswith("Traceback (most recent call last):")
        assert record["exception"].rstrip().endswith("ValueError: line one\nline two")
        assert record.get("worker") == worker
        assert "timestamp" in record

    def test_on_a_terminal_one_escaped_line(self) -> None:
        """With stdout on a TTY the record goes through the console renderer, newlines and all escaped."""
        shown = on_a_terminal(_UNRETRIEVED_TASK_EXCEPTION)
        [line] = shown.splitlines()
        assert "Task exception was never retrieved" in line
        assert "ValueError: line one\\x0aline two" in line
        assert "[error" in line


# Records that cannot be rendered as they stand: a value holding a lone surrogate (a file name that is not
# UTF-8, as Python decodes one), a library's message whose arguments do not fit it.
_UNRENDERABLE = """
import logging, structlog
from synctoken._quiet import quiet_library_warnings
quiet_library_warnings()
from synctoken_server.audit import logs
logs.configure()
structlog.get_logger("synctoken").warning("config.warning", problem="cannot read /etc/\\udcff.toml")
logging.getLogger("asyncio").error("cannot read %s", "/etc/\\udcff.toml")
logging.getLogger("grpc").warning("needs two: %s %s", "hunter2-secret-argument")
"""


class TestUnrenderableRecords:
    """A record that cannot be rendered as it stands is still one line, never an exception or a traceback."""

    def test_one_line_each_and_nothing_on_stderr(self) -> None:
        """A lone surrogate is written escaped; a message whose arguments do not fit is said without them."""
        result = subprocess.run(
            [sys.executable, "-c", _UNRENDERABLE], capture_output=True, text=True, timeout=60, check=True
        )
        assert result.stderr == ""
        config_warning, asyncio_error, grpc_warning = (json.loads(line) for line in result.stdout.splitlines())
        assert config_warning["problem"] == "cannot read /etc/\\udcff.toml"
        assert (asyncio_error["event"], asyncio_error["logger"]) == ("cannot read /etc/\\udcff.toml", "asyncio")
        # Arguments that did not fit the message may hold anything: they are not written.
        assert "hunter2" not in result.stdout
        assert grpc_warning["event"] == "log record not formatted (TypeError): needs two: %s %s"
        assert (grpc_warning["logger"], grpc_warning["level"]) == ("grpc", "warning")

    def test_on_a_terminal_too(self) -> None:
        """On a TTY (the console renderer) the same records are three lines, the surrogate escaped, no traceback."""
        leader, follower = pty.openpty()
        try:
            result = subprocess.run(
                [sys.executable, "-c", _UNRENDERABLE], stdout=follower, stderr=subprocess.PIPE, timeout=60, check=False
            )
            os.close(follower)
            shown = os.read(leader, 65536).decode()
        finally:
            os.close(leader)
        assert (result.returncode, result.stderr) == (0, b"")
        lines = shown.splitlines()
        assert len(lines) == 3
        assert all("/etc/\\udcff.toml" in line for line in lines[:2])
        assert "log record not formatted (TypeError)" in lines[2]
        assert "hunter2" not in shown

    def test_json_dumps_escapes_a_lone_surrogate(self) -> None:
        """json_dumps (the audit line's and the chain's renderer) writes a lone surrogate as a backslash escape."""
        assert json.loads(logs.json_dumps({"file": "a\udcffb"})) == {"file": "a\\udcffb"}


class TestLineBreaks:
    """Characters that line-splitting readers take as line ends are escaped."""

    @pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"])
    def test_one_record_one_line(self, char: str) -> None:
        """A value holding any line-ending character still renders as one line that parses back to it."""
        rendered = logs.json_dumps({"identity": f"a{char}b", "event": "token.decision"}).decode("utf-8")
        assert len(rendered.splitlines()) == 1
        assert json.loads(rendered)["identity"] == f"a{char}b"

    @pytest.mark.parametrize(
        ("raw", "shown"),
        [
            ("x\u2028y\u2029z\x85", "x\\u2028y\\u2029z\\x85"),
            ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
            ("a\nb\x0bc\x0cd\x1ce\x7ff\x9b", "a\\x0ab\\x0bc\\x0cd\\x1ce\\x7ff\\x9b"),
        ],
    )
    def test_console_renderer_escapes_controls(self, raw: str, shown: str) -> None:
        """On a TTY every control character is escaped: no line breaks, no terminal escape sequences."""
        escaped = logs._escape_console_line(None, "info", raw)
        assert escaped == shown
        assert len(escaped.splitlines()) == 1


# Real exceptions, with a 5,000-character message and with 40 lines of 500, logged through structlog (as
# servicer.py's rpc.failed) and through asyncio's logger, with the logs configured as the server configures them.
_LONG_EXCEPTIONS = """
import gc, sys
from synctoken._quiet import quiet_library_warnings
quiet_library_warnings()
import structlog
from synctoken_server.audit import logs
from synctoken_server.process import running
logs.configure()
MESSAGES = {"long": "x" * 5000, "many": "\\n".join(f"{n:03d}" + "y" * 497 for n in range(40))}

async def fails(message):
    raise ValueError(message)

async def main():
    for name, message in MESSAGES.items():
        try:
            await fails(message)
        except ValueError:
            structlog.get_logger("synctoken").exception("rpc.failed", case=name)
        task = running.asyncio.ensure_future(fails(message))
        await running.asyncio.sleep(0)
        del task  # never awaited: asyncio's logger reports its exception when it is collected
        gc.collect()

running.run_on_server_loop(main())
"""


class TestLongValues:
    """Values are cut at MAX_VALUE_CHARACTERS, so no line is kilobytes of one hostile field."""

    def test_values_and_tracebacks_cut(self) -> None:
        """A long identity is cut and says how much was cut; so is each long line of a traceback."""
        event = {"identity": "x" * 5000, "exception": "Traceback\n" + "y" * 5000, "event": "token.decision"}
        out = logs._truncate_long_values(None, "info", event)
        assert out["identity"] == "x" * logs.MAX_VALUE_CHARACTERS + "...[3976 more characters]"
        assert out["exception"] == "Traceback\n" + "y" * logs.MAX_VALUE_CHARACTERS + "...[3976 more characters]"

    def test_long_traceback_keeps_its_ends(self) -> None:
        """A traceback longer than MAX_TRACEBACK_CHARACTERS loses its middle, says so, and keeps both ends."""
        lines = [f"line {n:04d} " + "z" * 90 for n in range(1000)]
        out = logs._truncate_long_values(None, "error", {"stack_info": "\n".join(lines)})["stack_info"]
        head, cut, tail = out.partition("\n...[")
        assert head.startswith(lines[0])
        assert tail.endswith(lines[-1])
        assert len(head) + len(tail.partition("]...\n")[2]) == logs.MAX_TRACEBACK_CHARACTERS
        assert cut
        assert int(tail.partition(" characters cut]")[0]) == len("\n".join(lines)) - logs.MAX_TRACEBACK_CHARACTERS

    def test_real_exceptions_make_bounded_json_lines(self) -> None:
        """Real exceptions with a huge message, logged by structlog and by asyncio: bounded lines, type and cut said."""
        result = subprocess.run(
            [sys.executable, "-c", _LONG_EXCEPTIONS], capture_output=True, text=True, timeout=60, check=True
        )
        assert result.stderr == ""
        ours_long, asyncio_long, ours_many, asyncio_many = (json.loads(line) for line in result.stdout.splitlines())
        assert (ours_long["event"], ours_long["case"], asyncio_long["logger"]) == ("rpc.failed", "long", "asyncio")
        for record in (ours_long, asyncio_long):
            assert record["exception"].startswith("Traceback (most recent call last):")
            cut = "ValueError: " + "x" * (logs.MAX_VALUE_CHARACTERS - len("ValueError: ")) + "...[3988 more characters]"
            assert record["exception"].endswith(cut)
        for record in (ours_many, asyncio_many):
            exception = record["exception"]
            assert exception.startswith("Traceback (most recent call last):")
            assert " characters cut]...\n" in exception
            assert exception.endswith("039" + "y" * 497)
            assert len(exception) < logs.MAX_TRACEBACK_CHARACTERS + 40
        # What the brief measured: a 5,000-character message made a 5.6 KB line; every line is bounded now.
        assert all(len(line) < 2 * logs.MAX_TRACEBACK_CHARACTERS for line in result.stdout.splitlines())
        assert max(len(line) for line in result.stdout.splitlines()[:2]) < 2 * logs.MAX_VALUE_CHARACTERS + 1000

    def test_real_exceptions_on_a_terminal(self) -> None:
        """The console renderer on a TTY writes the same cut tracebacks, one line per record."""
        shown = on_a_terminal(_LONG_EXCEPTIONS)
        lines = shown.splitlines()
        assert len(lines) == 4
        assert all("ValueError: " + "x" * 100 in line and "...[3988 more characters]" in line for line in lines[:2])
        assert all(" characters cut]..." in line for line in lines[2:])
        # Escaped newlines (\x0a) take four characters each: the bound is still a few times the limit, not more.
        assert all(len(line) < 2 * logs.MAX_TRACEBACK_CHARACTERS for line in lines)


def fill(sink: LineSink, line: bytes) -> int:
    """Write `line` until the output stalls (at most 1000 times); return how many went in."""
    for written in range(1000):
        try:
            sink.write_line(line)
        except OutputStalled:
            return written
    return 1000


class TestPipeOutput:
    """A pipe as the output: a reader that stops or goes away never blocks the writer for long."""

    @pytest.fixture
    def pipe(self) -> Iterator[tuple[int, int]]:
        """A real pipe (read end, write end), closed at teardown."""
        read_end, write_end = os.pipe()
        yield read_end, write_end
        for fd in (read_end, write_end):
            with contextlib.suppress(OSError):
                os.close(fd)

    def test_full_pipe_stalls_then_fails_fast_then_recovers(self, pipe: tuple[int, int]) -> None:
        """A full pipe: the first line gives up after the budget, later ones at once; reading again heals it."""
        read_end, write_end = pipe
        sink = LineSink.for_fd(write_end)
        line = b"x" * 1000
        assert 0 < fill(sink, line) < 1000, "a pipe holds far fewer lines"
        assert not sink.writable
        began = time.monotonic()
        with pytest.raises(OutputStalled):
            sink.write_line(line)
        assert time.monotonic() - began < linesink.WRITE_BUDGET_SECONDS / 2
        os.set_blocking(read_end, False)
        with contextlib.suppress(BlockingIOError):
            while os.read(read_end, 65536):
                pass
        sink.write_line(b'{"n":1}')
        assert sink.writable

    def test_check_sees_a_closed_reader(self, pipe: tuple[int, int]) -> None:
        """check() finds a pipe nobody reads without writing to it."""
        read_end, write_end = pipe
        sink = LineSink.for_fd(write_end)
        assert sink.check()
        os.close(read_end)
        assert not sink.check()

    def test_shared_lock_held_elsewhere(self, pipe: tuple[int, int]) -> None:
        """A line waits for another writer's lock at most the budget, then fails as stalled."""
        _, write_end = pipe
        lock = threading.Lock()
        sink = LineSink.for_fd(write_end)
        sink.lock = lock
        with lock, pytest.raises(OutputStalled):
            sink.write_line(b"{}")
        assert not sink.writable


class TestSharedOutput:
    """Processes sharing one output share its lock and whether the last line was torn."""

    def test_torn_by_one_fresh_line_for_the_other(self, filling: FillingFile) -> None:
        """A line torn by one writer makes the next line of another writer start on a line of its own."""
        lock, torn = threading.Lock(), multiprocessing.Value("b", 0, lock=False)
        first, second = LineSink(filling.write), LineSink(filling.write)
        first.share(lock, torn)
        second.share(lock, torn)
        with pytest.raises(OSError, match="No space left"):
            first.write_line(b'{"n":1,"padding":"' + b"x" * 60 + b'"}')
        filling.room = 1000
        second.write_line(b'{"n":2}')
        fragment, line, end = filling.path.read_bytes().split(b"\n")
        assert fragment.startswith(b'{"n":1')
        assert (json.loads(line), end) == ({"n": 2}, b"")

    def test_lists_are_cut(self) -> None:
        """A list value keeps its first items, each cut short: a refused certificate's SANs cannot fill a disk."""
        sans = ["\x01" * 5000] * 50
        out = logs._truncate_long_values(None, "info", {"presented_sans": sans})
        assert len(out["presented_sans"]) == logs.MAX_ITEMS + 1
        assert out["presented_sans"][0] == "\x01" * logs.MAX_ITEM_CHARACTERS + "...[4744 more characters]"
        assert out["presented_sans"][-1] == "...[42 more items]"

    def test_stderr_pipe_made_nonblocking(self) -> None:
        """Configured for real, the logs make a piped stderr non-blocking: gRPC's lines are dropped, not stalled on."""
        script = "import os; from synctoken_server.audit import logs; logs.configure(); print(os.get_blocking(2))"
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
        assert result.stdout.strip() == "False"
