"""The TLS files' checks, and the certificate watcher gRPC asks before each new connection (in process)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest

from support.files import replace_file
from support.logcapture import LogSink
from support.pki import Pki
from synctoken_server.config import tlsfiles
from synctoken_server.config.tlsfiles import ServerTlsFiles, ServerTlsMaterial, TlsFileError
from synctoken_server.dev.pki import CertificateAuthority, KeyPair, LeafSpec
from synctoken_server.filestamps import restamp
from synctoken_server.process.certificates import ServerCertificates

NOW = dt.datetime.now(dt.UTC)


def server_pair(ca: CertificateAuthority, *, days: float = 30, started_days_ago: float = 1) -> KeyPair:
    """A localhost server certificate from `ca`, valid from `started_days_ago` for `days`."""
    start = NOW - dt.timedelta(days=started_days_ago)
    end = start + dt.timedelta(days=days)
    return ca.issue(LeafSpec("localhost", dns_names=("localhost",), server=True, not_before=start, not_after=end))


def serial(pair: KeyPair) -> str:
    """The serial number of the pair's certificate, as the watcher logs it."""
    return tlsfiles.check(FILES, (), pair.cert_pem, pair.key_pem, pair.cert_pem, now=NOW).serial


FILES = ServerTlsFiles(Path("cert.pem"), Path("key.pem"), Path("ca.pem"))


def check(cert: bytes, key: bytes, ca: bytes) -> ServerTlsMaterial:
    """tlsfiles.check on contents alone."""
    return tlsfiles.check(FILES, (), cert, key, ca, now=NOW)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    """A CA for this module's certificates."""
    return CertificateAuthority("check CA")


class TestCheck:
    """A set of TLS file contents is used only whole and sound; the error names the file at fault."""

    def test_good_set(self, ca: CertificateAuthority) -> None:
        """A matching pair and a two-CA bundle (mid CA rotation) pass, and are described."""
        pair = server_pair(ca)
        other = CertificateAuthority("next CA")
        material = check(pair.cert_pem, pair.key_pem, ca.cert_pem + other.cert_pem)
        assert material.client_cas == 2
        assert material.not_after - NOW > dt.timedelta(days=28)
        assert int(material.serial, 16) > 0

    def test_chain_file_may_hold_the_key(self, ca: CertificateAuthority) -> None:
        """A chain file that also holds the key is fine: only certificate blocks are counted."""
        pair = server_pair(ca)
        assert check(pair.key_pem + pair.cert_pem, pair.key_pem, ca.cert_pem).client_cas == 1

    @pytest.mark.parametrize(
        ("defect", "key", "problem"),
        [
            ("key of another certificate", "tls.key_file", "does not match the first certificate in tls.cert_file"),
            ("key cut short", "tls.key_file", "is not an unencrypted PEM private key"),
            ("empty certificate file", "tls.cert_file", "is not a PEM certificate"),
            (
                "certificate file cut short",
                "tls.cert_file",
                "holds a PEM block that does not parse (a file caught half-written?)",
            ),
            (
                "CA bundle cut short after the first CA",
                "tls.client_ca_file",
                "holds a PEM block that does not parse (a file caught half-written?)",
            ),
            ("CA bundle is not PEM", "tls.client_ca_file", "is not a PEM certificate"),
        ],
    )
    def test_refused(self, ca: CertificateAuthority, defect: str, key: str, problem: str) -> None:
        """Each defect is refused with the file's config key and the reason."""
        pair, other = server_pair(ca), server_pair(ca)
        bundle = ca.cert_pem + CertificateAuthority("next CA").cert_pem
        cert, private, cas = {
            "key of another certificate": (pair.cert_pem, other.key_pem, ca.cert_pem),
            "key cut short": (pair.cert_pem, pair.key_pem[:100], ca.cert_pem),
            "empty certificate file": (b"", pair.key_pem, ca.cert_pem),
            "certificate file cut short": (pair.cert_pem + ca.cert_pem[:200], pair.key_pem, ca.cert_pem),
            "CA bundle cut short after the first CA": (pair.cert_pem, pair.key_pem, bundle[: len(bundle) - 300]),
            "CA bundle is not PEM": (pair.cert_pem, pair.key_pem, b"hello"),
        }[defect]
        with pytest.raises(TlsFileError) as caught:
            check(cert, private, cas)
        assert (caught.value.key, caught.value.problem) == (key, problem)

    @pytest.mark.parametrize(
        ("days", "started_days_ago", "problem"),
        [(1, 2, "expired at "), (10, -1, "is not valid until ")],
    )
    def test_outside_validity(
        self, ca: CertificateAuthority, days: float, started_days_ago: float, problem: str
    ) -> None:
        """An expired or not yet valid certificate is refused, with the date that makes it so."""
        pair = server_pair(ca, days=days, started_days_ago=started_days_ago)
        with pytest.raises(TlsFileError) as caught:
            check(pair.cert_pem, pair.key_pem, ca.cert_pem)
        assert caught.value.key == "tls.cert_file"
        assert caught.value.problem.startswith(problem)
        assert caught.value.problem.endswith("Z")


Install = Callable[[KeyPair], None]


