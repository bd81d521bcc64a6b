"""Clients whose certificate comes only from the SPIFFE Workload API (the tests' stand-in agent), against real servers.

The client holds no certificate file: its X509-SVID and the bundle it trusts
the server by are the agent's. The servers read files (the suite's CA, which is
also the agent's bundle for example.org).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import re
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import pytest

from support.clients import ROTATED_ID, AsyncDriver, Driver, bare_env, client_kwargs, keep, run_client
from support.configs import config_text, spiffe_tls
from support.constants import BFF_ID, SERVICE_B
from support.inprocess import RunningServer, ServerHarness
from support.logcapture import LeakWatch, LogSink, callers
from support.pki import Pki
from support.waiting import wait_for
from support.workloadagent import Svid, SvidSet, WorkloadAgent, issue_svid
from synctoken.client import (
    AsyncTokenClient,
    Cause,
    SynctokenError,
    TokenClient,
    Unavailable,
    WorkloadApiTimeoutError,
)
from synctoken_server.dev.pki import CertificateAuthority, LeafSpec

SERVER_ID = "spiffe://example.org/ns/prod/sa/synctoken"
PARTNER = "partner.example"
PARTNER_SERVER_ID = f"spiffe://{PARTNER}/sa/sync"
WORKERS = 3
STREAM_SECONDS = 20

MakeSpiffeClient = Callable[..., Driver]


@pytest.fixture(params=["sync", "async"])
def make_spiffe_client(request: pytest.FixtureRequest, workload_agent: WorkloadAgent) -> Iterator[MakeSpiffeClient]:
    """Open TokenClient.from_spiffe (or AsyncTokenClient's, behind a blocking face) on the agent's socket."""
    made: list[Driver] = []

    def make(port: int, **kwargs: object) -> Driver:
        arguments: dict[str, object] = {"endpoint_socket": workload_agent.address, **kwargs}
        client: Driver
        if request.param == "sync":
            client = TokenClient.from_spiffe(f"127.0.0.1:{port}", **arguments)  # type: ignore[arg-type]
        else:
            client = AsyncDriver(AsyncTokenClient.from_spiffe(f"127.0.0.1:{port}", **arguments))  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        if isinstance(client, AsyncDriver):
            client.dispose()
        else:
            client.close()


def bff_svid(pki: Pki, spiffe_id: str = BFF_ID) -> Svid:
    """An X509-SVID for a calling workload, from the suite's CA (example.org's bundle)."""
    return issue_svid(pki.ca, spiffe_id)


def serve_certificate(harness: ServerHarness, pki: Pki, directory: Path, svid: Svid) -> RunningServer:
    """A server presenting `svid` (from files: the server's own Workload API source is not under test here)."""
    cert, key = directory / "server-svid.pem", directory / "server-svid-key.pem"
    svid.pair.write(cert, key)
    text = config_text(pki)
    text = text.replace(str(pki.directory / "server.pem"), str(cert))
    text = text.replace(str(pki.directory / "server-key.pem"), str(key))
    return harness.start(text)


class TestFirstFetch:
    """A client started on the agent's SVID calls with it, and fails clearly when there is none."""

    def test_call_with_the_agents_svid(
        self,
        pki: Pki,
        workload_agent: WorkloadAgent,
        make_spiffe_client: MakeSpiffeClient,
        shared_server: RunningServer,
    ) -> None:
        """The server sees the SVID's SPIFFE ID, and the client trusted it by the agent's bundle."""
        workload_agent.start(SvidSet((bff_svid(pki),)))
        assert make_spiffe_client(shared_server.port).whoami().caller_id == BFF_ID

    def test_agent_that_never_answers(self, pki: Pki, workload_agent: WorkloadAgent) -> None:
        """An agent that accepts the stream and sends nothing: a TimeoutError after the bounded wait, saying so."""
        workload_agent.start(SvidSet((bff_svid(pki),)), silent=True)
        with pytest.raises(WorkloadApiTimeoutError) as caught:
            TokenClient.from_spiffe("localhost:1", endpoint_socket=workload_agent.address, first_svid_timeout=1)
        assert str(caught.value) == (
            f"no usable X509-SVID from the SPIFFE Workload API at {workload_agent.address} within 1 s "
            "(last seen: the agent accepted the stream but sent nothing): is this workload registered with the agent?"
        )

    def test_workload_not_registered(self, workload_agent: WorkloadAgent) -> None:
        """An agent with no identity for this workload: the error gives the agent's PERMISSION_DENIED."""
        workload_agent.start()
        with pytest.raises(WorkloadApiTimeoutError, match=r"last seen: PERMISSION_DENIED: no identity issued"):
            TokenClient.from_spiffe("localhost:1", endpoint_socket=workload_agent.address, first_svid_timeout=1)

    def test_no_socket(self, tmp_path: Path) -> None:
        """No agent socket at all: a TimeoutError naming the path once the same bound has passed."""
        socket = tmp_path / "agent.sock"
        with pytest.raises(WorkloadApiTimeoutError) as caught:
            TokenClient.from_spiffe("localhost:1", endpoint_socket=f"unix://{socket}", first_svid_timeout=0.3)
        assert str(caught.value).startswith(f"no SPIFFE Workload API socket at {socket} within 0.3 s")

    def test_federated_bundle_for_the_own_trust_domain_not_used(self, pki: Pki, workload_agent: WorkloadAgent) -> None:
        """A 'federated' bundle under the SVID's own trust domain would replace the bundle the server is trusted by."""
        rival = CertificateAuthority("rival CA for example.org")
        workload_agent.start(SvidSet((bff_svid(pki),), federated={"example.org": rival.cert_pem}))
        with pytest.raises(WorkloadApiTimeoutError) as caught:
            TokenClient.from_spiffe("localhost:1", endpoint_socket=workload_agent.address, first_svid_timeout=1)
        assert (
            "(last seen: an update was not used: a federated bundle is for this workload's own trust domain "
            "example.org)" in str(caught.value)
        )

    def test_expired_svid_not_used(self, pki: Pki, workload_agent: WorkloadAgent) -> None:
        """An SVID past its validity is not put to use (every handshake would fail): the wait ends saying so."""
        long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
        expired = issue_svid(pki.ca, BFF_ID, not_before=long_ago, not_after=long_ago + dt.timedelta(days=1))
        workload_agent.start(SvidSet((expired,)))
        with pytest.raises(WorkloadApiTimeoutError, match=r"last seen: an update was not used: the X509-SVID "):
            TokenClient.from_spiffe("localhost:1", endpoint_socket=workload_agent.address, first_svid_timeout=1)

    def test_without_the_extra(self) -> None:
        """Without py-spiffe, from_spiffe raises an ImportError naming the extra; the client itself imports."""
        probe = (
            "import sys; sys.modules['spiffe'] = None\n"
            "from synctoken.client import TokenClient, MissingExtraError\n"
            "try:\n    TokenClient.from_spiffe('localhost:1', endpoint_socket='unix:///nowhere')\n"
            "except MissingExtraError as e:\n    print(e)\n"
        )
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.strip() == (
            "certificates from the SPIFFE Workload API need py-spiffe: pip install 'synctoken-api[spiffe]'"
        )


class TestFromEnv:
    """SYNCTOKEN_SPIFFE_ENDPOINT_SOCKET, with no file variable, makes from_env take the Workload API's SVID."""

    def test_from_env(self, pki: Pki, workload_agent: WorkloadAgent, shared_server: RunningServer) -> None:
        """The socket and the expected server SPIFFE ID from the variables; the call presents the agent's SVID."""
        workload_agent.start(SvidSet((bff_svid(pki),)))
        environ = {
            "SYNCTOKEN_TARGET": f"127.0.0.1:{shared_server.port}",
            "SYNCTOKEN_SPIFFE_ENDPOINT_SOCKET": workload_agent.address,
            "SYNCTOKEN_SERVER_SPIFFE_ID": SERVER_ID,
        }
        with TokenClient.from_env(environ) as client:
            assert client.whoami().caller_id == BFF_ID

    def test_command(self, pki: Pki, workload_agent: WorkloadAgent, shared_server: RunningServer) -> None:
        """synctoken-client with the socket variable and no file: whoami prints the SVID's ID."""
        workload_agent.start(SvidSet((bff_svid(pki),)))
        env = bare_env() | {
            "SYNCTOKEN_TARGET": f"127.0.0.1:{shared_server.port}",
            "SYNCTOKEN_SPIFFE_ENDPOINT_SOCKET": workload_agent.address,
        }
        code, out, err = run_client("whoami", env=env)
        assert (code, err) == (0, "")
        assert out is not None
        assert out["caller_id"] == BFF_ID

    @pytest.mark.parametrize(
        ("variables", "message"),
        [
            (
                {"SYNCTOKEN_CA_FILE": "/ca.pem"},
                "SYNCTOKEN_SPIFFE_ENDPOINT_SOCKET and SYNCTOKEN_CA_FILE are both set: unset one",
            ),
            (
                {"SYNCTOKEN_SPIFFE_ENDPOINT_SOCKET": "/run/agent.sock"},
                (
                    "SYNCTOKEN_SPIFFE_ENDPOINT_SOCKET must name a Unix socket as unix:///path/to/agent.sock, "
                    "not '/run/agent.sock'"
                ),
            ),
            (
                {"SYNCTOKEN_SPIFFE_ENDPOINT_SOCKET": "unix://host/agent.sock"},
                (
                    "SYNCTOKEN_SPIFFE_ENDPOINT_SOCKET must name a Unix socket as unix:///path/to/agent.sock, "
                    "not 'unix://host/agent.sock'"
                ),
            ),
            (
                {"SYNCTOKEN_SPIFFE_ENDPOINT_SOCKET": "unix:run/agent.sock"},
                (
                    "SYNCTOKEN_SPIFFE_ENDPOINT_SOCKET must name a Unix socket as unix:///path/to/agent.sock, "
                    "not 'unix:run/agent.sock'"
                ),
            ),
            (
                {"SYNCTOKEN_SERVER_SPIFFE_ID": "spiffe://example.org"},
                (
                    "SYNCTOKEN_SERVER_SPIFFE_ID must be a workload's SPIFFE ID such as "
                    "spiffe://example.org/ns/prod/sa/synctoken, not 'spiffe://example.org'"
                ),
            ),
            (
                {"SYNCTOKEN_SERVER_SPIFFE_ID": "spiffe://example.org/ns/../x"},
                (
                    "SYNCTOKEN_SERVER_SPIFFE_ID must be a workload's SPIFFE ID such as "
                    "spiffe://example.org/ns/prod/sa/synctoken, not 'spiffe://example.org/ns/../x'"
                ),
            ),
        ],
    )
    def test_refused(self, variables: dict[str, str], message: str) -> None:
        """Both certificate sources, a socket not named as the standard says, a bad server ID: a ValueError."""
        environ = {"SYNCTOKEN_TARGET": "127.0.0.1:1", "SYNCTOKEN_SPIFFE_ENDPOINT_SOCKET": "unix:///run/a.sock"}
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            TokenClient.from_env(environ | variables)

    def test_server_spiffe_id_with_files_refused(self, pki: Pki) -> None:
        """SYNCTOKEN_SERVER_SPIFFE_ID with the file variables: refused rather than silently unused."""
        paths = {f"SYNCTOKEN_{k.upper()}": str(v) for k, v in client_kwargs(pki, "bff").items()}
        environ = {"SYNCTOKEN_TARGET": "127.0.0.1:1", "SYNCTOKEN_SERVER_SPIFFE_ID": SERVER_ID} | paths
        with pytest.raises(
            ValueError, match=r"^SYNCTOKEN_SERVER_SPIFFE_ID applies to certificates from the Workload API only$"
        ):
            TokenClient.from_env(environ)


class TestServerIdentity:
    """The server is trusted by the bundle of the expected server SPIFFE ID's trust domain, and by its name."""

    @pytest.fixture
    def partner_ca(self) -> CertificateAuthority:
        """A federated trust domain's CA."""
        return CertificateAuthority("partner.example's CA")

    @pytest.fixture
    def partner_server(
        self, pki: Pki, tmp_path: Path, harness: ServerHarness, partner_ca: CertificateAuthority
    ) -> RunningServer:
        """A server whose SVID is partner.example's (named 127.0.0.1), trusting example.org's callers."""
        return serve_certificate(harness, pki, tmp_path, issue_svid(partner_ca, PARTNER_SERVER_ID, server=True))

    def test_server_of_another_trust_domain_refused(
        self,
        pki: Pki,
        partner_server: RunningServer,
        partner_ca: CertificateAuthority,
        workload_agent: WorkloadAgent,
        make_spiffe_client: MakeSpiffeClient,
    ) -> None:
        """A server whose SVID is partner.example's, when example.org's was expected: refused, saying which bundle."""
        workload_agent.start(SvidSet((bff_svid(pki),), federated={PARTNER: partner_ca.cert_pem}))
        client = make_spiffe_client(partner_server.port, server_spiffe_id=SERVER_ID)
        with pytest.raises(Unavailable) as caught:
            client.whoami()
        assert caught.value.cause is Cause.TLS_HANDSHAKE_FAILED
        assert "the Workload API's bundle for trust domain example.org must hold the CA that issued it" in str(
            caught.value
        )

    def test_server_of_a_federated_trust_domain_accepted_when_expected(
        self,
        pki: Pki,
        partner_server: RunningServer,
        partner_ca: CertificateAuthority,
        workload_agent: WorkloadAgent,
        make_spiffe_client: MakeSpiffeClient,
    ) -> None:
        """server_spiffe_id in partner.example: the federated bundle is the one trusted, and the call works."""
        workload_agent.start(SvidSet((bff_svid(pki),), federated={PARTNER: partner_ca.cert_pem}))
        client = make_spiffe_client(partner_server.port, server_spiffe_id=PARTNER_SERVER_ID)
        assert client.whoami().caller_id == BFF_ID

    def test_federation_withdrawn_keeps_the_material_in_use(
        self,
        pki: Pki,
        partner_server: RunningServer,
        partner_ca: CertificateAuthority,
        workload_agent: WorkloadAgent,
        make_spiffe_client: MakeSpiffeClient,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """An update without the expected server's bundle is logged and not used; the SVID and bundle in use stay."""
        workload_agent.start(SvidSet((bff_svid(pki),), federated={PARTNER: partner_ca.cert_pem}))
        client = make_spiffe_client(partner_server.port, server_spiffe_id=PARTNER_SERVER_ID)
        assert client.whoami().caller_id == BFF_ID
        workload_agent.set(SvidSet((bff_svid(pki, ROTATED_ID),)))
        wait_for(
            lambda: any("no bundle for the trust domain partner.example" in r.getMessage() for r in caplog.records)
        )
        assert client.whoami().caller_id == BFF_ID

    def test_server_svid_without_the_name_refused(
        self,
        pki: Pki,
        tmp_path: Path,
        harness: ServerHarness,
        workload_agent: WorkloadAgent,
        make_spiffe_client: MakeSpiffeClient,
    ) -> None:
        """A server SVID with its SPIFFE ID but not the name dialled: refused naming it; with server_name, accepted."""
        svid = Svid(
            SERVER_ID,
            pki.ca.issue(
                LeafSpec(
                    "synctoken",
                    uris=(SERVER_ID,),
                    dns_names=("synctoken.internal",),
                    server=True,
                    digital_signature=True,
                )
            ),
            pki.ca.cert_pem,
        )
        server = serve_certificate(harness, pki, tmp_path, svid)
        workload_agent.start(SvidSet((bff_svid(pki),)))
        with pytest.raises(Unavailable, match=r"does not carry the name in the target '127\.0\.0\.1:\d+'"):
            make_spiffe_client(server.port, server_spiffe_id=SERVER_ID).whoami()
        named = make_spiffe_client(server.port, server_spiffe_id=SERVER_ID, server_name="synctoken.internal")
        assert named.whoami().caller_id == BFF_ID


class TestAgentAway:
    """While the agent is away, the last SVID stays in use; when it is back, its new SVID is taken."""

    def test_restart(
        self,
        pki: Pki,
        workload_agent: WorkloadAgent,
        make_spiffe_client: MakeSpiffeClient,
        shared_server: RunningServer,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Agent stopped (socket gone): calls go on with the last SVID; restarted with a new one: it is used."""
        caplog.set_level(logging.INFO, "synctoken.client")
        workload_agent.start(SvidSet((bff_svid(pki),)))
        client = make_spiffe_client(shared_server.port)
        assert client.whoami().caller_id == BFF_ID
        workload_agent.stop()
        assert client.whoami().caller_id == BFF_ID
        wait_for(lambda: any("certificate in use stays" in r.getMessage() for r in caplog.records))
        workload_agent.set(SvidSet((bff_svid(pki, ROTATED_ID),)))
        workload_agent.start()
        wait_for(lambda: client.whoami().caller_id == ROTATED_ID)


class TestNoFilesAnywhere:
    """Server and client each take their SVID from a Workload API agent of their own: no certificate file at all."""

    def test_both_from_agents(
        self, pki: Pki, tmp_path: Path, workload_agent: WorkloadAgent, harness: ServerHarness, leak_watch: LeakWatch
    ) -> None:
        """A call works; after both agents push new SVIDs, a new connection handshakes and the server sees the new caller."""
        server_agent = WorkloadAgent(tmp_path, leak_watch)
        try:
            server_agent.start(SvidSet((issue_svid(pki.ca, SERVER_ID, server=True),)))
            server = harness.start(config_text(pki, tls=spiffe_tls(server_agent.address)))
            workload_agent.start(SvidSet((bff_svid(pki),)))
            with TokenClient.from_spiffe(
                f"127.0.0.1:{server.port}", endpoint_socket=workload_agent.address, server_spiffe_id=SERVER_ID
            ) as client:
                assert client.whoami().caller_id == BFF_ID
                server_agent.set(SvidSet((issue_svid(pki.ca, SERVER_ID, server=True),)))
                workload_agent.set(SvidSet((bff_svid(pki, ROTATED_ID),)))
                wait_for(lambda: client.whoami().caller_id == ROTATED_ID)
        finally:
            server_agent.close()


class TestRotationUnderLoad:
    """A new SVID pushed under a stream of calls fails no call, and the server's audit log shows the new caller."""

    def test_threads(
        self,
        pki: Pki,
        workload_agent: WorkloadAgent,
        shared_server: RunningServer,
        log_sink: LogSink,
        leak_watch: LeakWatch,
    ) -> None:
        """TokenClient in three threads: zero failed calls across the rotation; only the new caller at the end."""
        workload_agent.start(SvidSet((bff_svid(pki),)))
        identity = f"user-{time.time_ns()}"
        stop = threading.Event()
        failures: list[BaseException] = []

        def stream(client: TokenClient) -> None:
            deadline = time.monotonic() + STREAM_SECONDS
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    keep(leak_watch, client.issue_token(identity, service_sid=SERVICE_B))
                except SynctokenError as exc:
                    failures.append(exc)

        with (
            TokenClient.from_spiffe(
                f"127.0.0.1:{shared_server.port}", endpoint_socket=workload_agent.address
            ) as client,
            futures.ThreadPoolExecutor(max_workers=WORKERS) as pool,
        ):
            running = [pool.submit(stream, client) for _ in range(WORKERS)]
            wait_for(lambda: len(callers(log_sink, identity)) >= 20)
            workload_agent.set(SvidSet((bff_svid(pki, ROTATED_ID),)))
            wait_for(lambda: callers(log_sink, identity)[-10:] == [ROTATED_ID] * 10)
            stop.set()
            for worker in running:
                worker.result(timeout=STREAM_SECONDS)
            assert len(client._generations) == 1, "the old channel was not closed"
        assert failures == []
        seen = callers(log_sink, identity)
        assert (seen[0], seen[-1]) == (BFF_ID, ROTATED_ID)
        # Calls already on the old channel when the new SVID arrived: at most one per worker.
        assert seen[seen.index(ROTATED_ID) :].count(BFF_ID) <= WORKERS

    def test_tasks(
        self,
        pki: Pki,
        workload_agent: WorkloadAgent,
        shared_server: RunningServer,
        log_sink: LogSink,
        leak_watch: LeakWatch,
    ) -> None:
        """AsyncTokenClient in three tasks: zero failed calls across the rotation; only the new caller at the end."""
        workload_agent.start(SvidSet((bff_svid(pki),)))
        identity = f"user-{time.time_ns()}"
        failures: list[BaseException] = []

        async def stream(client: AsyncTokenClient, stop: asyncio.Event) -> None:
            deadline = time.monotonic() + STREAM_SECONDS
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    keep(leak_watch, await client.issue_token(identity, service_sid=SERVICE_B))
                except SynctokenError as exc:
                    failures.append(exc)

        async def main() -> None:
            stop = asyncio.Event()
            async with AsyncTokenClient.from_spiffe(
                f"127.0.0.1:{shared_server.port}", endpoint_socket=workload_agent.address
            ) as client:
                running = [asyncio.ensure_future(stream(client, stop)) for _ in range(WORKERS)]
                await asyncio.to_thread(wait_for, lambda: len(callers(log_sink, identity)) >= 20)
                await asyncio.to_thread(workload_agent.set, SvidSet((bff_svid(pki, ROTATED_ID),)))
                await asyncio.to_thread(wait_for, lambda: callers(log_sink, identity)[-10:] == [ROTATED_ID] * 10)
                stop.set()
                await asyncio.wait_for(asyncio.gather(*running), timeout=STREAM_SECONDS)

        asyncio.run(main())
        assert failures == []
        seen = callers(log_sink, identity)
        assert (seen[0], seen[-1]) == (BFF_ID, ROTATED_ID)


def workload_threads() -> set[threading.Thread]:
    """The threads that read a Workload API stream for a client, now."""
    return {t for t in threading.enumerate() if t.name == "synctoken-workload-api"}


class TestUnclosedClient:
    """A client dropped without close() is collected, and its Workload API stream and thread end with it."""

    def test_blocking_client(self, pki: Pki, workload_agent: WorkloadAgent, shared_server: RunningServer) -> None:
        """TokenClient used, then every reference dropped: after gc.collect() its thread ends and the stream closes."""
        workload_agent.start(SvidSet((bff_svid(pki),)))
        before = workload_threads()
        client = TokenClient.from_spiffe(f"127.0.0.1:{shared_server.port}", endpoint_socket=workload_agent.address)
        assert client.whoami().caller_id == BFF_ID
        assert workload_agent.status().streams == 1
        started, dropped = workload_threads() - before, weakref.ref(client)
        del client
        self.assert_stream_ended(dropped, started, workload_agent)

    def test_asyncio_client(self, pki: Pki, workload_agent: WorkloadAgent, shared_server: RunningServer) -> None:
        """AsyncTokenClient used in a loop that ends, never closed: collected, its thread ends and the stream closes."""
        workload_agent.start(SvidSet((bff_svid(pki),)))
        before = workload_threads()

        async def use() -> weakref.ref[AsyncTokenClient]:
            client = AsyncTokenClient.from_spiffe(
                f"127.0.0.1:{shared_server.port}", endpoint_socket=workload_agent.address
            )
            assert (await client.whoami()).caller_id == BFF_ID
            started.update(workload_threads() - before)
            assert workload_agent.status().streams == 1
            return weakref.ref(client)

        started: set[threading.Thread] = set()
        dropped = asyncio.run(use())
        self.assert_stream_ended(dropped, started, workload_agent)

    @staticmethod
    def assert_stream_ended(
        dropped: weakref.ref[TokenClient] | weakref.ref[AsyncTokenClient],
        started: set[threading.Thread],
        agent: WorkloadAgent,
    ) -> None:
        """The client is gone after a collection; then so are its one thread and its one stream."""
        assert len(started) == 1, f"the client started {len(started)} Workload API threads"
        (thread,) = started
        gc.collect()
        assert dropped() is None, "something still holds the client"
        thread.join(timeout=STREAM_SECONDS)
        assert not thread.is_alive(), "the dropped client's Workload API thread still runs"
        wait_for(lambda: agent.status().streams == 0)
