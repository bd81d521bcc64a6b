"""deploy/kubernetes: every kustomization renders, validates strictly offline, and holds to the config it mounts.

Rendered with kubectl's built-in kustomize and validated with
kubernetes-validate against the oldest and newest Kubernetes versions
supported; then the objects are read and checked against synctoken's own
config loader's reading of the ConfigMap they mount (with the TOML fragment
of each component an overlay uses appended, as the README says to).
The components' own additions are tested in test_kubernetes_components.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.constants import ROOT
from support.kubernetes import (
    KUBERNETES,
    NEWEST,
    OLDEST,
    OPERATOR_KINDS,
    Obj,
    in_pod,
    pod_config,
    rendered,
    rendered_text,
    the,
    unlabelled,
    unvalidated_kinds,
    validate,
)
from support.pki import Pki
from synctoken_server.config.schema import Config
from synctoken_server.serveroptions import split_listen

KUSTOMIZATIONS = [
    "base",
    "overlays/csi-driver-spiffe",
    "overlays/spiffe-helper",
    "overlays/prometheus-operator",
    "overlays/redis-limits",
    "overlays/otlp-tracing",
]
PEAK_RSS_MIB = max(
    figures["server_peak_rss_mib"]
    for figures in json.loads((ROOT / "bench" / "results" / "results.json").read_text(encoding="utf-8"))["summary"][
        "synctoken"
    ].values()
)
"""The committed benchmark's peak RSS for one synctoken process, at any concurrency (the README's sizing)."""


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_and_validates(kustomization: str, version: str, tmp_path: Path) -> None:
    """Each kustomization renders, and every object of a built-in kind passes strict validation."""
    path = tmp_path / "rendered.yaml"
    path.write_text(rendered_text(kustomization), encoding="utf-8")
    result = validate(path, version)
    assert result.returncode == 0, result.stdout + result.stderr
    assert unvalidated_kinds(result) <= OPERATOR_KINDS


def test_validation_is_strict(tmp_path: Path) -> None:
    """The validator refuses a field Kubernetes does not have: a misspelt key cannot pass."""
    text = rendered_text("base").replace("readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true")
    path = tmp_path / "misspelt.yaml"
    path.write_text(text, encoding="utf-8")
    assert validate(path, NEWEST).returncode != 0


@pytest.fixture(scope="module")
def mounted_configs(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Config]:
    """Each kustomization's config (its ConfigMap and its components' fragments), loaded by synctoken's own loader."""
    return {k: pod_config(KUBERNETES / k, tmp_path_factory.mktemp("pod"), pki) for k in KUSTOMIZATIONS}


@pytest.fixture(scope="module")
def mounted_config(mounted_configs: dict[str, Config]) -> Config:
    """The base ConfigMap's synctoken.toml, loaded with its /etc/synctoken files in place."""
    return mounted_configs["base"]


def pod_specs() -> Iterator[tuple[str, Obj]]:
    """Each kustomization's Deployment pod spec."""
    for kustomization in KUSTOMIZATIONS:
        yield kustomization, the(rendered(kustomization), "Deployment")["spec"]["template"]["spec"]


def containers(pod: Obj) -> list[Obj]:
    """Every container of the pod, init containers and sidecars included."""
    return [*pod.get("initContainers", []), *pod["containers"]]


def port_of(listen: str | None) -> int:
    """The port of a configured listen address."""
    assert listen is not None
    address = split_listen(listen)
    assert address is not None
    return address[1]


