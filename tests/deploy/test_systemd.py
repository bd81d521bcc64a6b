"""deploy/systemd: the unit passes systemd-analyze, is hardened, and agrees with the config it runs.

`systemd-analyze verify` also checks that ExecStart's command exists: the
unit is verified with it pointed at this venv's synctoken.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from support.constants import ROOT, SYNCTOKEN
from support.pki import Pki
from synctoken_server.config.schema import Config, load_config

SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "synctoken.service"
INSTALLED_AT = "/opt/synctoken/bin/synctoken"
CREDENTIALS = "/run/credentials/synctoken.service/"
ANALYZE = "/usr/bin/systemd-analyze"
"""Installed by the Makefile (Debian's systemd package), as the other tools the tests run."""


def service_settings() -> dict[str, list[str]]:
    """The [Service] section's settings, each key with every value it is given (LoadCredential= repeats)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    """systemd-analyze with `args`."""
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False)


def runnable_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit (or `text`) with ExecStart pointed at this venv's synctoken, under the unit's own name."""
    path = tmp_path / "synctoken.service"
    path.write_text((text or UNIT.read_text(encoding="utf-8")).replace(INSTALLED_AT, SYNCTOKEN), encoding="utf-8")
    return path


class TestAnalyze:
    """systemd's own checks."""

    def test_verify_is_clean(self, tmp_path: Path) -> None:
        """`systemd-analyze verify` accepts the unit without a single complaint."""
        result = analyze("verify", str(runnable_copy(tmp_path)))
        assert (result.returncode, result.stdout + result.stderr) == (0, "")

    def test_verify_catches_a_misspelt_key(self, tmp_path: Path) -> None:
        """The check above could fail: a misspelt hardening key is reported."""
        text = UNIT.read_text(encoding="utf-8").replace("ProtectSystem=", "ProtectSystm=")
        result = analyze("verify", str(runnable_copy(tmp_path, text)))
        assert "Unknown key 'ProtectSystm'" in result.stdout + result.stderr

    def test_exposure_is_low(self, tmp_path: Path) -> None:
        """`systemd-analyze security` rates the unit's exposure 2.0 or lower (of 10)."""
        result = analyze("security", "--offline=yes", str(runnable_copy(tmp_path)))
        match = re.search(r"Overall exposure level for synctoken\.service: ([0-9.]+)", result.stdout)
        assert match is not None, result.stdout + result.stderr
        assert float(match[1]) <= 2.0


@pytest.fixture(scope="module")
def unit_config(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """deploy/systemd/synctoken.toml, loaded by synctoken's loader with its files in place under a temporary root."""
    root = tmp_path_factory.mktemp("host")
    text = (SYSTEMD / "synctoken.toml").read_text(encoding="utf-8")
    text = text.replace("/etc/synctoken/", f"{root}/etc/synctoken/").replace(CREDENTIALS, f"{root}{CREDENTIALS}")
    tls = root / "etc" / "synctoken" / "tls"
    tls.mkdir(parents=True)
    for source, target in (("server.pem", "tls.crt"), ("server-key.pem", "tls.key"), ("ca.pem", "ca.crt")):
        shutil.copy(pki.directory / source, tls / target)
    credentials = Path(f"{root}{CREDENTIALS}")
    credentials.mkdir(parents=True)
    for name in ("twilio-api-secret", "audit-hmac-key"):
        (credentials / name).write_text("k" * 64 + "\n", encoding="utf-8")
        (credentials / name).chmod(0o600)
    path = root / "etc" / "synctoken" / "synctoken.toml"
    path.write_text(text, encoding="utf-8")
    config = load_config(path, environ={})
    assert config.warnings == ()
    return config


class TestUnit:
    """What the unit says, against the config it runs."""

    def test_hardening(self) -> None:
        """No new privileges, a read-only system, no capabilities, a dedicated user, the open-file limit raised."""
        settings = service_settings()
        expected = {
            "NoNewPrivileges": ["yes"],
            "ProtectSystem": ["strict"],
            "ProtectHome": ["yes"],
            "PrivateTmp": ["yes"],
            "CapabilityBoundingSet": [""],
            "User": ["synctoken"],
            "Type": ["simple"],
            "KillSignal": ["SIGTERM"],
        }
        assert {key: settings.get(key) for key in expected} == expected
        assert int(settings["LimitNOFILE"][0]) >= 65536
        assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
        assert settings["ExecStart"] == [f"{INSTALLED_AT} serve --config /etc/synctoken/synctoken.toml"]
        assert not [v for v in settings.get("Environment", []) if "SECRET" in v.upper()]

    def test_stop_timeout_covers_the_drain(self, unit_config: Config) -> None:
        """systemd waits out drain_delay and grace (with a margin) before it kills the process."""
        timeouts = unit_config.timeouts
        assert int(service_settings()["TimeoutStopSec"][0]) >= timeouts.drain_delay + timeouts.grace + 5

    def test_secrets_are_credentials(self, unit_config: Config) -> None:
        """Each secret file the config reads is a credential the unit loads, and every credential is read."""
        loaded = {value.partition(":")[0] for value in service_settings()["LoadCredential"]}
        read = {path.name for path, _ in unit_config.files if CREDENTIALS in str(path)}
        assert read == loaded == {"twilio-api-secret", "audit-hmac-key"}
