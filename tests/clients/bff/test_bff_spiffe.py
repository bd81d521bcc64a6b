"""synctoken-bff with its client certificate from the SPIFFE Workload API: SYNCTOKEN_SPIFFE_ENDPOINT_SOCKET, no files."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from support.bff import BffProcess
from support.constants import BFF_ID
from support.inprocess import RunningServer
from support.logcapture import LeakWatch, LogSink
from support.pki import Pki
from support.processes import START_TIMEOUT, free_port
from support.workloadagent import SvidSet, WorkloadAgent, issue_svid


def spiffe_env(tmp_path: Path, agent: WorkloadAgent, port: int) -> dict[str, str]:
    """This process's environment without SYNCTOKEN_* or BFF_* variables, plus the target and the agent's socket."""
    secret = tmp_path / "session.key"
    secret.write_bytes(os.urandom(32).hex().encode())
    bare = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCTOKEN_", "BFF_"))}
    return bare | {
        "SYNCTOKEN_TARGET": f"127.0.0.1:{port}",
        "SYNCTOKEN_SPIFFE_ENDPOINT_SOCKET": agent.address,
        "BFF_SESSION_SECRET_FILE": str(secret),
    }


class TestWorkloadApi:
    """The BFF's client takes its SVID from the agent, through the client library's from_env."""

    def test_serves_tokens(
        self,
        pki: Pki,
        tmp_path: Path,
        workload_agent: WorkloadAgent,
        shared_server: RunningServer,
        log_sink: LogSink,
        leak_watch: LeakWatch,
    ) -> None:
        """/token works with no certificate file; synctoken's audit log shows the SVID's caller; the log says whence."""
        workload_agent.start(SvidSet((issue_svid(pki.ca, BFF_ID),)))
        process = BffProcess(spiffe_env(tmp_path, workload_agent, shared_server.port), tmp_path, leak_watch)
        try:
            process.wait_until_serving()
            response = httpx.get(f"{process.url}/token", timeout=10)
            assert response.status_code == httpx.codes.OK, response.text
            body = response.json()
            leak_watch.tokens.add(body["token"])
        finally:
            process.proc.terminate()
            assert process.proc.wait(timeout=START_TIMEOUT) == 0
        decisions = [r for r in log_sink.records() if r["event"] == "token.decision" and r.get("identity")]
        assert decisions[-1]["caller_id"] == BFF_ID
        assert f"client certificate from the Workload API: {BFF_ID}" in process.stderr_path.read_text()

    def test_agent_that_never_answers_exits_2(
        self, pki: Pki, tmp_path: Path, workload_agent: WorkloadAgent, leak_watch: LeakWatch
    ) -> None:
        """An agent that sends nothing: after the client's bounded first wait (10 s), one line saying so, exit 2."""
        workload_agent.start(SvidSet((issue_svid(pki.ca, BFF_ID),)), silent=True)
        process = BffProcess(spiffe_env(tmp_path, workload_agent, free_port()), tmp_path, leak_watch)
        assert process.proc.wait(timeout=START_TIMEOUT) == 2
        stderr = process.stderr_path.read_text()
        assert stderr.startswith("synctoken-bff: no usable X509-SVID from the SPIFFE Workload API at unix://")
        assert "the agent accepted the stream but sent nothing" in stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