class TestPodSecurity:
    """Every rendered pod runs locked down."""

    @pytest.mark.parametrize(("kustomization", "pod"), list(pod_specs()), ids=KUSTOMIZATIONS)
    def test_security_settings(self, kustomization: str, pod: Obj) -> None:
        """Non-root, seccomp RuntimeDefault, no service-account token; each container read-only with nothing extra."""
        assert pod["automountServiceAccountToken"] is False
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] != 0
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not {"hostNetwork", "hostPID", "hostIPC"} & {k for k, v in pod.items() if v}
        assert not [v for v in pod["volumes"] if "hostPath" in v]
        for container in containers(pod):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
            assert not context.get("privileged")
            # Secrets are files, never environment variables.
            assert not [e for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
            assert not [e for e in container.get("envFrom", []) if "secretRef" in e]
            assert {"limits", "requests"} <= container["resources"].keys()
        if kustomization == "base":
            assert the(rendered("base"), "ServiceAccount")["automountServiceAccountToken"] is False


class TestAgainstTheConfig:
    """Ports, probes, grace period and mounts agree with the config the ConfigMap holds."""

    def test_ports_and_probes(self, mounted_config: Config) -> None:
        """The container ports are the config's listeners; both probes are gRPC on the [health] port."""
        pod = the(rendered("base"), "Deployment")["spec"]["template"]
        [synctoken] = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in synctoken["ports"]}
        assert ports == {
            "grpc": port_of(mounted_config.listen),
            "health": port_of(mounted_config.health_listen),
            "metrics": port_of(mounted_config.metrics_listen),
        }
        for probe in (synctoken["readinessProbe"], synctoken["livenessProbe"]):
            assert probe["grpc"]["port"] == ports["health"]
        assert synctoken["readinessProbe"]["grpc"]["service"] == "synctoken.v1.TokenService"
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])

    def test_grace_period_covers_the_drain(self, mounted_config: Config) -> None:
        """The kubelet waits out drain_delay and grace (with a margin) before it kills the process."""
        pod = the(rendered("base"), "Deployment")["spec"]["template"]["spec"]
        timeouts = mounted_config.timeouts
        assert pod["terminationGracePeriodSeconds"] >= timeouts.drain_delay + timeouts.grace + 5

    @pytest.mark.parametrize(("kustomization", "pod"), list(pod_specs()), ids=KUSTOMIZATIONS)
    def test_every_file_is_mounted(self, mounted_configs: dict[str, Config], kustomization: str, pod: Obj) -> None:
        """The config is a directory mount (subPath would never update); every file it names is under a mount."""
        mounted_config = mounted_configs[kustomization]
        [synctoken] = pod["containers"]
        mounts = {m["mountPath"]: m for m in synctoken["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        config_path = synctoken["args"][synctoken["args"].index("--config") + 1]
        assert str(Path(config_path).parent) in mounts
        assert not [m for m in synctoken["volumeMounts"] if "subPath" in m]
        for path, _ in mounted_config.files:
            mount = mounts[str(Path(in_pod(mounted_config, path)).parent)]
            assert mount["readOnly"] is True
            volume = volumes[mount["name"]]
            assert {"configMap", "secret", "csi", "emptyDir"} & volume.keys(), volume
        assert volumes[mounts["/etc/synctoken/config"]["name"]]["configMap"]["name"] == "synctoken-config"
        assert the(rendered(kustomization), "ConfigMap", "synctoken-config")["metadata"]["name"] == "synctoken-config"

    def test_memory_fits_the_measured_peak(self) -> None:
        """The memory request and limit are above the benchmark's peak RSS."""
        [synctoken] = the(rendered("base"), "Deployment")["spec"]["template"]["spec"]["containers"]
        mebibytes = {k: int(v["memory"].removesuffix("Mi")) for k, v in synctoken["resources"].items()}
        assert mebibytes["requests"] > PEAK_RSS_MIB
        assert mebibytes["limits"] >= 2 * PEAK_RSS_MIB


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_is_labelled(kustomization: str) -> None:
    """Every object, the components' and overlays' own included, carries app.kubernetes.io/name: synctoken."""
    objects = rendered(kustomization)
    assert objects
    assert unlabelled(objects) == []


class TestAvailability:
    """Replicas, spread, disruption budget, autoscaling, Services and the NetworkPolicy select the same pods."""

    def test_spread_budget_and_scaling(self) -> None:
        """3 replicas spread over zones and nodes; the PDB and HPA cover the same pods and never go below 3."""
        objects = rendered("base")
        deployment = the(objects, "Deployment")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["replicas"] == 3
        keys = {c["topologyKey"] for c in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        pdb = the(objects, "PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        hpa = the(objects, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert hpa["spec"]["minReplicas"] >= 3
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]

    def test_services_and_network_policy(self) -> None:
        """Both Services reach the pods' gRPC port (one headless); the policy admits the gRPC and metrics ports only."""
        objects = rendered("base")
        pod = the(objects, "Deployment")["spec"]["template"]
        labels = pod["metadata"]["labels"]
        service, headless = the(objects, "Service"), the(objects, "Service", "synctoken-headless")
        for s in (service, headless):
            assert s["spec"]["selector"].items() <= labels.items()
            assert [p["targetPort"] for p in s["spec"]["ports"]] == ["grpc"]
        assert headless["spec"]["clusterIP"] == "None"
        policy = the(objects, "NetworkPolicy")
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        admitted = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert admitted == {"grpc", "metrics"}
        assert policy["spec"]["egress"] == []
        assert {"Ingress", "Egress"} == set(policy["spec"]["policyTypes"])

    @pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
    def test_network_policy_peers_are_as_written(self, kustomization: str) -> None:
        """The policy admits callers and Prometheus by their own labels: no transformer added synctoken's to them."""
        policy = the(rendered(kustomization), "NetworkPolicy")
        peers = {rule["ports"][0]["port"]: rule["from"] for rule in policy["spec"]["ingress"]}
        assert peers == {
            "grpc": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"synctoken.io/caller": "true"}}}],
            "metrics": [
                {
                    "namespaceSelector": {"matchLabels": {"synctoken.io/monitoring": "true"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                }
            ],
        }
        assert policy["spec"]["egress"] == []


class TestPrometheus:
    """The PodMonitor scrapes the metrics port; every alert reads a metric that exists."""

    def test_pod_monitor_and_rules(self) -> None:
        """The PodMonitor's port is a container port; each synctoken_* series an alert names is one synctoken exports."""
        objects = rendered("overlays/prometheus-operator")
        [synctoken] = the(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
        monitor = the(objects, "PodMonitor")
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= {p["name"] for p in synctoken["ports"]}
        exported = _exported_metrics()
        rules = [r for g in the(objects, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
        alerts = {r["alert"] for r in rules}
        assert {"SynctokenCertificateExpiringSoon", "SynctokenConfigReloadFailing", "SynctokenNotServing"} <= alerts
        for rule in rules:
            for series in re.findall(r"\bsynctoken_[a-z_]+", rule["expr"]):
                assert series in exported, f"{rule['alert']}: {series} is no synctoken metric"


def _exported_metrics() -> set[str]:
    """The series names a synctoken server with metrics on exports (counters as their _total)."""
    from synctoken_server.metrics import Metrics  # noqa: PLC0415 - loads prometheus-client, as metrics do

    registry = Metrics(enabled=True).registry
    assert registry is not None
    return {sample for family in registry.collect() for sample in {family.name, f"{family.name}_total"}}
