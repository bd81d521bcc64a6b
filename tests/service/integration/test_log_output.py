"""The log output as a real process sees it: a pipe nobody reads, a full device, workers sharing one pipe.

Whatever happens to stdout, the server keeps answering (health says
NOT_SERVING), signals still stop it, and no token leaves without its whole
audit line. Every load is bounded in calls and time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from support.calls import channel, rpc_error
from support.configs import SECRET_ENV, WriteConfig, config_text
from support.constants import SYNCTOKEN
from support.logcapture import LeakWatch
from support.pki import Pki
from support.processes import START_TIMEOUT, free_port
from synctoken.v1 import token_service_pb2 as pb
from synctoken.v1 import token_service_pb2_grpc
from synctoken_server.process import running

REQUEST = pb.IssueTokenRequest(identity="alice", sync=pb.SyncGrant())
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING

Start = Callable[..., tuple[subprocess.Popen[bytes], int]]


def health(pki: Pki, port: int) -> int:
    """TokenService's health on a fresh connection."""
    with channel(pki, port) as ch:
        check = health_pb2.HealthCheckRequest(service="synctoken.v1.TokenService")
        return int(health_pb2_grpc.HealthStub(ch).Check(check, timeout=5).status)


def wait_for_health(pki: Pki, port: int, wanted: int, tries: int = 1) -> None:
    """Wait until `tries` fresh connections in a row report `wanted` (bounded by START_TIMEOUT)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            if all(health(pki, port) == wanted for _ in range(tries)):
                return
        except grpc.RpcError:
            pass  # not listening yet
        assert time.monotonic() < deadline, f"health never became {wanted}"
        time.sleep(0.1)


@pytest.fixture
def start(pki: Pki, write_config: WriteConfig) -> Iterator[Start]:
    """Start `synctoken serve` with stdout going where the test says; killed at teardown if still running."""
    started: list[subprocess.Popen[bytes]] = []

    def run(
        stdout: int | IO[bytes], server_extra: str = "", workers: int = 1, *, new_group: bool = False
    ) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        text = config_text(pki, listen=f"127.0.0.1:{port}").replace("[tls]", f"{server_extra}\n\n[tls]")
        path = write_config(text)
        proc = subprocess.Popen(
            [SYNCTOKEN, "serve", "--workers", str(workers), "--config", str(path)],
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            env=os.environ | SECRET_ENV,
            start_new_session=new_group,
        )
        started.append(proc)
        return proc, port

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def children(pid: int) -> list[int]:
    """The process ids whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
class TestStalledPipe:
    """stdout is a pipe whose reader stopped reading: nothing may freeze."""

    @pytest.mark.parametrize("workers", [1, 2])
    def test_keeps_answering_and_stops(self, pki: Pki, start: Start, leak_watch: LeakWatch, workers: int) -> None:
        """Once the pipe is full: AUDIT_UNAVAILABLE, NOT_SERVING, and SIGTERM still stops every process."""
        read_end, write_end = os.pipe()
        try:
            proc, port = start(write_end, 'drain_delay = "0s"\ngrace = "1s"', workers)
            os.close(write_end)
            wait_for_health(pki, port, SERVING)
            worker_pids = children(proc.pid)
            refusals: list[grpc.StatusCode] = []
            with channel(pki, port) as ch:
                stub = token_service_pb2_grpc.TokenServiceStub(ch)
                for _ in range(2000):  # a 64 KiB pipe holds a few hundred lines
                    try:
                        leak_watch.tokens.add(stub.IssueToken(REQUEST, timeout=10).token)
                    except grpc.RpcError as exc:
                        refusals.append(exc.code())
                        if len(refusals) == 3:
                            break
            assert refusals == [grpc.StatusCode.UNAVAILABLE] * 3, "the pipe never filled"
            wait_for_health(pki, port, NOT_SERVING, tries=6)  # every worker, written to or not
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=START_TIMEOUT) == 0
            deadline = time.monotonic() + 10
            while any(Path(f"/proc/{pid}").exists() for pid in worker_pids) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not [p for p in worker_pids if Path(f"/proc/{p}").exists()], "a worker outlived the parent"
        finally:
            os.close(read_end)


class TestUnwritableFromTheStart:
    """stdout that never takes a byte (/dev/full): health says so before any token is asked for."""

    @pytest.mark.parametrize("workers", [1, 2])
    def test_not_serving_without_traffic(self, pki: Pki, start: Start, workers: int) -> None:
        """Every process reports NOT_SERVING on its own, and still stops on SIGTERM."""
        with Path("/dev/full").open("wb") as full:
            proc, port = start(full, 'drain_delay = "0s"\ngrace = "1s"', workers)
        wait_for_health(pki, port, NOT_SERVING, tries=8)
        with channel(pki, port) as ch:
            _, info, _ = rpc_error(lambda: token_service_pb2_grpc.TokenServiceStub(ch).IssueToken(REQUEST, timeout=10))
        assert info.reason == "AUDIT_UNAVAILABLE"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=START_TIMEOUT) == 0


