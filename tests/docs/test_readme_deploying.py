"""The README's "Deploying": its render-and-validate line works as printed, and its sizing agrees with the manifests."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from support.constants import ROOT
from support.readme import blocks, section

VENV_BIN = f"{Path(sys.executable).parent}/"


def test_render_and_validate_line() -> None:
    """The Kubernetes section's command renders the overlay and validates it, from the repository's root."""
    [script] = blocks(section("### Kubernetes"), "sh")
    assert "kubernetes-validate --strict" in script
    result = subprocess.run(
        [shutil.which("bash") or "/bin/bash", "-euo", "pipefail", "-c", script.replace(".venv/bin/", VENV_BIN)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed for resource deployment/synctoken against version 1.30" in result.stdout + result.stderr


def test_sizing_table_follows_the_manifests() -> None:
    """Each row's replicas are what the HPA's CPU target on the base's request gives at the quoted CPU per token."""
    text = section("### Kubernetes")
    per_token_ms = float(re.search(r"uses ([0-9.]+) ms of CPU per\s+token with 16 calls", text)[1])  # type: ignore[index]
    objects = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/base/deployment.yaml").read_text(encoding="utf-8")))
    [container] = objects[0]["spec"]["template"]["spec"]["containers"]
    request_millicores = int(container["resources"]["requests"]["cpu"].removesuffix("m"))
    hpa = yaml.safe_load((ROOT / "deploy/kubernetes/base/horizontalpodautoscaler.yaml").read_text(encoding="utf-8"))
    target = hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] / 100
    per_pod = request_millicores * target / per_token_ms
    assert f"about {round(per_pod, -1):.0f} tokens/s per pod" in " ".join(text.split())
    rows = re.findall(r"^\| (?:up to )?([0-9,]+) \| ([0-9]+) ", text, re.MULTILINE)
    assert len(rows) == 3
    for tokens, replicas in rows:
        needed = max(hpa["spec"]["minReplicas"], math.ceil(int(tokens.replace(",", "")) / per_pod))
        assert int(replicas) == min(needed, hpa["spec"]["maxReplicas"])


def test_every_kustomization_is_in_the_table() -> None:
    """Each overlay and component under deploy/kubernetes has a row in the Kubernetes section's table of paths."""
    text = section("### Kubernetes")
    # The first cell's directories: `base/`, `overlays/x/`, `components/x/` (paths in the pod start with /).
    first_cells = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| `")]
    rows = {m for cell in first_cells for m in re.findall(r"`([a-z-]+/(?:[a-z-]+/)?)`", cell)}
    kubernetes = ROOT / "deploy" / "kubernetes"
    directories = {f"{p.parent.relative_to(kubernetes)}/" for p in kubernetes.glob("*/**/kustomization.yaml")}
    assert "components/redis-limits/" in directories
    assert directories == rows