class TestServerCertificates:
    """The watcher: re-reads only files that changed, hands gRPC only checked sets, logs what it did."""

    @pytest.fixture
    def files(self, pki: Pki, tmp_path: Path) -> ServerTlsFiles:
        """The suite's server pair and CA, copied where a test may replace them."""
        files = ServerTlsFiles(tmp_path / "server.pem", tmp_path / "server-key.pem", tmp_path / "ca.pem")
        pki.server.write(files.cert, files.key)
        files.client_ca.write_bytes(pki.ca.cert_pem)
        return files

    @pytest.fixture
    def install(self, files: ServerTlsFiles) -> Install:
        """Replace the key, then the certificate, each whole."""

        def install(pair: KeyPair) -> None:
            replace_file(files.key, pair.key_pem)
            replace_file(files.cert, pair.cert_pem)

        return install

    def watcher(self, files: ServerTlsFiles, expiry_warning: int | None = None) -> ServerCertificates:
        """A watcher started on the files as they are."""
        stamps = restamp(files.paths())
        return ServerCertificates(tlsfiles.read(files, stamps, NOW), expiry_warning)

    def test_unchanged_files_keep_the_configuration(self, files: ServerTlsFiles) -> None:
        """With nothing changed, gRPC is told to keep what it has."""
        certificates = self.watcher(files)
        assert [certificates._fetch() for _ in range(3)] == [None, None, None]

    def test_new_pair_is_handed_over_once(
        self, pki: Pki, files: ServerTlsFiles, install: Install, log_sink: LogSink
    ) -> None:
        """After a swap, the next fetch returns the new set, later ones None; the reload is logged."""
        certificates = self.watcher(files)
        pair = server_pair(pki.ca)
        start = len(log_sink.lines)
        install(pair)
        assert certificates._fetch() is not None
        assert certificates._fetch() is None
        assert certificates.current.serial == serial(pair)
        [reloaded] = [r for r in log_sink.records(start) if r["event"] == "tls.reloaded"]
        assert reloaded["serial"] == serial(pair)
        assert reloaded["client_cas"] == 1

    def test_bad_set_is_kept_out_until_the_files_change(
        self, pki: Pki, files: ServerTlsFiles, log_sink: LogSink
    ) -> None:
        """A mismatched pair is logged once, never handed over, and retried only when a file changes again."""
        certificates = self.watcher(files)
        before = certificates.current.serial
        pair = server_pair(pki.ca)
        start = len(log_sink.lines)
        replace_file(files.cert, pair.cert_pem)  # the key has not arrived yet
        assert [certificates._fetch() for _ in range(3)] == [None, None, None]
        failures = [r for r in log_sink.records(start) if r["event"] == "tls.reload_failed"]
        assert [(r["key"], r["reason"]) for r in failures] == [
            ("tls.key_file", "does not match the first certificate in tls.cert_file")
        ]
        assert certificates.current.serial == before
        replace_file(files.key, pair.key_pem)
        assert certificates._fetch() is not None
        assert certificates.current.serial == serial(pair)

    def test_same_contents_are_not_a_reload(self, files: ServerTlsFiles, log_sink: LogSink) -> None:
        """Files rewritten with the same bytes (a touch, a re-sync) are no new set."""
        certificates = self.watcher(files)
        start = len(log_sink.lines)
        replace_file(files.cert, files.cert.read_bytes())
        assert certificates._fetch() is None
        assert [r["event"] for r in log_sink.records(start)] == []

    @pytest.mark.parametrize(
        ("days_left", "expiry_warning", "warned"),
        [
            (29, None, False),  # more than a third of its 30 days left
            (9, None, True),  # less than a third left
            (29, 30 * 24 * 3600, True),  # the margin is 30 days
            (9, 3600, False),  # the margin is an hour
        ],
    )
    def test_expiry_warning(
        self,
        ca: CertificateAuthority,
        files: ServerTlsFiles,
        log_sink: LogSink,
        days_left: float,
        expiry_warning: int | None,
        warned: bool,
    ) -> None:
        """At start, the expiry is logged, with a warning inside the margin (by default a third of the lifetime)."""
        server_pair(ca, days=30, started_days_ago=30 - days_left).write(files.cert, files.key)
        certificates = self.watcher(files, expiry_warning)
        start = len(log_sink.lines)
        certificates.announce()
        records = log_sink.records(start)
        assert [r["event"] for r in records] == ["tls.loaded"] + (["tls.expiring_soon"] if warned else [])
        assert records[0]["not_after"] == certificates.current.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        certificates.check_expiry()
        assert len(log_sink.records(start)) == len(records), "warned once, not on every check"

    def test_config_naming_other_files(
        self, pki: Pki, files: ServerTlsFiles, tmp_path: Path, log_sink: LogSink
    ) -> None:
        """A reloaded config that names other TLS files switches to the set it loaded, and watches those files."""
        certificates = self.watcher(files)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        moved = ServerTlsFiles(elsewhere / "server.pem", elsewhere / "server-key.pem", elsewhere / "ca.pem")
        pair = server_pair(pki.ca)
        pair.write(moved.cert, moved.key)
        moved.client_ca.write_bytes(pki.ca.cert_pem)
        start = len(log_sink.lines)
        certificates.use(tlsfiles.read(moved, restamp(moved.paths()), NOW), expiry_warning=None)
        assert certificates._fetch() is not None
        assert certificates.current.serial == serial(pair)
        assert [r["event"] for r in log_sink.records(start)] == ["tls.reloaded"]
        newer = server_pair(pki.ca)
        replace_file(moved.key, newer.key_pem)
        replace_file(moved.cert, newer.cert_pem)
        assert certificates._fetch() is not None
        assert certificates.current.serial == serial(newer)
