"""A Redis named by a host name, looked up in a thread of its own: a hung lookup holds one thread and no stop.

The resolver is made to hang for real: `synctoken serve` runs in a mount
namespace of its own (unshare) whose /etc/resolv.conf names a loopback name
server that takes every query and answers none. Root only, for the mount and
for port 53 (and to run a lookup as nobody, with no thread to be had); CI runs as root.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.configs import SECRET_ENV, config_text
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import Process, free_port

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="a resolver that hangs needs root and unshare"
)

SILENT_NAME_SERVER = "127.0.0.153"
LOOKUP_HANGS_S = 60
"""How long one lookup hangs: glibc's timeout x attempts, set in the namespace's resolv.conf."""
STOP_WAIT_S = LOOKUP_HANGS_S / 3
"""A bound on the stop, far below the lookup's hang: a stop that waited for the lookup would exceed it."""


SHORT_HANG_S = 2
"""One lookup's hang where the test outlives it (timeout x attempts 1)."""


@pytest.fixture
def silent_name_server() -> Iterator[str]:
    """The address of a name server (on loopback, port 53) that receives every query and answers none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((SILENT_NAME_SERVER, 53))
        yield SILENT_NAME_SERVER


def _resolv_conf(directory: Path, name_server: str, timeout_s: int, attempts: int) -> Path:
    """A resolv.conf whose only name server is `name_server`: with the silent one, a lookup hangs timeout x attempts."""
    path = directory / "resolv.conf"
    path.write_text(f"nameserver {name_server}\noptions timeout:{timeout_s} attempts:{attempts}\n")
    return path


def _in_namespace(resolv_conf: Path) -> list[str]:
    """A command prefix: run the rest in a mount namespace of its own where /etc/resolv.conf is `resolv_conf`."""
    # sh's "$0" is the resolv.conf, "$@" the command line. unshare -m makes mounts private: none shows outside.
    return ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv_conf)]


@pytest.fixture
def hung_resolv_conf(tmp_path: Path, silent_name_server: str) -> Path:
    """A resolv.conf whose lookups hang LOOKUP_HANGS_S seconds, far longer than the test."""
    return _resolv_conf(tmp_path, silent_name_server, LOOKUP_HANGS_S // 2, 2)


def test_stop_does_not_wait_for_a_hung_lookup(
    pki: Pki, tmp_path: Path, hung_resolv_conf: Path, leak_watch: LeakWatch, processes: list[Process]
) -> None:
    """With the Redis name's lookup hung, the call falls back within the timeout and SIGTERM ends at once, status 0."""
    port = free_port()
    text = config_text(pki, listen=f"127.0.0.1:{port}") + (
        '\n[limits]\nbackend = "redis"\n\n[limits.redis]\nurl = "redis://redis.lookup-hangs.test:6379/0"\n'
        'timeout = "200ms"\n'
    )
    path = tmp_path / "synctoken.toml"
    path.write_text(text, encoding="utf-8")
    process = Process(
        ["serve", "--config", str(path)],
        tmp_path,
        leak_watch,
        os.environ | SECRET_ENV,
        wrapper=_in_namespace(hung_resolv_conf),
    )
    processes.append(process)
    process.wait_for_records("server.started")
    [failed] = process.wait_for_records("rate_limit.backend_failed")
    assert failed["kind"] == "timeout"  # the opening gave up on the lookup; the lookup itself still hangs
    assert process.proc.poll() is None
    process.proc.terminate()
    assert process.proc.wait(timeout=STOP_WAIT_S) == 0
    assert [r["event"] for r in process.records()][-1] == "server.stopped"
    assert process.stderr_path.read_text() == ""


# Many openings while one lookup hangs, then the loop closed before the lookup ends, in the namespace.
_OPENINGS = """
import asyncio, sys, threading, time
from synctoken_server.limitstore.connecting import Connector
from synctoken_server.policy.limitbackend import RedisSettings

def lookups():
    return [t for t in threading.enumerate() if t.name == "synctoken-redis-lookup"]

async def main():
    connector = Connector(RedisSettings(url="redis://redis.lookup-hangs.test:6379/0", host="redis.lookup-hangs.test"))
    async def opening():
        try:
            await asyncio.wait_for(connector.connect(asyncio.Protocol), 0.05)
        except TimeoutError:
            return "timeout"
    outcomes = [await opening() for _ in range(10)]
    outcomes += await asyncio.gather(*(opening() for _ in range(40)))
    return outcomes, len(lookups())

outcomes, threads = asyncio.run(main())  # closes the loop, the lookup still hung
print(sorted(set(outcomes)), threads, flush=True)
deadline = time.monotonic() + float(sys.argv[1])
while lookups() and time.monotonic() < deadline:
    time.sleep(0.1)
print(len(lookups()), flush=True)
"""


def test_one_lookup_thread_and_a_late_end(tmp_path: Path, silent_name_server: str) -> None:
    """50 openings during one hung lookup share one thread; its end after the loop closed is quiet."""
    resolv_conf = _resolv_conf(tmp_path, silent_name_server, SHORT_HANG_S, 1)
    result = subprocess.run(
        [*_in_namespace(resolv_conf), sys.executable, "-c", _OPENINGS, str(SHORT_HANG_S * 5)],
        capture_output=True,
        text=True,
        timeout=SHORT_HANG_S * 10,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    # Every opening timed out waiting; one thread looked the name up; it has ended since, with no loop to tell.
    assert result.stdout.splitlines() == ["['timeout'] 1", "0"]


# Threads refused, as when a container's pids limit is reached: nobody's RLIMIT_NPROC at what it runs already.
_NO_THREADS = """
import asyncio, os, resource
from synctoken_server.limitstore.connecting import Connector
from synctoken_server.policy.limitbackend import RedisSettings

tasks = len(os.listdir("/proc/self/task"))
resource.setrlimit(resource.RLIMIT_NPROC, (tasks, tasks))

async def main():
    connector = Connector(RedisSettings(url="redis://redis.no-threads.test:6379/0", host="redis.no-threads.test"))
    try:
        await connector.connect(asyncio.Protocol)
    except OSError as exc:  # what the limits count as Redis failing, and fall back from
        print("OSError", exc)

asyncio.run(main())
"""


def test_no_thread_for_the_lookup_is_a_failed_opening() -> None:
    """With no thread to be had, the opening fails with OSError (the limits fall back), not RuntimeError."""
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]  # root ignores RLIMIT_NPROC
    result = subprocess.run(
        [*as_nobody, sys.executable, "-c", _NO_THREADS], capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "OSError [Errno 11] cannot start a thread to look up redis.no-threads.test\n"
