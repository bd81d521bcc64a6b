"""`synctoken dev`'s files: written whole or not at all, and a file an interrupted run left unusable is remade."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support.constants import SYNCTOKEN
from support.logcapture import LeakWatch
from support.processes import Process, check_config
from synctoken_server.dev import devenv

# Runs its arguments as a command with files limited to 16 bytes: a write beyond fails part-way (EFBIG), as a
# full disk would, without touching this test process. (Python ignores SIGXFSZ, and exec keeps that.)
_SMALL_FILES = """
import os, resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
os.execv(sys.argv[1], sys.argv[1:])
"""

_PAIRS = (
    (devenv.CA_FILE, devenv.CA_KEY),
    (devenv.SERVER_CERT, devenv.SERVER_KEY),
    (devenv.CLIENT_CERT, devenv.CLIENT_KEY),
)


def without_twilio_env() -> dict[str, str]:
    """This process's environment minus any real Twilio credentials."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TWILIO_")}


def dev_with_small_files(directory: Path) -> subprocess.CompletedProcess[str]:
    """`synctoken dev` on `directory`, where no file can grow beyond 16 bytes."""
    return subprocess.run(
        [sys.executable, "-c", _SMALL_FILES, SYNCTOKEN, "dev", "--port", "0", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=without_twilio_env(),
    )


def assert_dev_secret(path: Path) -> None:
    """`path` holds a secret as dev writes it, readable by its owner alone."""
    assert re.fullmatch(rb"[0-9a-f]{32}\n", path.read_bytes())
    assert path.stat().st_mode & 0o777 == 0o600


class TestDevSecret:
    """A secret file an interrupted run left empty or cut short is remade, never used."""

    @pytest.mark.parametrize(
        "left",
        [b"", b"\n", b"0123456789abcdef", b"0123456789abcdef0123456789abcdef", b"\xff\xfe"],
        ids=["empty", "newline", "half", "no-newline", "not-text"],
    )
    def test_remade(self, tmp_path: Path, left: bytes) -> None:
        """prepare replaces what is left with a whole dev secret, says so, and the config it writes loads."""
        devenv.prepare(tmp_path, 50051, environ={})
        (tmp_path / devenv.SECRET_FILE).write_bytes(left)
        env = devenv.prepare(tmp_path, 50051, environ={})
        assert env.secret_remade
        assert_dev_secret(tmp_path / devenv.SECRET_FILE)
        assert check_config(env.config_path, without_twilio_env()).returncode == 0

    def test_whole_one_kept(self, tmp_path: Path) -> None:
        """A whole dev secret is kept from run to run."""
        devenv.prepare(tmp_path, 50051, environ={})
        secret = (tmp_path / devenv.SECRET_FILE).read_bytes()
        env = devenv.prepare(tmp_path, 50051, environ={})
        assert not env.secret_remade
        assert (tmp_path / devenv.SECRET_FILE).read_bytes() == secret

    def test_dev_serves_after_an_empty_secret(
        self, tmp_path: Path, leak_watch: LeakWatch, processes: list[Process]
    ) -> None:
        """`synctoken dev` run on a folder with an empty secret file says it made a new one, and serves."""
        directory = tmp_path / "dev"
        directory.mkdir(mode=0o700)
        (directory / devenv.SECRET_FILE).touch(mode=0o600)
        process = Process(["dev", "--port", "0", "--dir", str(directory)], tmp_path, leak_watch, without_twilio_env())
        processes.append(process)
        said = process.wait_for_stderr("Try:")
        assert f"synctoken dev: {directory / devenv.SECRET_FILE} held no dev secret (empty, or cut short)" in said
        assert_dev_secret(directory / devenv.SECRET_FILE)
        assert process.terminate() == 0


class TestDevPki:
    """A certificate or key an interrupted run left unparseable makes dev remake the whole PKI."""

    @pytest.mark.parametrize("name", [name for pair in _PAIRS for name in pair] + [devenv.CLIENTS_CA_FILE])
    @pytest.mark.parametrize("keep", [0, 40], ids=["empty", "cut-short"])
    def test_remade(self, tmp_path: Path, name: str, keep: int) -> None:
        """Each file empty or cut short: every pair is made again, each key its certificate's."""
        devenv.prepare(tmp_path, 50051, environ={})
        ca = (tmp_path / devenv.CA_FILE).read_bytes()
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[:keep])
        devenv.prepare(tmp_path, 50051, environ={})
        assert (tmp_path / devenv.CA_FILE).read_bytes() != ca
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        for cert_name, key_name in _PAIRS:
            cert = x509.load_pem_x509_certificate((tmp_path / cert_name).read_bytes())
            key = serialization.load_pem_private_key((tmp_path / key_name).read_bytes(), password=None)
            assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
            assert (tmp_path / key_name).stat().st_mode & 0o777 == 0o600
        assert x509.load_pem_x509_certificates((tmp_path / devenv.CLIENTS_CA_FILE).read_bytes())


class TestWholeFiles:
    """A write that fails part-way (a full disk, a kill) leaves no file, and an old file as it was."""

    def test_nothing_left_of_a_failed_start(self, tmp_path: Path) -> None:
        """dev failing to write its first file says which, exits 2, and leaves the folder empty: no partial file."""
        directory = tmp_path / "dev"
        result = dev_with_small_files(directory)
        assert (result.returncode, result.stderr) == (
            2,
            f"synctoken dev: cannot prepare {directory / devenv.CA_FILE}: File too large\n",
        )
        assert list(directory.iterdir()) == []

    def test_no_partial_secret(self, tmp_path: Path) -> None:
        """The secret's write failing part-way leaves no secret file (the next run makes one), and the rest as it was."""
        devenv.prepare(tmp_path, 50051, environ={})
        (tmp_path / devenv.SECRET_FILE).unlink()
        before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
        result = dev_with_small_files(tmp_path)
        assert (result.returncode, result.stderr) == (
            2,
            f"synctoken dev: cannot prepare {tmp_path / devenv.SECRET_FILE}: File too large\n",
        )
        assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
        assert not devenv.prepare(tmp_path, 50051, environ={}).secret_remade
        assert_dev_secret(tmp_path / devenv.SECRET_FILE)

    def test_failed_rewrite_keeps_the_old_config(self, tmp_path: Path) -> None:
        """The config, rewritten on every run, stays whole as it was when its rewrite fails part-way."""
        devenv.prepare(tmp_path, 50051, environ={})
        config = (tmp_path / devenv.CONFIG_FILE).read_bytes()
        inode = (tmp_path / devenv.CONFIG_FILE).stat().st_ino
        result = dev_with_small_files(tmp_path)
        assert (result.returncode, result.stderr) == (
            2,
            f"synctoken dev: cannot prepare {tmp_path / devenv.CONFIG_FILE}: File too large\n",
        )
        assert (tmp_path / devenv.CONFIG_FILE).read_bytes() == config
        assert (tmp_path / devenv.CONFIG_FILE).stat().st_ino == inode
        assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []
