"""A stand-in SPIFFE Workload API agent for the tests: SVIDs served on a Unix socket, replaced at any time.

SPIRE cannot run here (no Go toolchain), so the tests run this stand-in: a real gRPC server speaking the
standard's workload.proto (support/workloadapi/) on a Unix socket, in a process of its own
(support.agentprocess says why), checking the `workload.spiffe.io: true` header as SPIRE does.

    agent = WorkloadAgent(log_dir, watch)          # or the `workload_agent` fixture
    agent.start(SvidSet((issue_svid(ca, SERVER_ID, server=True),)))
    ... SPIFFE_ENDPOINT_SOCKET=agent.address ...
    agent.set(SvidSet(...))                        # pushed down every open stream (rotation, federation)
    agent.stop(); agent.start()                    # gone (socket removed) and back, serving the last set
    agent.start(svids, silent=True)                # accepts streams, never answers
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support.constants import ROOT
from support.logcapture import LeakWatch
from synctoken_server.dev.pki import CertificateAuthority, KeyPair, LeafSpec

AGENT_TIMEOUT = 15
"""Bound on the agent's start and on each control command's answer, in seconds."""


@dataclass(frozen=True)
class Svid:
    """One X509-SVID as an agent hands it out: its ID, chain and key, and its own trust domain's bundle."""

    spiffe_id: str
    pair: KeyPair = field(repr=False)
    bundle_pem: bytes
    hint: str = ""

    @property
    def serial(self) -> int:
        """The leaf's serial number, to tell which SVID a peer presented."""
        return x509.load_pem_x509_certificates(self.pair.cert_pem)[0].serial_number

    def wire(self) -> dict[str, str]:
        """The fields of the standard's X509SVID message, as the control protocol carries them."""
        key = serialization.load_pem_private_key(self.pair.key_pem, password=None)
        pkcs8 = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return {
            "spiffe_id": self.spiffe_id,
            "chain": _b64(pem_to_der(self.pair.cert_pem)),
            "key": _b64(pkcs8),
            "bundle": _b64(pem_to_der(self.bundle_pem)),
            "hint": self.hint,
        }


@dataclass(frozen=True)
class SvidSet:
    """What the agent serves: SVIDs (the first is the default) and federated bundles keyed by trust domain name."""

    svids: tuple[Svid, ...]
    federated: Mapping[str, bytes] = field(default_factory=dict)
    """Trust domain name (example.com) -> its CA certificates as PEM."""

    def wire(self) -> dict[str, Any]:
        return {
            "op": "set",
            "svids": [s.wire() for s in self.svids],
            "federated": {f"spiffe://{td}": _b64(pem_to_der(pem)) for td, pem in self.federated.items()},
        }


def pem_to_der(pem: bytes) -> bytes:
    """Concatenated DER of every certificate in `pem`, as the Workload API carries chains and bundles."""
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(pem))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def issue_svid(
    ca: CertificateAuthority, spiffe_id: str, *, server: bool = False, dns_names: tuple[str, ...] = (), **spec: Any
) -> Svid:
    """An X509-SVID for `spiffe_id` signed by `ca`, whose certificate is the SVID's bundle.

    `server`: a server's SVID, also named localhost and 127.0.0.1 so that the tests' clients, which check
    host names, accept it. Other LeafSpec fields (not_after, ...) pass through.
    """
    if server:
        dns_names = (*dns_names, "localhost")
        spec.setdefault("ip_addresses", ("127.0.0.1",))
    spec.setdefault("digital_signature", True)
    leaf = LeafSpec(spiffe_id, uris=(spiffe_id,), dns_names=dns_names, server=server, **spec)
    return Svid(spiffe_id, ca.issue(leaf), ca.cert_pem)


@dataclass(frozen=True)
class AgentStatus:
    """The agent's streams: open now, opened since it started, and calls refused for want of the header."""

    streams: int
    opened: int
    rejected: int


class WorkloadAgent:
    """The stand-in agent's process, on a socket of its own; start, replace, stop and start again."""

    def __init__(self, log_dir: Path, watch: LeakWatch | None = None) -> None:
        # A short directory of its own, not the test's tmp_path: a Unix socket's path must fit in
        # 107 bytes, and pytest's paths grow with the test's name.
        self._dir = Path(tempfile.mkdtemp(prefix="wlapi-"))
        self.socket_path = self._dir / "agent.sock"
        self._log = log_dir / "workload-agent.stderr.txt"
        if watch is not None:
            watch.log_files.append(self._log)
        self._proc: subprocess.Popen[str] | None = None
        self._served: SvidSet | None = None

    @property
    def address(self) -> str:
        """The socket as SPIFFE_ENDPOINT_SOCKET names it."""
        return f"unix://{self.socket_path}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, svids: SvidSet | None = None, *, silent: bool = False) -> None:
        """Start serving `svids` (default: the last set served; none at all: every fetch is PERMISSION_DENIED)."""
        assert not self.running, "the agent is running already"
        with self._log.open("a") as err:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "support.agentprocess", str(self.socket_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=os.environ | {"PYTHONPATH": str(ROOT / "tests")},
            )
        assert self._read().get("ready"), "the stand-in agent did not start"
        if silent:
            self._command({"op": "silent", "on": True})
        if svids is not None:
            self._served = svids
        if self._served is not None:
            self._command(self._served.wire())

    def set(self, svids: SvidSet) -> None:
        """Serve `svids` from now on, pushed to every open stream (kept across a restart; stopped: served at start)."""
        self._served = svids
        if self.running:
            self._command(svids.wire())

    def silent(self, on: bool) -> None:
        """Make new streams go unanswered (accepted, nothing sent), or answered again."""
        self._command({"op": "silent", "on": on})

    def drop_streams(self) -> None:
        """End every open stream with UNAVAILABLE, the agent staying up (as when it fails mid-stream)."""
        self._command({"op": "drop"})

    def status(self) -> AgentStatus:
        answer = self._command({"op": "status"})
        return AgentStatus(answer["streams"], answer["opened"], answer["rejected"])

    def wait_for_streams(self, count: int = 1) -> AgentStatus:
        """Wait until at least `count` streams are open; return the status then."""
        deadline = time.monotonic() + AGENT_TIMEOUT
        while (status := self.status()).streams < count:
            if time.monotonic() > deadline:
                pytest.fail(f"fewer than {count} open Workload API streams within {AGENT_TIMEOUT}s: {status}")
            time.sleep(0.05)
        return status

    def stop(self) -> None:
        """Stop cleanly, as an agent being restarted does: open streams end, the socket file goes."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=AGENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        self.socket_path.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop, and remove the socket's directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _command(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self._proc is not None, "the agent is not running"
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        answer = self._read()
        assert answer.get("ok"), f"the stand-in agent refused {command['op']}: {answer}"
        return answer

    def _read(self) -> dict[str, Any]:
        assert self._proc is not None
        stdout: IO[str] | None = self._proc.stdout
        assert stdout is not None
        line = _readline(stdout, AGENT_TIMEOUT)
        if not line:
            pytest.fail(f"the stand-in agent exited: {self._log.read_text()}")
        answer: dict[str, Any] = json.loads(line)
        return answer


def _readline(stream: IO[str], timeout: float) -> str:
    """One line from a pipe, waiting at most `timeout` seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            pytest.fail(f"the stand-in agent did not answer within {timeout}s")
    return stream.readline()
