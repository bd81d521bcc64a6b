"""`synctoken serve` with its certificate and client CAs from the SPIFFE Workload API: the tests' stand-in agent.

Real processes, real mTLS, no certificate file for the server anywhere: the agent (support.workloadagent)
hands the server its SVID and the bundles, and pushes new ones while the server serves. Every wait is
bounded; no test measures time.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from support.calls import ALICE, SteadyLoad
from support.configs import POLICY_TOML, SECRET_ENV, WriteConfig, config_text, spiffe_tls
from support.constants import BFF_ID, DNS_CALLER, SYNCTOKEN, TRUST_DOMAIN
from support.logcapture import LeakWatch
from support.pki import Pki, presented_certificate
from support.probes import probe
from support.processes import START_TIMEOUT, Process, free_port, serve
from support.waiting import wait_for
from support.workloadagent import Svid, SvidSet, WorkloadAgent, issue_svid
from synctoken.v1 import token_service_pb2_grpc
from synctoken_server.dev.pki import CertificateAuthority, KeyPair, LeafSpec

SERVER_ID = f"spiffe://{TRUST_DOMAIN}/synctoken"
PARTNER = "partner.example"
PARTNER_CALLER = f"spiffe://{PARTNER}/ns/web/sa/bff"

PARTNER_POLICY = f"""{POLICY_TOML}
[[callers]]
id = "{PARTNER_CALLER}"
sync_services = ["IS{"a" * 32}"]
default_sync_service = "IS{"a" * 32}"
"""
BOTH_DOMAINS = f'[identity]\nsource = "spiffe"\ntrust_domains = ["{TRUST_DOMAIN}", "{PARTNER}"]\n'


def server_svid(pki: Pki, **spec: Any) -> Svid:
    """A new SVID for synctoken from the suite's CA, named localhost too (the tests' clients check host names)."""
    return issue_svid(pki.ca, SERVER_ID, server=True, **spec)


class Served:
    """A `synctoken serve` process on a fixed port, its certificate from the agent."""

    def __init__(self, process: Process, port: int, pki: Pki, watch: LeakWatch) -> None:
        self.process = process
        self.port = port
        self.pki = pki
        self.watch = watch

    def presented_serial(self) -> int:
        """The serial of the certificate the server presents on a new connection."""
        return presented_certificate(self.port, self.pki.ca.cert_pem.decode(), self.pki.files("bff")).serial_number

    def call(self, pair: KeyPair) -> grpc.StatusCode:
        """One IssueToken on a new connection, presenting `pair`; the status it ends with."""
        credentials = grpc.ssl_channel_credentials(self.pki.ca.cert_pem, pair.key_pem, pair.cert_pem)
        with grpc.secure_channel(f"localhost:{self.port}", credentials) as ch:
            try:
                self.watch.tokens.add(token_service_pb2_grpc.TokenServiceStub(ch).IssueToken(ALICE, timeout=10).token)
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    def reloaded_to(self, serial: int, count: int) -> None:
        """Wait for the `count`-th tls.reloaded line, which must name `serial`."""
        record = self.process.wait_for_records("tls.reloaded", count)[count - 1]
        assert record["serial"] == f"{serial:X}"
        assert record["source"] == "spiffe"


StartServed = Callable[..., Served]


@pytest.fixture
def start_served(
    workload_agent: WorkloadAgent, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
) -> StartServed:
    """Serve with [tls] source = "spiffe", the agent's socket given in the config: start(identity=, policy=, extra=)."""

    def start(*, identity: str | None = None, policy: str = POLICY_TOML, extra: str = "") -> Served:
        port = free_port()
        text = config_text(
            pki, listen=f"127.0.0.1:{port}", tls=spiffe_tls(workload_agent.address), identity=identity, policy=policy
        )
        return Served(serve(extra + text, tmp_path, leak_watch, processes), port, pki, leak_watch)

    return start


def test_first_svid_serves_mtls(
    workload_agent: WorkloadAgent, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
) -> None:
    """From SPIFFE_ENDPOINT_SOCKET alone the server takes its SVID, presents it, and verifies callers by the bundle."""
    svid = server_svid(pki)
    workload_agent.start(SvidSet((svid,)))
    port = free_port()
    text = config_text(pki, listen=f"127.0.0.1:{port}", tls=spiffe_tls())
    assert "cert_file" not in text
    process = serve(text, tmp_path, leak_watch, processes, env={"SPIFFE_ENDPOINT_SOCKET": workload_agent.address})
    served = Served(process, port, pki, leak_watch)
    [loaded] = process.wait_for_records("tls.loaded")
    assert (loaded["source"], loaded["serial"], loaded["client_cas"]) == ("spiffe", f"{svid.serial:X}", 1)
    [first] = process.wait_for_records("workload_api.svid")
    assert (first["spiffe_id"], first["trust_domains"]) == (SERVER_ID, [TRUST_DOMAIN])
    assert served.presented_serial() == svid.serial
    assert served.call(pki.clients["bff"]) == grpc.StatusCode.OK
    assert served.call(pki.clients["foreign_ca"]) == grpc.StatusCode.UNAVAILABLE


