"""A Redis named by a host name whose lookup hangs: calls go on, and a stop does not wait for the resolver.

The resolver is made to hang for real: `synctoken serve` runs in a mount
namespace of its own (unshare) whose /etc/resolv.conf names a loopback name
server that takes every query and answers none. Root only, for the mount and
for port 53; CI runs as root.
"""

from __future__ import annotations

import os
import shutil
import socket
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


@pytest.fixture
def hung_resolv_conf(tmp_path: Path) -> Iterator[Path]:
    """A resolv.conf whose only name server (on loopback, port 53) receives every query and answers none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((SILENT_NAME_SERVER, 53))
        path = tmp_path / "resolv.conf"
        path.write_text(f"nameserver {SILENT_NAME_SERVER}\noptions timeout:{LOOKUP_HANGS_S // 2} attempts:2\n")
        yield path


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
    # sh's "$0" is the resolv.conf, "$@" synctoken's command line.
    in_namespace = [
        "unshare",
        "-m",
        "sh",
        "-c",
        'mount --bind "$0" /etc/resolv.conf && exec "$@"',
        str(hung_resolv_conf),
    ]
    process = Process(
        ["serve", "--config", str(path)], tmp_path, leak_watch, os.environ | SECRET_ENV, wrapper=in_namespace
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
