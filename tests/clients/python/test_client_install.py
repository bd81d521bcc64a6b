"""The client package installs alone: a fresh venv, `pip install ./clients/python`, nothing of the server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from support.constants import BFF_ID, ROOT
from support.inprocess import RunningServer
from support.pki import Pki

CLIENT_PACKAGE = ROOT / "clients" / "python"
# What `pip install ./clients/python` may bring: its own dependencies and theirs (cffi and pycparser: cryptography's).
ALLOWED = {
    "synctoken-api",
    "grpcio",
    "protobuf",
    "googleapis-common-protos",
    "cryptography",
    "cffi",
    "pycparser",
    "typing-extensions",
    "pip",
    "setuptools",
}
SERVER_ONLY = ["synctoken_server", "twilio", "structlog", "spiffe", "orjson", "grpc_status"]

_PROBE = """
import importlib.metadata, importlib.util, json, sys
import synctoken.client
names = sorted({d.metadata["Name"].lower().replace("_", "-") for d in importlib.metadata.distributions()})
present = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None]
licence = [str(f) for f in importlib.metadata.distribution("synctoken-api").files if f.name == "LICENSE"]
try:
    synctoken.client.TokenClient.from_spiffe("localhost:1", endpoint_socket="unix:///nowhere")
except synctoken.client.MissingExtraError as exc:
    extra = str(exc)
print(json.dumps({"names": names, "server_only_present": present, "exports": synctoken.client.__all__, "licence": licence, "extra": extra}))
"""


def locked_versions(path: Path) -> str:
    """uv.lock's registry packages as pip constraints: the fresh venv gets what CI tested, not today's newest."""
    packages = tomllib.loads((ROOT / "uv.lock").read_text(encoding="utf-8"))["package"]
    lines = [f"{p['name']}=={p['version']}" for p in packages if "registry" in p.get("source", {})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.slow
class TestFreshVenv:
    """A microservice's view: only the client's dependencies, and it works."""

    def test_installs_imports_and_calls(self, tmp_path: Path, pki: Pki, shared_server: RunningServer) -> None:
        """pip installs the package with its dependencies only; synctoken.client imports; the CLI calls the server.

        Without the spiffe extra, from_spiffe raises MissingExtraError naming it."""
        # A copy, so that the build's egg-info and build/ folders land in tmp, not in the work tree.
        source = shutil.copytree(
            CLIENT_PACKAGE, tmp_path / "src", ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__")
        )
        venv = tmp_path / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        install = subprocess.run(
            [
                *(venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check"),
                *("--constraint", locked_versions(tmp_path / "constraints.txt"), str(source)),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert install.returncode == 0, install.stderr
        probe = subprocess.run(
            [venv / "bin" / "python", "-c", _PROBE, *SERVER_ONLY],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        found = json.loads(probe.stdout)
        assert set(found["names"]) <= ALLOWED
        assert found["server_only_present"] == []
        assert "TokenClient" in found["exports"]
        assert len(found["licence"]) == 1, "the wheel carries its LICENSE"
        # Without the [spiffe] extra, the Workload API constructor says which extra to install.
        assert found["extra"].endswith("pip install 'synctoken-api[spiffe]'")
        cert_file, key_file = pki.files("bff")
        whoami = subprocess.run(
            [
                venv / "bin" / "synctoken-client",
                *("--target", f"localhost:{shared_server.port}", "--ca", str(pki.directory / "ca.pem")),
                *("--cert", str(cert_file), "--key", str(key_file), "whoami"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert whoami.returncode == 0, whoami.stderr
        assert json.loads(whoami.stdout)["caller_id"] == BFF_ID