def test_rotation_under_load_fails_no_call(
    workload_agent: WorkloadAgent, pki: Pki, leak_watch: LeakWatch, start_served: StartServed
) -> None:
    """A new SVID pushed down the stream under calls on kept and new connections: no call fails, new ones see it."""
    first, second, third = server_svid(pki), server_svid(pki), server_svid(pki)
    workload_agent.start(SvidSet((first,)))
    served = start_served()
    load = SteadyLoad(pki, served.port, leak_watch, connections=3, fresh=2)
    load.wait_for(30)
    for count, svid in enumerate((second, third), start=1):
        workload_agent.set(SvidSet((svid,)))
        served.reloaded_to(svid.serial, count)
        load.wait_for(30)
        assert served.presented_serial() == svid.serial
    outcomes = load.stop()
    assert {o.code for o in outcomes} == {grpc.StatusCode.OK}, [
        o.code for o in outcomes if o.code != grpc.StatusCode.OK
    ]
    assert workload_agent.status().opened == 1, "the pushes came down the one stream"


def test_federated_bundle_added_then_removed(
    workload_agent: WorkloadAgent, pki: Pki, start_served: StartServed
) -> None:
    """A federated trust domain's caller gets in once the agent sends its bundle, and no longer handshakes once it is gone."""
    partner_ca = CertificateAuthority(f"{PARTNER} CA")
    partner = partner_ca.issue(LeafSpec("partner bff", uris=(PARTNER_CALLER,)))
    svid = server_svid(pki)
    workload_agent.start(SvidSet((svid,)))
    served = start_served(identity=BOTH_DOMAINS, policy=PARTNER_POLICY)
    assert served.call(partner) == grpc.StatusCode.UNAVAILABLE
    workload_agent.set(SvidSet((svid,), federated={PARTNER: partner_ca.cert_pem}))
    [*_, federated] = served.process.wait_for_records("workload_api.svid", 2)
    assert federated["trust_domains"] == [TRUST_DOMAIN, PARTNER]
    assert served.process.wait_for_records("tls.reloaded", 1)[0]["client_cas"] == 2
    assert served.call(partner) == grpc.StatusCode.OK
    assert served.call(pki.clients["bff"]) == grpc.StatusCode.OK
    workload_agent.set(SvidSet((svid,)))
    assert served.process.wait_for_records("tls.reloaded", 2)[1]["client_cas"] == 1
    assert served.call(partner) == grpc.StatusCode.UNAVAILABLE
    assert served.call(pki.clients["bff"]) == grpc.StatusCode.OK


def test_federated_bundle_outside_trust_domains_lets_no_caller_in(
    workload_agent: WorkloadAgent, pki: Pki, start_served: StartServed
) -> None:
    """A federated bundle lets the chain verify, but a trust domain not in identity.trust_domains is still refused."""
    partner_ca = CertificateAuthority(f"{PARTNER} CA")
    partner = partner_ca.issue(LeafSpec("partner bff", uris=(PARTNER_CALLER,)))
    svid = server_svid(pki)
    workload_agent.start(SvidSet((svid,), federated={PARTNER: partner_ca.cert_pem}))
    served = start_served()
    assert served.process.wait_for_records("tls.loaded")[0]["client_cas"] == 2
    assert served.call(partner) == grpc.StatusCode.UNAUTHENTICATED  # as for any caller outside trust_domains


