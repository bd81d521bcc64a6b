"""The plaintext probe port is bounded: connections to it cannot use up the process's open files."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

from support.calls import ALICE, channel
from support.configs import config_text
from support.logcapture import LeakWatch
from support.pki import Pki
from support.probes import probe
from support.processes import Process, free_port, serve
from synctoken.v1 import token_service_pb2_grpc
from synctoken_server.process.probes import PROBE_CONNECTIONS

FLOOD = 400
"""Idle connections opened to the probe port: far more than it serves, far fewer than the open-file limit."""
SLACK = 40
"""Descriptors the server may open for other reasons while the flood lasts (its own, gRPC's, the mTLS call's)."""
# An HTTP/2 client preface and an empty SETTINGS frame: a connection gRPC accepts and then waits on.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


def open_files(pid: int) -> int:
    """How many file descriptors `pid` holds."""
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def test_idle_connections_to_the_probe_port_hold_no_files(
    pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
) -> None:
    """Hundreds of idle plaintext connections cost the server at most PROBE_CONNECTIONS files; mTLS calls go on."""
    port, health_port = free_port(), free_port()
    text = config_text(pki, listen=f"127.0.0.1:{port}") + f'\n[health]\nlisten = "127.0.0.1:{health_port}"\n'
    process = serve(text, tmp_path, leak_watch, processes)
    pid = process.proc.pid
    assert probe(health_port) == "SERVING"
    before = open_files(pid)
    with contextlib.ExitStack() as stack:
        for _ in range(FLOOD):
            conn = stack.enter_context(socket.create_connection(("127.0.0.1", health_port), timeout=5))
            conn.sendall(H2_PREFACE)
        # Accepting (and closing) the excess takes the server a moment: wait until it has caught up.
        deadline = time.monotonic() + 10
        while open_files(pid) > before + PROBE_CONNECTIONS + SLACK and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open_files(pid) <= before + PROBE_CONNECTIONS + SLACK
        with channel(pki, port) as mtls:
            response = token_service_pb2_grpc.TokenServiceStub(mtls).IssueToken(ALICE, timeout=10)
        assert response.token
    # Once the flood's connections are gone, a probe is answered again.
    deadline = time.monotonic() + 10
    while probe(health_port) != "SERVING" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert probe(health_port) == "SERVING"
