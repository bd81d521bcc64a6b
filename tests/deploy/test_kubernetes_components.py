"""deploy/kubernetes/components: redis-limits and otlp-tracing open exactly what their config needs, and combine.

Each component adds a NetworkPolicy of its own (policies add up, so the
base's, without egress, is untouched) and what the pod needs; its TOML
fragment, appended to the base's config, is loaded by synctoken's own loader
and checked against what the component mounts and opens.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

import yaml

from support.kubernetes import (
    KUBERNETES,
    NEWEST,
    OPERATOR_KINDS,
    Obj,
    in_pod,
    load_pod_config,
    objects_of,
    pod_config,
    render,
    rendered,
    synctoken_container,
    the,
    unlabelled,
    unvalidated_kinds,
    validate,
)
from support.pki import Pki

SYNCTOKEN_PODS = {"matchLabels": {"app.kubernetes.io/name": "synctoken"}}
CLUSTER_DNS: Obj = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ],
    "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
}
OPENSHIFT_DNS: Obj = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "openshift-dns"}},
            "podSelector": {"matchLabels": {"dns.operator.openshift.io/daemonset-dns": "default"}},
        }
    ],
    "ports": [{"port": 5353, "protocol": "UDP"}, {"port": 5353, "protocol": "TCP"}],
}
DNS_PORTS = {(53, "UDP"), (53, "TCP"), (5353, "UDP"), (5353, "TCP")}
"""CoreDNS's pods answer on 53, OpenShift's on 5353: both rules are there by default."""
REDIS: Obj = {
    "to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "redis"}}}],
    "ports": [{"port": 6379, "protocol": "TCP"}],
}
COLLECTOR: Obj = {
    "to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "opentelemetry-collector"}}}],
    "ports": [{"port": 4317, "protocol": "TCP"}],
}
REDIS_MOUNT = "/etc/synctoken/redis"
LIMITS_TOML = KUBERNETES / "components" / "redis-limits" / "limits.toml"


def egress_policy(objects: list[Obj], name: str) -> Obj:
    """The component's NetworkPolicy: for synctoken's pods, egress only; the base's still has no egress."""
    base = the(objects, "NetworkPolicy")
    assert base["spec"]["egress"] == []
    policy = the(objects, "NetworkPolicy", name)
    assert policy["spec"]["podSelector"] == SYNCTOKEN_PODS
    assert policy["spec"]["policyTypes"] == ["Egress"]
    assert "ingress" not in policy["spec"]
    return policy


def opened(objects: list[Obj]) -> set[tuple[int, str]]:
    """Every (port, protocol) any NetworkPolicy lets synctoken's pods reach."""
    return {
        (port["port"], port["protocol"])
        for policy in objects
        if policy["kind"] == "NetworkPolicy"
        for rule in policy["spec"].get("egress", [])
        for port in rule["ports"]
    }


def mounts_of(objects: list[Obj]) -> dict[str, Obj]:
    """The synctoken container's volume mounts, by path."""
    return {m["mountPath"]: m for m in synctoken_container(objects)["volumeMounts"]}