@pytest.mark.parametrize("identity", [None, BOTH_DOMAINS], ids=["own domain trusted", "both domains trusted"])
def test_federated_ca_cannot_name_a_caller_of_another_trust_domain(
    workload_agent: WorkloadAgent, pki: Pki, start_served: StartServed, identity: str | None
) -> None:
    """A federated trust domain's CA that signs a certificate naming one of our workloads gets no caller in.

    SPIFFE trusts each bundle for its own trust domain only: the partner's CA vouches for spiffe://partner.example
    IDs, never for spiffe://example.org ones, whichever trust domains identity.trust_domains accepts.
    """
    partner_ca = CertificateAuthority(f"{PARTNER} CA")
    impostor = partner_ca.issue(LeafSpec("bff", uris=(BFF_ID,)))
    partner = partner_ca.issue(LeafSpec("partner bff", uris=(PARTNER_CALLER,)))
    workload_agent.start(SvidSet((server_svid(pki),), federated={PARTNER: partner_ca.cert_pem}))
    served = start_served(identity=identity, policy=PARTNER_POLICY if identity else POLICY_TOML)
    assert served.call(impostor) == grpc.StatusCode.UNAUTHENTICATED
    assert served.call(pki.clients["bff"]) == grpc.StatusCode.OK
    expected = grpc.StatusCode.OK if identity else grpc.StatusCode.UNAUTHENTICATED
    assert served.call(partner) == expected


def test_federated_ca_cannot_name_a_dns_caller(
    workload_agent: WorkloadAgent, pki: Pki, start_served: StartServed
) -> None:
    """With identity.source = "dns_san", only the server's own trust domain's CAs vouch for DNS names."""
    partner_ca = CertificateAuthority(f"{PARTNER} CA")
    impostor = partner_ca.issue(LeafSpec("billing", dns_names=(DNS_CALLER,)))
    workload_agent.start(SvidSet((server_svid(pki),), federated={PARTNER: partner_ca.cert_pem}))
    service = f"IS{'a' * 32}"
    policy = f'[[callers]]\nid = "{DNS_CALLER}"\nsync_services = ["{service}"]\ndefault_sync_service = "{service}"\n'
    served = start_served(identity='[identity]\nsource = "dns_san"\n', policy=policy)
    assert served.call(impostor) == grpc.StatusCode.UNAUTHENTICATED
    assert served.call(pki.clients["dns_only"]) == grpc.StatusCode.OK


def test_agent_restart_while_serving(
    workload_agent: WorkloadAgent, pki: Pki, leak_watch: LeakWatch, start_served: StartServed
) -> None:
    """With the agent gone (socket removed) calls go on with the last SVID; back, its new SVID is taken; errors counted."""
    first, second = server_svid(pki), server_svid(pki)
    workload_agent.start(SvidSet((first,)))
    served = start_served(extra='[metrics]\nlisten = "127.0.0.1:0"\n')
    [started] = served.process.wait_for_records("server.started")
    load = SteadyLoad(pki, served.port, leak_watch, connections=2, fresh=1)
    load.wait_for(20)
    workload_agent.stop()
    assert not workload_agent.socket_path.exists()
    errors = served.process.wait_for_records("workload_api.stream_error", 2)
    assert {e["kind"] for e in errors} == {"unavailable"}
    load.wait_for(20)
    assert served.presented_serial() == first.serial
    workload_agent.set(SvidSet((second,)))
    workload_agent.start()
    served.reloaded_to(second.serial, 1)
    load.wait_for(20)
    assert served.presented_serial() == second.serial
    outcomes = load.stop()
    assert {o.code for o in outcomes} == {grpc.StatusCode.OK}
    with urllib.request.urlopen(f"http://{started['metrics']}/metrics", timeout=10) as response:
        scrape = response.read().decode()
    [line] = [x for x in scrape.splitlines() if x.startswith('synctoken_workload_api_errors_total{kind="unavailable"}')]
    assert float(line.split()[-1]) >= len(errors)


def test_invalid_svid_is_refused_and_the_last_good_one_kept(
    workload_agent: WorkloadAgent, pki: Pki, start_served: StartServed
) -> None:
    """An answer whose SVID may sign certificates (keyCertSign) is logged as invalid; the last good one stays."""
    good = server_svid(pki)
    workload_agent.start(SvidSet((good,)))
    served = start_served()
    workload_agent.set(SvidSet((server_svid(pki, key_cert_sign=True),)))
    [error] = served.process.wait_for_records("workload_api.stream_error")
    assert error["kind"] == "invalid"
    assert "keyCertSign" in error["problem"]
    assert served.presented_serial() == good.serial
    assert served.call(pki.clients["bff"]) == grpc.StatusCode.OK


@pytest.mark.slow
def test_expired_svid_makes_health_not_serving(
    workload_agent: WorkloadAgent, pki: Pki, start_served: StartServed
) -> None:
    """An agent that sends nothing new until the SVID expires: health says NOT_SERVING; a new SVID, SERVING again."""
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=8)
    workload_agent.start(SvidSet((server_svid(pki, not_after=soon),)))
    served = start_served(extra='[health]\nlisten = "127.0.0.1:0"\n')
    health_port = int(served.process.wait_for_records("server.started")[0]["health"].rpartition(":")[2])
    assert probe(health_port) == "SERVING"
    served.process.wait_for_records("tls.expired")
    assert probe(health_port) == "NOT_SERVING"
    fresh = server_svid(pki)
    workload_agent.set(SvidSet((fresh,)))
    served.process.wait_for_records("tls.valid_again")
    assert probe(health_port) == "SERVING"
    assert served.presented_serial() == fresh.serial


