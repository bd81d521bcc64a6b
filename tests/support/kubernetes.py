"""deploy/kubernetes as the tests read it: kustomizations rendered by kubectl, their objects, and the config a pod runs.

A pod's config is the ConfigMap's synctoken.toml with the TOML fragment of
each component the kustomization uses appended, as the README tells users to
do (kustomize cannot merge TOML), loaded by synctoken's own loader with the
files it names placed where the pod would have them and the synctoken
container's environment as its environment.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from support.constants import ROOT
from support.pki import Pki
from synctoken_server.config.schema import Config, load_config

KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBECTL = str(Path(sys.executable).parent / "kubectl")
VALIDATE = str(Path(sys.executable).parent / "kubernetes-validate")
OLDEST, NEWEST = "1.30.0", "1.37.0"
"""The Kubernetes versions supported: 1.30 is the oldest whose native sidecars (spiffe-helper) are on by default."""
OPERATOR_KINDS = {"PodMonitor", "PrometheusRule"}
"""The Prometheus Operator's kinds: no schema ships for them, so tests check them by hand."""
IN_POD = "/etc/synctoken/"
"""Where the pod's config and every file it names live."""
_PKI_FILES = (("server.pem", "tls/tls.crt"), ("server-key.pem", "tls/tls.key"), ("ca.pem", "tls/ca.crt"))
_SECRET_FILES = ("twilio/api-secret", "audit/identity-hash-key", "redis/password")
"""The Secrets' keys, as the base and the components mount them (redis/ca.crt is the CA's copy)."""

Obj = dict[str, Any]


def render(directory: Path) -> str:
    """`kubectl kustomize` of the kustomization in `directory`, as YAML text."""
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    """kubernetes-validate --strict on the file, for one Kubernetes version."""
    return subprocess.run(
        [VALIDATE, "--strict", "--quiet", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def unvalidated_kinds(result: subprocess.CompletedProcess[str]) -> set[str]:
    """The kinds a validation found no schema for: only the operator's may be among them, any other is a typo."""
    return set(re.findall(r"Couldn't find schema for kind (\w+)", result.stdout + result.stderr))


@cache
def rendered_text(kustomization: str) -> str:
    """`kubectl kustomize` of one kustomization under deploy/kubernetes, as YAML text."""
    return render(KUBERNETES / kustomization)


def objects_of(text: str) -> list[Obj]:
    """The objects in rendered YAML."""
    return [o for o in yaml.safe_load_all(text) if o]


def rendered(kustomization: str) -> list[Obj]:
    """The objects one kustomization under deploy/kubernetes renders to."""
    return objects_of(rendered_text(kustomization))


def unlabelled(objects: list[Obj]) -> list[str]:
    """Kind/name of each object without the label app.kubernetes.io/name: synctoken, which every one carries."""
    return [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in objects
        if (o["metadata"].get("labels") or {}).get("app.kubernetes.io/name") != "synctoken"
    ]


def the(objects: list[Obj], kind: str, name: str = "synctoken") -> Obj:
    """The one object of `kind` named `name`."""
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def synctoken_container(objects: list[Obj]) -> Obj:
    """The Deployment's synctoken container."""
    containers: list[Obj] = the(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    [container] = containers
    assert container["name"] == "synctoken"
    return container


def fragments(directory: Path) -> list[Path]:
    """The TOML fragments of the components the kustomization in `directory` names, in its order."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    return [f for c in kustomization.get("components", []) for f in sorted((directory / c).resolve().glob("*.toml"))]


def pod_config(directory: Path, root: Path, pki: Pki) -> Config:
    """The config the pods of the kustomization in `directory` run, loaded with their files under `root`."""
    objects = objects_of(render(directory))
    text = the(objects, "ConfigMap", "synctoken-config")["data"]["synctoken.toml"]
    text += "".join(f.read_text(encoding="utf-8") for f in fragments(directory))
    return load_pod_config(text, objects, root, pki)


def load_pod_config(text: str, objects: list[Obj], root: Path, pki: Pki) -> Config:
    """`text` as the pods of `objects` would load it: files under `root`, the container's environment; no warnings."""
    for source, target in (*_PKI_FILES, ("ca.pem", "redis/ca.crt")):
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pki.directory / source, root / target)
    for target in _SECRET_FILES:
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        (root / target).write_text("k" * 64 + "\n", encoding="utf-8")
        (root / target).chmod(0o600)
    path = root / "config" / "synctoken.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text.replace(IN_POD, f"{root}/"), encoding="utf-8")
    environ = {e["name"]: e["value"] for e in synctoken_container(objects).get("env", []) if "value" in e}
    config = load_config(path, environ=environ)
    assert config.warnings == ()
    return config


def in_pod(config: Config, path: Path) -> str:
    """Where a file the loaded `config` names is in the pod."""
    root = next(p for p, _ in config.files if p.name == "synctoken.toml").parent.parent
    return IN_POD + str(path.relative_to(root))
