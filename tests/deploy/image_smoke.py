"""The container image, run: one mTLS call served from it, probes on its plaintext health port, a drain on stop.

Not collected by `make test` (no test_ prefix): building the image takes
minutes. `make image-test` builds it and runs this with the same podman
settings (PODMAN, PODMAN_ULIMIT and IMAGE from the Makefile). The container
runs as the image's numeric user with a read-only root file system, every
capability dropped and no new privileges, as the Kubernetes manifests run it;
the config, certificates and secrets are mounted read-only.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.calls import ALICE, channel
from support.configs import config_text
from support.constants import API_SECRET
from support.logcapture import LeakWatch
from support.pki import Pki
from support.probes import probe
from support.processes import free_port
from synctoken.v1 import token_service_pb2_grpc

PODMAN = shlex.split(os.environ.get("PODMAN", "podman --storage-driver vfs --runtime runc"))
ULIMIT = shlex.split(os.environ.get("PODMAN_ULIMIT", "--ulimit nofile=16384:16384 --ulimit nproc=4096:4096"))
IMAGE = os.environ.get("IMAGE", "synctoken:0.1.0")
IMAGE_UID = 65532
START_TIMEOUT = 60


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run podman with the Makefile's settings."""
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def mounted(pki: Pki, tmp_path: Path) -> Path:
    """/etc/synctoken as the pod has it: config, TLS files and the API secret, readable by the image's user only."""
    root = tmp_path / "etc-synctoken"
    for folder in ("config", "tls", "twilio"):
        (root / folder).mkdir(parents=True)
    for source, target in (("server.pem", "tls/tls.crt"), ("server-key.pem", "tls/tls.key"), ("ca.pem", "tls/ca.crt")):
        shutil.copy(pki.directory / source, root / target)
    (root / "twilio" / "api-secret").write_text(API_SECRET + "\n", encoding="utf-8")
    return root


def write_config(root: Path, pki: Pki, port: int, health_port: int) -> None:
    """The suite's policy on fixed ports, its files at the pod's paths, a short drain; owned by the image's user."""
    text = config_text(pki, listen=f"127.0.0.1:{port}")
    for source, target in (("server.pem", "tls.crt"), ("server-key.pem", "tls.key"), ("ca.pem", "ca.crt")):
        text = text.replace(str(pki.directory / source), f"/etc/synctoken/tls/{target}")
    text = text.replace(
        f'listen = "127.0.0.1:{port}"', f'listen = "127.0.0.1:{port}"\ndrain_delay = "3s"\ngrace = "2s"'
    )
    text = text.replace('api_key = "', 'api_secret_file = "/etc/synctoken/twilio/api-secret"\napi_key = "')
    text += f'\n[health]\nlisten = "127.0.0.1:{health_port}"\n'
    (root / "config" / "synctoken.toml").write_text(text, encoding="utf-8")
    for path in [root, *root.rglob("*")]:
        os.chown(path, IMAGE_UID, IMAGE_UID)
        path.chmod(0o700 if path.is_dir() else 0o600)


@pytest.fixture
def container(leak_watch: LeakWatch, tmp_path: Path) -> Iterator[str]:
    """A name for the test's container; removed, and its log kept for the leak check, afterwards."""
    name = f"synctoken-smoke-{uuid.uuid4().hex[:8]}"
    yield name
    log = tmp_path / "container.log"
    result = podman("logs", name)
    log.write_text(result.stdout + result.stderr, encoding="utf-8")
    leak_watch.log_files.append(log)
    podman("rm", "--force", name)


def test_serves_mtls_and_drains_on_stop(pki: Pki, mounted: Path, container: str, leak_watch: LeakWatch) -> None:
    """From the image: health SERVING, one IssueToken over mTLS, then `podman stop` flips health and drains."""
    assert podman("image", "exists", IMAGE).returncode == 0, f"no image {IMAGE}: run `make image`"
    port, health_port = free_port(), free_port()
    write_config(mounted, pki, port, health_port)
    run = podman(
        "run", "--detach", "--name", container, *ULIMIT,
        "--network", "host", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--volume", f"{mounted}:/etc/synctoken:ro",
        IMAGE,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    deadline = time.monotonic() + START_TIMEOUT
    while probe(health_port, timeout=1) != "SERVING":
        assert time.monotonic() < deadline, podman("logs", container).stdout
        time.sleep(0.2)
    assert probe(health_port, "synctoken.v1.TokenService") == "SERVING"
    with channel(pki, port) as ch:
        response = token_service_pb2_grpc.TokenServiceStub(ch).IssueToken(ALICE, timeout=10)
    leak_watch.tokens.add(response.token)
    assert response.identity == "alice"

    stopped: list[subprocess.CompletedProcess[str]] = []
    stopping = threading.Thread(target=lambda: stopped.append(podman("stop", "--time", "30", container)))
    signalled = time.monotonic()
    stopping.start()
    while probe(health_port, timeout=1) == "SERVING":
        assert time.monotonic() - signalled < 3, "health did not flip within the drain"
    flipped = time.monotonic() - signalled
    assert probe(health_port) == "NOT_SERVING"
    with channel(pki, port) as ch:  # still served during the drain
        leak_watch.tokens.add(token_service_pb2_grpc.TokenServiceStub(ch).IssueToken(ALICE, timeout=10).token)
    stopping.join(timeout=60)
    took = time.monotonic() - signalled
    assert [r.returncode for r in stopped] == [0], stopped
    assert podman("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip() == "0"
    events = [line for line in podman("logs", container).stdout.splitlines() if '"server.' in line]
    assert ['"server.started"' in events[0], '"SIGTERM"' in events[1], '"server.stopped"' in events[-1]] == [True] * 3
    # Stopped by the drain (3 s) and not by podman's kill after 30 s.
    assert 3 <= took < 20, took
    print(f"health flipped {flipped * 1000:.0f} ms after podman stop; the container exited after {took:.1f} s")  # noqa: T201
