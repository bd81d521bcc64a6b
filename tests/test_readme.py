"""The README's examples work as written."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from support import SYNCTOKEN, Pki

README = Path(__file__).resolve().parent.parent / "README.md"


def reference_config() -> str:
    """The TOML block under "Config reference"."""
    section = README.read_text(encoding="utf-8").split("### Config reference", 1)[1]
    match = re.search(r"```toml\n(.*?)```", section, re.DOTALL)
    assert match is not None, "no toml block under Config reference"
    return match.group(1)


class TestReferenceConfig:
    """The reference config is a real one."""

    def test_check_config_accepts_it(self, pki: Pki, tmp_path: Path) -> None:
        """With the files it names in place, check-config accepts the reference config as printed."""
        shutil.copy(pki.directory / "server.pem", tmp_path / "server.pem")
        shutil.copy(pki.directory / "server-key.pem", tmp_path / "server-key.pem")
        shutil.copy(pki.directory / "ca.pem", tmp_path / "clients-ca.pem")
        secret = tmp_path / "twilio_api_secret"
        secret.write_text("readme-secret\n", encoding="utf-8")
        secret.chmod(0o600)
        path = tmp_path / "synctoken.toml"
        path.write_text(reference_config(), encoding="utf-8")
        result = subprocess.run(
            [SYNCTOKEN, "check-config", str(path)], capture_output=True, text=True, timeout=30, check=False, env={}
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert "readme-secret" not in result.stdout
