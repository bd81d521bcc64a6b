"""The tests' stand-in SPIFFE Workload API agent speaks the standard: py-spiffe's own client is its client here.

Everything the server's and the clients' Workload API tests rely on is checked once here: the first fetch,
the header SPIRE requires, a replacement pushed down an open stream, a restart on the same socket, an agent
that never answers.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from cryptography import x509
from spiffe import SpiffeId, TrustDomain, WorkloadApiClient
from spiffe.workloadapi.errors import FetchX509SvidError
from spiffe.workloadapi.x509_context import X509Context

from support.constants import BFF_ID, TRUST_DOMAIN
from support.pki import Pki
from support.workloadagent import AGENT_TIMEOUT, SvidSet, WorkloadAgent, issue_svid
from synctoken_server.dev.pki import CertificateAuthority

PARTNER = "partner.example"


@pytest.fixture(scope="module")
def partner_ca() -> CertificateAuthority:
    """The CA of a federated trust domain."""
    return CertificateAuthority(f"{PARTNER} CA")


def test_first_fetch_gives_svid_and_bundles(
    workload_agent: WorkloadAgent, pki: Pki, partner_ca: CertificateAuthority
) -> None:
    """py-spiffe's client fetches the SVID, the own trust domain's bundle and the federated bundle."""
    svid = issue_svid(pki.ca, BFF_ID)
    workload_agent.start(SvidSet((svid,), federated={PARTNER: partner_ca.cert_pem}))
    with WorkloadApiClient(workload_agent.address) as client:
        context = client.fetch_x509_context(timeout=AGENT_TIMEOUT)
    assert context.default_svid.spiffe_id == SpiffeId(BFF_ID)
    assert context.default_svid.leaf.serial_number == svid.serial
    bundles = context.x509_bundle_set
    own = bundles.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
    partner = bundles.get_bundle_for_trust_domain(TrustDomain(PARTNER))
    assert own is not None
    assert partner is not None
    assert own.x509_authorities == {x509.load_pem_x509_certificate(pki.ca.cert_pem)}
    assert len(partner.x509_authorities) == 1


def test_call_without_the_header_is_invalid_argument(workload_agent: WorkloadAgent, pki: Pki) -> None:
    """A fetch without `workload.spiffe.io: true` is refused with INVALID_ARGUMENT, as SPIRE refuses it."""
    workload_agent.start(SvidSet((issue_svid(pki.ca, BFF_ID),)))
    with grpc.insecure_channel(workload_agent.address) as channel:
        fetch = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509SVID", request_serializer=bytes, response_deserializer=bytes
        )
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(fetch(b"", timeout=AGENT_TIMEOUT)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "security header missing from request"
    assert workload_agent.status().rejected == 1


def test_no_identity_is_permission_denied(workload_agent: WorkloadAgent) -> None:
    """An agent with nothing to serve answers PERMISSION_DENIED, as SPIRE does for an unregistered workload."""
    workload_agent.start()
    with WorkloadApiClient(workload_agent.address) as client, pytest.raises(FetchX509SvidError) as refused:
        client.fetch_x509_context(timeout=AGENT_TIMEOUT)
    assert "PERMISSION_DENIED" in str(refused.value)


class _Watcher:
    """py-spiffe's stream watcher, keeping every context it was sent."""

    def __init__(self, client: WorkloadApiClient) -> None:
        self.serials: list[int] = []
        self._changed = threading.Condition()
        self.handler = client.stream_x509_contexts(self._received, lambda _error: None)

    def _received(self, context: X509Context) -> None:
        with self._changed:
            self.serials.append(context.default_svid.leaf.serial_number)
            self._changed.notify_all()

    def wait_for(self, serial: int) -> None:
        with self._changed:
            found = self._changed.wait_for(lambda: serial in self.serials, timeout=AGENT_TIMEOUT)
        assert found, f"serial {serial} never arrived; got {self.serials}"


def test_replacement_is_pushed_down_the_open_stream(workload_agent: WorkloadAgent, pki: Pki) -> None:
    """A new SVID set reaches a watcher on its open stream: no new stream is opened for it."""
    first, second = issue_svid(pki.ca, BFF_ID), issue_svid(pki.ca, BFF_ID)
    workload_agent.start(SvidSet((first,)))
    with WorkloadApiClient(workload_agent.address) as client:
        watcher = _Watcher(client)
        watcher.wait_for(first.serial)
        workload_agent.set(SvidSet((second,)))
        watcher.wait_for(second.serial)
        watcher.handler.cancel()
    assert workload_agent.status().opened == 1


def test_restart_on_the_same_socket(workload_agent: WorkloadAgent, pki: Pki) -> None:
    """Stopped, the agent's socket is gone; started again, it serves the last set, and a watcher reconnects."""
    first, second = issue_svid(pki.ca, BFF_ID), issue_svid(pki.ca, BFF_ID)
    workload_agent.start(SvidSet((first,)))
    with WorkloadApiClient(workload_agent.address) as client:
        watcher = _Watcher(client)
        watcher.wait_for(first.serial)
        workload_agent.stop()
        assert not workload_agent.socket_path.exists()
        workload_agent.set(SvidSet((second,)))
        workload_agent.start()
        watcher.wait_for(second.serial)
        watcher.handler.cancel()


def test_silent_agent_accepts_the_stream_and_never_answers(workload_agent: WorkloadAgent, pki: Pki) -> None:
    """A silent agent holds the stream open and sends nothing: the fetch runs into its deadline."""
    workload_agent.start(SvidSet((issue_svid(pki.ca, BFF_ID),)), silent=True)
    with WorkloadApiClient(workload_agent.address) as client:
        outcome: list[BaseException] = []
        fetching = threading.Thread(target=lambda: _fetch_into(client, outcome))
        fetching.start()
        workload_agent.wait_for_streams(1)
        fetching.join(timeout=AGENT_TIMEOUT)
    assert not fetching.is_alive()
    assert len(outcome) == 1
    assert "DEADLINE_EXCEEDED" in str(outcome[0])


def _fetch_into(client: WorkloadApiClient, outcome: list[BaseException]) -> None:
    started = time.monotonic()
    try:
        client.fetch_x509_context(timeout=2)
    except FetchX509SvidError as error:
        outcome.append(error)
    else:
        outcome.append(AssertionError(f"a silent agent answered after {time.monotonic() - started:.1f}s"))
