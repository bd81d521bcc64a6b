"""Private audit: identities as keyed hashes in every log line, and `synctoken audit-hash` to find them again."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from support.calls import rpc_error
from support.configs import SECRET_ENV, WriteConfig, config_text
from support.constants import BFF_ID, SYNCTOKEN
from support.inprocess import ServerHarness
from support.logcapture import LeakWatch, LogSink
from support.pki import Pki
from synctoken.v1 import token_service_pb2 as pb
from synctoken_server.audit.privacy import IdentityHasher
from synctoken_server.config.reader import ConfigError
from synctoken_server.config.schema import load_config

KEY = "audit-hmac-key-" + "k" * 40  # distinctive, so a leak is easy to grep for
IDENTITY = "private-alice-3f9"


@pytest.fixture
def key_file(tmp_path: Path, leak_watch: LeakWatch) -> Path:
    """A private key file holding KEY and a newline, as `openssl rand -hex 32 > file` writes one."""
    leak_watch.secrets.add(KEY)
    path = tmp_path / "audit-key"
    path.write_text(KEY + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def private_config(pki: Pki, key_file: Path) -> str:
    """The suite's config with private audit on."""
    return f'[audit]\nidentity_hash_key_file = "{key_file}"\n{config_text(pki)}'


class TestIdentityHasher:
    """The keyed hash itself."""

    def test_shape(self) -> None:
        """h: and 32 hex digits; the same identity and key give the same value, another key another."""
        value = IdentityHasher(KEY.encode())(IDENTITY)
        assert re.fullmatch("h:[0-9a-f]{32}", value)
        assert IdentityHasher(KEY.encode())(IDENTITY) == value
        assert IdentityHasher(b"x" * 32)(IDENTITY) != value

    def test_repr_hides_key(self) -> None:
        """A config printed in a traceback does not show the key."""
        assert KEY not in repr(IdentityHasher(KEY.encode()))


class TestConfig:
    """The [audit] table."""

    def test_trailing_newline_is_not_key(self, pki: Pki, write_config: WriteConfig, key_file: Path) -> None:
        """A key file's final newline is not part of the key."""
        config = load_config(write_config(private_config(pki, key_file)), environ=SECRET_ENV)
        assert config.audit_identity is not None
        assert config.audit_identity(IDENTITY) == IdentityHasher(KEY.encode())(IDENTITY)

    @pytest.mark.parametrize(
        ("table", "message"),
        [
            (
                '[audit]\nidentity_hash_key_file = "short"',
                "audit.identity_hash_key_file: the key in the file it names is 5 bytes; use at least 32",
            ),
            (
                '[audit]\nidentity_hash_key_file = "nope"',
                "audit.identity_hash_key_file: cannot read the file it names: No such file or directory",
            ),
            (
                "[audit]\nidentity_hash_key = 1",
                "audit.identity_hash_key: unknown key; expected one of identity_hash_key_file",
            ),
        ],
    )
    def test_invalid(self, pki: Pki, write_config: WriteConfig, table: str, message: str) -> None:
        """Each defect names the file and the key, and never echoes the key file's name or content."""
        path = write_config(f"{table}\n{config_text(pki)}")
        (path.parent / "short").write_text("12345\n", encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ=SECRET_ENV)
        assert str(caught.value) == f"{path}: {message}"


class TestAuditLog:
    """A real server with private audit on."""

    def test_no_plain_identity_and_audit_hash_finds_it(
        self, harness: ServerHarness, pki: Pki, write_config: WriteConfig, key_file: Path, log_sink: LogSink
    ) -> None:
        """No line names the identity; the decision holds its hash, which audit-hash prints from the config or the key."""
        text = private_config(pki, key_file)
        server = harness.start(text)
        start = len(log_sink.lines)
        response = harness.client(server, "bff").issue(pb.IssueTokenRequest(identity=IDENTITY, sync=pb.SyncGrant()))
        assert response.identity == IDENTITY
        assert not any(IDENTITY in line for line in log_sink.lines[start:])
        [record] = [r for r in log_sink.records(start) if r["event"] == "token.decision"]
        config_path = write_config(text)
        for source in (["--config", str(config_path)], ["--key-file", str(key_file)]):
            done = subprocess.run(
                [SYNCTOKEN, "audit-hash", *source, "--identity", IDENTITY],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            )
            assert done.stdout.strip() == record["identity"]

    def test_identity_limit_names_the_hash(
        self, harness: ServerHarness, pki: Pki, key_file: Path, log_sink: LogSink
    ) -> None:
        """With private audit on, an identity limit's QuotaFailure subject is the same keyed hash as the audit log's."""
        text = private_config(pki, key_file).replace(
            'allowed_identity_characters = "@"',
            'allowed_identity_characters = "@"\nidentity_rate = 0.01\nidentity_burst = 1',
            1,
        )
        client = harness.client(harness.start(text), "bff")
        request = pb.IssueTokenRequest(identity=IDENTITY, sync=pb.SyncGrant())
        client.issue(request)
        start = len(log_sink.lines)
        _, info, _ = rpc_error(lambda: client.issue(request))
        [record] = [r for r in log_sink.records(start) if r["event"] == "token.decision"]
        assert info.metadata["quotaSubject"] == f"identity:{BFF_ID}/{record['identity']}"
        assert IDENTITY not in info.metadata["quotaSubject"]

    def test_audit_hash_without_key(self, pki: Pki, write_config: WriteConfig) -> None:
        """A config without private audit is said to have none, rather than printing a hash nobody logged."""
        path = write_config(config_text(pki))
        done = subprocess.run(
            [SYNCTOKEN, "audit-hash", "--config", str(path), "--identity", IDENTITY],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert done.returncode == 2
        assert (
            done.stderr
            == f"synctoken: {path} has no [audit] identity_hash_key_file: identities are logged as they are\n"
        )