def _start_fails(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYNCTOKEN, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
        env=os.environ | SECRET_ENV | (env or {}),
    )


def test_silent_agent_fails_the_start_within_the_timeout(
    workload_agent: WorkloadAgent, pki: Pki, write_config: WriteConfig
) -> None:
    """An agent that takes the stream and never answers: start fails after first_svid_timeout, saying so, no traceback."""
    workload_agent.start(SvidSet((server_svid(pki),)), silent=True)
    config = write_config(config_text(pki, tls=spiffe_tls(workload_agent.address, first_svid_timeout="2s")))
    result = _start_fails(config)
    assert result.returncode == 3, result.stderr
    assert result.stderr == (
        f"synctoken: cannot start: no usable X509-SVID from the SPIFFE Workload API at {workload_agent.address} "
        "within 2s (tls.first_svid_timeout): the agent accepted the stream but sent no X509-SVID\n"
    )
    assert workload_agent.status().opened >= 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_while_the_first_svid_is_awaited(
    workload_agent: WorkloadAgent, pki: Pki, write_config: WriteConfig, leak_watch: LeakWatch, signum: signal.Signals
) -> None:
    """SIGTERM or SIGINT before the agent answers: a clean stop (status 0, one log line), no traceback, no kill."""
    workload_agent.start(SvidSet((server_svid(pki),)), silent=True)
    config = write_config(config_text(pki, tls=spiffe_tls(workload_agent.address, first_svid_timeout="60s")))
    process = Process(["serve", "--config", str(config)], config.parent, leak_watch, os.environ | SECRET_ENV)
    try:
        wait_for(lambda: workload_agent.status().opened >= 1)  # the first fetch is under way
        process.proc.send_signal(signum)
        assert process.proc.wait(timeout=START_TIMEOUT) == 0, process.stderr_path.read_text()
    finally:
        process.proc.kill()
    assert [(r["event"], r.get("signal")) for r in process.records()] == [("server.stopped_before_start", signum.name)]
    assert process.stderr_path.read_text() == ""


def test_no_agent_fails_the_start(workload_agent: WorkloadAgent, pki: Pki, write_config: WriteConfig) -> None:
    """No agent on the socket: start fails after first_svid_timeout with the stream's last error."""
    config = write_config(config_text(pki, tls=spiffe_tls(workload_agent.address, first_svid_timeout="1s")))
    result = _start_fails(config)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith(
        f"synctoken: cannot start: no usable X509-SVID from the SPIFFE Workload API at {workload_agent.address} "
        "within 1s (tls.first_svid_timeout): UNAVAILABLE: "
    )
    assert "Traceback" not in result.stderr


def test_unregistered_workload_fails_the_start(
    workload_agent: WorkloadAgent, pki: Pki, write_config: WriteConfig
) -> None:
    """An agent with no SVID for the server (no registration entry): start fails naming PERMISSION_DENIED."""
    workload_agent.start()
    config = write_config(config_text(pki, tls=spiffe_tls(workload_agent.address, first_svid_timeout="1s")))
    result = _start_fails(config)
    assert result.returncode == 3, result.stderr
    assert result.stderr.endswith("PERMISSION_DENIED: no identity issued\n")


@pytest.mark.slow
def test_each_worker_follows_its_own_stream(
    workload_agent: WorkloadAgent, pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
) -> None:
    """With --workers 2 each worker holds a stream, and a pushed SVID reaches both (two tls.reloaded lines)."""
    workload_agent.start(SvidSet((server_svid(pki),)))
    port = free_port()
    text = config_text(pki, listen=f"127.0.0.1:{port}", tls=spiffe_tls(workload_agent.address))
    served = Served(serve(text, tmp_path, leak_watch, processes, workers=2), port, pki, leak_watch)
    assert workload_agent.wait_for_streams(2).streams == 2
    fresh = server_svid(pki)
    workload_agent.set(SvidSet((fresh,)))
    reloaded = served.process.wait_for_records("tls.reloaded", 2)
    assert {(r["worker"], r["serial"]) for r in reloaded} == {(0, f"{fresh.serial:X}"), (1, f"{fresh.serial:X}")}
    assert served.call(pki.clients["bff"]) == grpc.StatusCode.OK
