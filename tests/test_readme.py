"""The README's examples work as written: the reference config, the Python client's examples, its CLI walk-through."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import BFF_ID, SYNCTOKEN, LeakWatch, Pki, RunningServer

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
        audit_key = tmp_path / "audit-hmac-key"
        audit_key.write_text("readme-audit-key-" + "a" * 32 + "\n", encoding="utf-8")
        audit_key.chmod(0o600)
        path = tmp_path / "synctoken.toml"
        path.write_text(reference_config(), encoding="utf-8")
        result = subprocess.run(
            [SYNCTOKEN, "check-config", str(path)], capture_output=True, text=True, timeout=30, check=False, env={}
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert "readme-secret" not in result.stdout
        assert "readme-audit-key" not in result.stdout


def section(title: str) -> str:
    """The README's text under the heading `title`, up to the next heading of its level or higher."""
    lines = README.read_text(encoding="utf-8").splitlines(keepends=True)
    level = len(title.split(" ", 1)[0])
    found, fenced = [], False
    for line in lines[lines.index(f"{title}\n") + 1 :]:
        fenced ^= line.startswith("```")  # a "# comment" inside a code block is no heading
        if not fenced and re.match(rf"#{{1,{level}}} ", line):
            break
        found.append(line)
    return "".join(found)


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of `language` in `text`."""
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


@pytest.fixture
def dev_like(pki: Pki, tmp_path: Path) -> Path:
    """A folder laid out like .synctoken-dev/, holding the suite's CA and bff's certificate and key."""
    folder = tmp_path / "dev"
    folder.mkdir()
    cert, key = pki.files("bff")
    shutil.copy(pki.directory / "ca.pem", folder / "ca.pem")
    shutil.copy(cert, folder / "client.pem")
    shutil.copy(key, folder / "client-key.pem")
    return folder


class TestPythonClient:
    """The client examples run as printed, against a real server, with the walk-through's variables."""

    def test_python_examples(self, dev_like: Path, shared_server: RunningServer) -> None:
        """Each Python block under "Calling synctoken from Python" runs and prints what its comments say."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCTOKEN_")} | {
            "SYNCTOKEN_TARGET": f"localhost:{shared_server.port}",
            "SYNCTOKEN_CA_FILE": str(dev_like / "ca.pem"),
            "SYNCTOKEN_CERT_FILE": str(dev_like / "client.pem"),
            "SYNCTOKEN_KEY_FILE": str(dev_like / "client-key.pem"),
        }
        outputs = []
        for code in blocks(section("## Calling synctoken from Python"), "python"):
            result = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False, env=env
            )
            assert result.returncode == 0, result.stderr
            outputs.append(result.stdout)
        assert len(outputs) == 2
        assert "SERVICE_NOT_ALLOWED {'callerId': 'spiffe://example.org/ns/web/sa/bff'" in outputs[0]
        assert outputs[1] == f"{BFF_ID}\n1\n"

    def test_cli_walk_through(
        self, dev_like: Path, shared_server: RunningServer, leak_watch: LeakWatch, tmp_path: Path
    ) -> None:
        """The synctoken-client commands work as typed, with our port, files and venv."""
        [script] = blocks(section("### synctoken-client walk-through"), "sh")
        script = (
            script.replace("localhost:50051", f"localhost:{shared_server.port}")
            .replace(".synctoken-dev/", f"{dev_like}/")
            .replace(".venv/bin/", f"{Path(sys.executable).parent}/")
        )
        result = subprocess.run(
            [shutil.which("bash") or "/bin/bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        leak_watch.tokens.update(str(p["token"]) for p in printed if p.get("token"))
        assert [sorted(p) for p in printed] == [
            ["caller_id", "policy"],
            ["expires_at", "identity", "issued_at", "refresh_after", "token", "token_id"],
            ["expires_at", "identity", "issued_at", "refresh_after"],  # --validate-only: nothing signed
        ]
        assert result.stdout.endswith("exit 1\n")
        assert json.loads(result.stderr)["field_violations"][0]["field"] == "identity"


class TestBffExample:
    """The BFF example under "Serving tokens to browsers" builds an app that serves the plugged-in user."""

    def test_authenticate_example(self, dev_like: Path, shared_server: RunningServer) -> None:
        """The printed create_app call, driven by Starlette's TestClient, mints for the header's user."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCTOKEN_", "BFF_"))} | {
            "SYNCTOKEN_TARGET": f"localhost:{shared_server.port}",
            "SYNCTOKEN_CA_FILE": str(dev_like / "ca.pem"),
            "SYNCTOKEN_CERT_FILE": str(dev_like / "client.pem"),
            "SYNCTOKEN_KEY_FILE": str(dev_like / "client-key.pem"),
        }
        [code] = blocks(section("## Serving tokens to browsers"), "python")
        drive = (
            "\nfrom starlette.testclient import TestClient\n"
            "with TestClient(app) as http:\n"
            "    for user in ('alice', None):\n"
            "        r = http.get('/token', headers={'x-authenticated-user': user} if user else {})\n"
            "        print(r.status_code, r.json().get('identity'))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code + drive], capture_output=True, text=True, timeout=60, check=False, env=env
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "200 alice\n401 None\n"
