"""Rotating the server certificate and the client CA under a running `synctoken serve`.

Real processes, real file swaps (a temp file and os.replace, as cert-manager
does, or an in-place rewrite), real handshakes; every load is bounded in
calls and time.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from support.calls import ALICE, SteadyLoad, channel
from support.configs import config_text
from support.constants import BFF_ID
from support.files import replace_file, rewrite_in_place
from support.logcapture import LeakWatch
from support.pki import Pki, presented_certificate
from support.processes import Process, free_port, serve
from synctoken.v1 import token_service_pb2_grpc
from synctoken_server.dev.pki import CertificateAuthority, KeyPair, LeafSpec

Write = Callable[[Path, bytes], None]


def new_server_pair(ca: CertificateAuthority, *, expired: bool = False) -> KeyPair:
    """A fresh localhost server certificate from `ca` (or one that expired yesterday)."""
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=2), now - dt.timedelta(days=1)) if expired else (None, None)
    return ca.issue(
        LeafSpec(
            "localhost",
            dns_names=("localhost",),
            ip_addresses=("127.0.0.1",),
            server=True,
            not_before=start,
            not_after=end,
        )
    )


def serial_of(pair: KeyPair) -> str:
    """The certificate's serial, as synctoken logs it."""
    return f"{x509.load_pem_x509_certificate(pair.cert_pem).serial_number:X}"


@dataclass
class Rotating:
    """A serving process whose TLS files live in `tls` for the test to swap."""

    pki: Pki
    process: Process
    port: int
    tls: Path
    watch: LeakWatch

    def install(self, pair: KeyPair, write: Write = replace_file, between: Callable[[], object] = lambda: None) -> None:
        """Write the key, then (after `between`) the certificate, one file at a time, as most rotation tools do."""
        write(self.tls / "server-key.pem", pair.key_pem)
        between()
        write(self.tls / "server.pem", pair.cert_pem)

    def peer_serial(self) -> str:
        """The serial of the certificate the server presents on a new connection."""
        certificate = presented_certificate(self.port, self.pki.ca.cert_pem.decode(), self.pki.files("bff"))
        return f"{certificate.serial_number:X}"

    def reloaded(self, count: int = 1) -> dict[str, object]:
        """Wait for the `count`-th tls.reloaded line and return it."""
        return self.process.wait_for_records("tls.reloaded", count)[count - 1]

    def call(self, pair: KeyPair) -> grpc.StatusCode:
        """One IssueToken on a new connection, presenting `pair`; the status it ends with."""
        credentials = grpc.ssl_channel_credentials(self.pki.ca.cert_pem, pair.key_pem, pair.cert_pem)
        with grpc.secure_channel(f"localhost:{self.port}", credentials) as ch:
            try:
                self.watch.tokens.add(token_service_pb2_grpc.TokenServiceStub(ch).IssueToken(ALICE, timeout=10).token)
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK


@pytest.fixture
def rotating(pki: Pki, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]) -> Rotating:
    """`synctoken serve` on copies of the suite's server pair and CA."""
    tls = tmp_path / "tls"
    tls.mkdir()
    for name in ("server.pem", "server-key.pem", "ca.pem"):
        shutil.copy2(pki.directory / name, tls / name)
    port = free_port()
    text = config_text(pki, listen=f"127.0.0.1:{port}").replace(str(pki.directory), str(tls))
    return Rotating(pki, serve(text, tmp_path, leak_watch, processes), port, tls, leak_watch)