def volumes_of(objects: list[Obj]) -> dict[str, Obj]:
    """The pod's volumes, by name."""
    return {v["name"]: v for v in the(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}


class TestRedisLimits:
    """components/redis-limits: the Redis password mounted, egress to Redis and DNS only, limits.toml agreeing."""

    def test_egress_is_redis_and_dns_only(self) -> None:
        """The component's policy opens Redis's port on Redis's pods and cluster DNS, and nothing else anywhere."""
        objects = rendered("overlays/redis-limits")
        assert egress_policy(objects, "synctoken-redis")["spec"]["egress"] == [REDIS, CLUSTER_DNS, OPENSHIFT_DNS]
        assert opened(objects) == {(6379, "TCP")} | DNS_PORTS

    def test_secret_is_a_read_only_directory(self) -> None:
        """The Secret synctoken-redis is mounted read-only as a directory (every key, so ca.crt too), never subPath."""
        objects = rendered("overlays/redis-limits")
        mount = mounts_of(objects)[REDIS_MOUNT]
        assert mount == {"name": "redis", "mountPath": REDIS_MOUNT, "readOnly": True}
        assert volumes_of(objects)["redis"] == {
            "name": "redis",
            "secret": {"secretName": "synctoken-redis", "defaultMode": 0o440},
        }

    def test_limits_toml_agrees_with_the_manifests(self, pki: Pki, tmp_path: Path) -> None:
        """Appended to the base config it loads cleanly: Redis at the opened port, password mounted, HPA's minimum replicas."""
        objects = rendered("overlays/redis-limits")
        config = pod_config(KUBERNETES / "overlays/redis-limits", tmp_path, pki)
        redis = config.limits_backend
        assert redis is not None
        assert redis.password_file is not None
        assert redis.tls is False
        assert [(redis.port, "TCP")] == [(p["port"], p["protocol"]) for p in REDIS["ports"]]
        assert Path(in_pod(config, redis.password_file)).parent == Path(REDIS_MOUNT)
        hpa = the(objects, "HorizontalPodAutoscaler")
        assert config.limits_replicas == hpa["spec"]["minReplicas"] == the(objects, "Deployment")["spec"]["replicas"]

    def test_tls_lines_work_as_commented(self, pki: Pki, tmp_path: Path) -> None:
        """With rediss:// and the commented ca_file line taken in, the CA is read from the same mounted Secret."""
        objects = rendered("overlays/redis-limits")
        fragment = LIMITS_TOML.read_text(encoding="utf-8")
        assert fragment.count('url = "redis://') == 1
        assert fragment.count("# ca_file = ") == 1
        fragment = fragment.replace('url = "redis://', 'url = "rediss://').replace("# ca_file = ", "ca_file = ")
        text = the(objects, "ConfigMap", "synctoken-config")["data"]["synctoken.toml"] + fragment
        config = load_pod_config(text, objects, tmp_path, pki)
        redis = config.limits_backend
        assert redis is not None
        assert redis.tls is True
        assert redis.ca_file is not None
        assert Path(in_pod(config, redis.ca_file)).parent == Path(REDIS_MOUNT)


class TestOtlpTracing:
    """components/otlp-tracing: the OTEL_* environment, egress to the collector and DNS only, tracing.toml on."""

    def test_egress_is_collector_and_dns_only(self) -> None:
        """The component's policy opens OTLP/gRPC's port on the collector's pods and cluster DNS, and nothing else."""
        objects = rendered("overlays/otlp-tracing")
        assert egress_policy(objects, "synctoken-otlp")["spec"]["egress"] == [COLLECTOR, CLUSTER_DNS, OPENSHIFT_DNS]
        assert opened(objects) == {(4317, "TCP")} | DNS_PORTS

    def test_tracing_reaches_the_opened_port(self, pki: Pki, tmp_path: Path) -> None:
        """With the container's environment the config exports over OTLP/gRPC, to the port the policy opens."""
        objects = rendered("overlays/otlp-tracing")
        config = pod_config(KUBERNETES / "overlays/otlp-tracing", tmp_path, pki)
        assert config.tracing_protocol == "grpc"
        env = {e["name"]: e["value"] for e in synctoken_container(objects)["env"]}
        endpoint = urllib.parse.urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.scheme == "http"
        assert endpoint.hostname
        assert [(endpoint.port, "TCP")] == [(p["port"], p["protocol"]) for p in COLLECTOR["ports"]]
        assert env["MALLOC_ARENA_MAX"] == "1", "the base's environment is kept"
        assert 0 < float(env["OTEL_TRACES_SAMPLER_ARG"]) <= 1


def test_components_combine(pki: Pki, tmp_path: Path) -> None:
    """Both components and prometheus-operator on the spiffe-helper overlay: valid, each policy whole, both fragments load."""
    directory = tmp_path / "overlay"
    directory.mkdir()
    up = Path(os.path.relpath(KUBERNETES, directory))  # kustomize refuses absolute paths
    components = ["redis-limits", "otlp-tracing", "prometheus-operator"]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(up / "overlays" / "spiffe-helper")],
        "components": [str(up / "components" / c) for c in components],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    text = render(directory)
    (tmp_path / "rendered.yaml").write_text(text, encoding="utf-8")
    result = validate(tmp_path / "rendered.yaml", NEWEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert unvalidated_kinds(result) <= OPERATOR_KINDS
    objects = objects_of(text)
    assert egress_policy(objects, "synctoken-redis")["spec"]["egress"] == [REDIS, CLUSTER_DNS, OPENSHIFT_DNS]
    assert egress_policy(objects, "synctoken-otlp")["spec"]["egress"] == [COLLECTOR, CLUSTER_DNS, OPENSHIFT_DNS]
    assert opened(objects) == {(6379, "TCP"), (4317, "TCP")} | DNS_PORTS
    assert unlabelled(objects) == []
    assert {"/etc/synctoken/tls", REDIS_MOUNT} <= mounts_of(objects).keys()
    assert "emptyDir" in volumes_of(objects)["tls"], "the spiffe-helper overlay's volume is kept"
    config = pod_config(directory, tmp_path / "pod", pki)
    assert config.limits_backend is not None
    assert config.tracing_protocol == "grpc"
    mounts = mounts_of(objects)
    for path, _ in config.files:
        assert mounts[str(Path(in_pod(config, path)).parent)]["readOnly"] is True