class TestWorkersShareOnePipe:
    """Two workers writing one pipe: every line is one whole record, however long."""

    def test_long_lines_do_not_interleave(self, pki: Pki, start: Start, leak_watch: LeakWatch) -> None:
        """Refusals carrying kilobytes of escaped NULs, beside tokens issued, from both workers: all lines parse."""
        proc, port = start(subprocess.PIPE, 'drain_delay = "0s"\ngrace = "1s"', 2)
        stdout = proc.stdout
        assert stdout is not None
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(stdout.readline, b"")), daemon=True)
        reader.start()
        wait_for_health(pki, port, SERVING)
        # Health answers once one worker serves; on a busy machine the other may not listen yet.
        deadline = time.monotonic() + START_TIMEOUT
        while sum(b'"event":"server.started"' in line for line in list(lines)) < 2:
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        hostile = pb.IssueTokenRequest(identity="\x00" * 3900, sync=pb.SyncGrant())
        issued: list[str] = []

        def caller(request: pb.IssueTokenRequest) -> None:
            # A fresh connection every ten calls, so that both workers get calls.
            for _ in range(6):
                with channel(pki, port) as ch:
                    stub = token_service_pb2_grpc.TokenServiceStub(ch)
                    for _ in range(10):
                        try:
                            response = stub.IssueToken(request, timeout=10)
                        except grpc.RpcError:
                            continue
                        leak_watch.tokens.add(response.token)
                        issued.append(response.token_id)

        threads = [threading.Thread(target=caller, args=(r,)) for r in (hostile, hostile, hostile, REQUEST, REQUEST)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=START_TIMEOUT) == 0
        reader.join(timeout=10)
        stdout.close()
        records = [json.loads(line) for line in lines]  # raises on a torn or interleaved line
        recorded = {r.get("token_id") for r in records if r.get("outcome") == "issued"}
        assert len(issued) == 120
        assert set(issued) <= recorded
        refusals = [r for r in records if r.get("reason") == "INVALID_REQUEST"]
        assert len(refusals) == 180
        assert {r["worker"] for r in records if r["event"] == "token.decision"} == {0, 1}
        assert all(r["identity"].endswith("...[2876 more characters]") for r in refusals)


class TestWorkersSecondSignal:
    """With --workers, a second signal during the drain stops everything at once, as it does one server."""

    @pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
    def test_stops_without_waiting_out_the_drain(self, pki: Pki, start: Start, second: signal.Signals) -> None:
        """drain_delay is a minute; SIGTERM then `second` ends all processes within seconds."""
        proc, port = start(subprocess.DEVNULL, 'drain_delay = "60s"', 2)
        wait_for_health(pki, port, SERVING)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        wait_for_health(pki, port, NOT_SERVING, tries=4)
        time.sleep(running.DUPLICATE_SIGNAL_SECONDS)  # sooner, the same signal counts as the first one again
        proc.send_signal(second)
        assert proc.wait(timeout=START_TIMEOUT) == 0
        assert time.monotonic() - began < 20


class TestWorkersAfterTheParent:
    """Workers never outlive their parent, and one stop signal sent to all of them is still one signal."""

    def test_parent_killed(self, pki: Pki, start: Start) -> None:
        """SIGKILL to the parent: the workers notice, drain and exit, so nothing serves an old config."""
        proc, port = start(subprocess.DEVNULL, 'drain_delay = "0s"\ngrace = "1s"', 2)
        wait_for_health(pki, port, SERVING)
        workers = children(proc.pid)  # and multiprocessing's resource tracker, which goes too
        assert len(workers) >= 2
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + START_TIMEOUT
        while any(Path(f"/proc/{pid}").exists() for pid in workers):
            assert time.monotonic() < deadline, "a worker outlived its parent"
            time.sleep(0.1)

    def test_a_killed_worker_stops_the_others(self, pki: Pki, start: Start, tmp_path: Path) -> None:
        """SIGKILL to one worker: the parent says so, the other worker drains and stops, and the status is 4."""
        log = tmp_path / "out.jsonl"
        with log.open("wb") as out:
            proc, port = start(out, 'drain_delay = "0s"\ngrace = "1s"', 2)
            wait_for_health(pki, port, SERVING)
            deadline = time.monotonic() + START_TIMEOUT
            while log.read_text().count('"server.started"') < 2:
                assert time.monotonic() < deadline, "the workers did not start"
                time.sleep(0.1)
            [launched] = [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "workers.started"]
            os.kill(launched["pids"][0], signal.SIGKILL)
            assert proc.wait(timeout=START_TIMEOUT) == running.EXIT_WORKER_DIED
        records = [json.loads(line) for line in log.read_text().splitlines()]
        [exited] = [r for r in records if r["event"] == "workers.worker_exited"]
        assert (exited["worker"], exited["exitcode"]) == (0, -signal.SIGKILL)
        assert [r["worker"] for r in records if r["event"] == "server.stopped"] == [1]
        assert not any(Path(f"/proc/{pid}").exists() for pid in launched["pids"])

    def test_sigterm_to_the_process_group_drains(self, pki: Pki, start: Start, tmp_path: Path) -> None:
        """SIGTERM to the whole group (as systemd sends it) reaches each worker twice, and still drains."""
        log = tmp_path / "out.jsonl"
        with log.open("wb") as out:
            proc, port = start(out, 'drain_delay = "2s"\ngrace = "1s"', 2, new_group=True)
            wait_for_health(pki, port, SERVING)
            deadline = time.monotonic() + START_TIMEOUT
            while log.read_text().count('"server.started"') < 2:  # both workers, not just the first up
                assert time.monotonic() < deadline, "the workers did not start"
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=START_TIMEOUT) == 0
        records = [json.loads(line) for line in log.read_text().splitlines()]
        stopping = [r for r in records if r["event"] == "server.stopping"]
        assert len(stopping) == 2
        assert not [r for r in records if r["event"] == "server.stopping_now"], "a duplicate signal cut the drain"