class TestServerCertificate:
    """A new server certificate is served from the next handshake on, and no call fails meanwhile."""

    @pytest.mark.parametrize("write", [replace_file, rewrite_in_place], ids=["os.replace", "in place"])
    def test_rotation_under_load(self, rotating: Rotating, leak_watch: LeakWatch, write: Write) -> None:
        """Under calls on kept and on new connections, a swap fails no call, and new connections see the new serial.

        Between the two files, the new key does not match the old certificate:
        that set is refused and the old one kept, under load too.
        """
        [loaded] = rotating.process.wait_for_records("tls.loaded")
        assert rotating.peer_serial() == loaded["serial"]
        load = SteadyLoad(rotating.pki, rotating.port, leak_watch, connections=3, fresh=2)
        load.wait_for(30)
        pair = new_server_pair(rotating.pki.ca)

        def half_way() -> None:
            failures = rotating.process.wait_for_records("tls.reload_failed")
            assert {f["key"] for f in failures} == {"tls.key_file"}, failures
            load.wait_for(30)

        rotating.install(pair, write, between=half_way)
        assert rotating.reloaded()["serial"] == serial_of(pair)
        load.wait_for(30)
        outcomes = load.stop()
        assert rotating.peer_serial() == serial_of(pair)
        assert [o.code for o in outcomes if o.code != grpc.StatusCode.OK] == []
        # Written in place, a file may also be caught empty or half-written: refused all the same.
        failures = [r for r in rotating.process.records() if r["event"] == "tls.reload_failed"]
        assert {r["key"] for r in failures} <= {"tls.cert_file", "tls.key_file"}, failures

    def test_mismatched_pair_is_refused_until_fixed(self, rotating: Rotating) -> None:
        """A certificate without its key is refused, the old pair keeps serving, and the key's arrival completes it."""
        old = rotating.peer_serial()
        pair = new_server_pair(rotating.pki.ca)
        replace_file(rotating.tls / "server.pem", pair.cert_pem)
        [failure] = rotating.process.wait_for_records("tls.reload_failed")
        assert (failure["key"], failure["reason"]) == (
            "tls.key_file",
            "does not match the first certificate in tls.cert_file",
        )
        assert rotating.peer_serial() == old
        assert rotating.call(rotating.pki.clients["bff"]) == grpc.StatusCode.OK
        replace_file(rotating.tls / "server-key.pem", pair.key_pem)
        assert rotating.reloaded()["serial"] == serial_of(pair)
        assert rotating.peer_serial() == serial_of(pair)

    def test_expired_certificate_is_refused(self, rotating: Rotating) -> None:
        """An expired pair, however well matched, is never served."""
        old = rotating.peer_serial()
        rotating.install(new_server_pair(rotating.pki.ca, expired=True))
        failures = rotating.process.wait_for_records("tls.reload_failed")
        assert failures[-1]["key"] == "tls.cert_file"
        assert str(failures[-1]["reason"]).startswith("expired at ")
        assert rotating.peer_serial() == old
        assert rotating.call(rotating.pki.clients["bff"]) == grpc.StatusCode.OK


class TestClientCa:
    """A CA rotation: the bundle holds the old and the new CA for a while, then the new one alone."""

    def test_ca_rotation(self, rotating: Rotating) -> None:
        """A client of the new CA is refused, then accepted beside old ones, then alone; kept connections carry on."""
        new_ca = CertificateAuthority("the next synctoken CA")
        newcomer = new_ca.issue(LeafSpec("bff", uris=(BFF_ID,)))
        veteran = rotating.pki.clients["bff"]
        kept = channel(rotating.pki, rotating.port)
        stub = token_service_pb2_grpc.TokenServiceStub(kept)
        rotating.watch.tokens.add(stub.IssueToken(ALICE, timeout=10).token)
        assert rotating.call(newcomer) == grpc.StatusCode.UNAVAILABLE

        replace_file(rotating.tls / "ca.pem", rotating.pki.ca.cert_pem + new_ca.cert_pem)
        assert rotating.reloaded()["client_cas"] == 2
        assert (rotating.call(newcomer), rotating.call(veteran)) == (grpc.StatusCode.OK, grpc.StatusCode.OK)

        replace_file(rotating.tls / "ca.pem", new_ca.cert_pem)
        assert rotating.reloaded(2)["client_cas"] == 1
        assert (rotating.call(newcomer), rotating.call(veteran)) == (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
        # Verified at its handshake, under the old bundle: a connection is not re-checked.
        rotating.watch.tokens.add(stub.IssueToken(ALICE, timeout=10).token)
        kept.close()

    def test_path_length_follows_the_bundle(self, rotating: Rotating) -> None:
        """The client CA's path length is enforced from the bundle in force: it rotates with the files, not the config."""
        strict_ca = CertificateAuthority("a CA allowing no intermediate", path_length=0)
        intermediate = strict_ca.issue(
            LeafSpec("intermediate", uris=("spiffe://example.org",), ca=True, key_cert_sign=True, crl_sign=True)
        )
        through_intermediate = strict_ca.issue(LeafSpec("bff", uris=(BFF_ID,)), issuer=intermediate)
        replace_file(rotating.tls / "ca.pem", rotating.pki.ca.cert_pem + strict_ca.cert_pem)
        rotating.reloaded()
        assert rotating.call(through_intermediate) == grpc.StatusCode.UNAUTHENTICATED
        open_ca = CertificateAuthority("a CA allowing intermediates", path_length=None)
        open_intermediate = open_ca.issue(
            LeafSpec("intermediate", uris=("spiffe://example.org",), ca=True, key_cert_sign=True, crl_sign=True)
        )
        replace_file(rotating.tls / "ca.pem", open_ca.cert_pem)
        rotating.reloaded(2)
        assert (
            rotating.call(open_ca.issue(LeafSpec("bff", uris=(BFF_ID,)), issuer=open_intermediate))
            == grpc.StatusCode.OK
        )
