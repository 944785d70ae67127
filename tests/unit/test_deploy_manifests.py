"""deploy/kubernetes, offline: each overlay rendered as kustomize would (base resources plus
the overlay's, the overlay's namespace on every namespaced object; the kustomizations use
nothing else, which is checked), every document validated against the Kubernetes schemas of
a pinned version (kubernetes-validate, strict: no unknown fields), the workloads' shape
checked (probes on /healthz, non-root, the config mounted where the image reads it), and the
mirror configuration in each ConfigMap loaded by the mirror's own loader (mirror.config),
the regional template rendered as its init container renders it. Where kubectl is on PATH,
`kubectl kustomize` must give the same objects.

Not tested here: anything on a real cluster (scheduling, DNS of the headless Service,
probes answered, containerd on a node reading the hosts.toml).
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from mirror.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("edge", "regional")
KUBERNETES_VERSION = "1.30.0"
CLUSTER_SCOPED = {"Namespace"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "namespace"}

Doc = dict[str, Any]


def _load_all(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def render(directory: Path) -> list[Doc]:
    """kustomize build, for the subset these kustomizations use."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: the renderer does not handle {sorted(unknown)}"
    docs: list[Doc] = []
    for entry in kust.get("resources", []):
        target = (directory / entry).resolve()
        docs += render(target) if target.is_dir() else _load_all(target)
    namespace = kust.get("namespace")
    if namespace:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d.setdefault("metadata", {})["namespace"] = namespace
    return docs


def _key(d: Doc) -> tuple[str, str, str]:
    return (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])


def _by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _workload(docs: list[Doc]) -> Doc:
    (workload,) = [d for d in docs if d["kind"] in ("DaemonSet", "StatefulSet", "Deployment")]
    return workload


def _pod_spec(docs: list[Doc]) -> Doc:
    spec: Doc = _workload(docs)["spec"]["template"]["spec"]
    return spec


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    name: str = request.param
    return name, render(DEPLOY / "overlays" / name)


def test_every_document_validates(overlay: tuple[str, list[Doc]]) -> None:
    _name, docs = overlay
    assert len({_key(d) for d in docs}) == len(docs), "duplicate objects"
    for d in docs:
        kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_broken_document(overlay: tuple[str, list[Doc]]) -> None:
    """The validation above can fail: an unknown field and a wrong type are refused."""
    _name, docs = overlay
    workload = _workload(docs)
    bad = yaml.safe_load(yaml.safe_dump(workload))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(workload))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_the_workload_runs_the_image_as_built(overlay: tuple[str, list[Doc]]) -> None:
    _name, docs = overlay
    spec = _pod_spec(docs)
    (container,) = spec["containers"]
    assert container["args"] == ["serve", "--config", "/etc/mirror/mirror.toml"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["ports"][0] == {"name": "http", "containerPort": 5000, "protocol": "TCP"}
    security = {**spec.get("securityContext", {}), **container["securityContext"]}
    assert security["runAsNonRoot"] is True
    assert security.get("runAsUser", 10001) == 10001  # the image's user
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert {"/etc/mirror", "/var/cache/mirror", "/tmp"} <= set(mounts)
    assert container["resources"]["requests"]["memory"]
    # terminationGracePeriodSeconds covers [server] shutdown_timeout (30 s) and more.
    assert spec["terminationGracePeriodSeconds"] > 30
    # The Services select the workload's pods and name its port.
    labels = _workload(docs)["spec"]["template"]["metadata"]["labels"]
    for svc in _by_kind(docs, "Service"):
        assert svc["spec"]["selector"].items() <= labels.items()
        assert svc["spec"]["ports"][0]["targetPort"] == "http"


def _mirror_toml(docs: list[Doc]) -> str:
    cm = next(d for d in _by_kind(docs, "ConfigMap") if d["metadata"]["name"]
              == "registry-mirror-config")
    data: dict[str, str] = cm["data"]
    return data.get("mirror.toml") or data["mirror.toml.template"]


def test_edge_config_loads_and_the_hosts_toml_points_at_it(tmp_path: Path) -> None:
    docs = render(DEPLOY / "overlays" / "edge")
    path = tmp_path / "mirror.toml"
    path.write_text(_mirror_toml(docs))
    config = load_config(path)
    assert config.cache.dir == Path("/var/cache/mirror")
    (up,) = config.upstreams
    assert up.name == "docker.io"
    assert up.url.startswith("http://registry-mirror.registry-mirror-regional.svc")
    assert up.fallback_urls == ("https://registry-1.docker.io",)
    spec = _pod_spec(docs)
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    hosts = next(d for d in _by_kind(docs, "ConfigMap") if "hosts.toml" in d["data"])
    parsed = tomllib.loads(hosts["data"]["hosts.toml"])
    assert parsed["server"] == "https://registry-1.docker.io"
    port = config.server.port
    assert parsed["host"] == {f"http://127.0.0.1:{port}": {"capabilities": ["pull", "resolve"]}}


def test_regional_config_as_the_init_container_renders_it(tmp_path: Path) -> None:
    docs = render(DEPLOY / "overlays" / "regional")
    template = _mirror_toml(docs)
    # The Secret's files where the config names them (/etc/mirror/secrets/ in the pod).
    (secret,) = _by_kind(docs, "Secret")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, value in secret["stringData"].items():
        (secrets / name).write_text(value)
    spec = _pod_spec(docs)
    (init,) = spec["initContainers"]
    script = init["command"][-1]
    assert "@POD_NAME@/$POD_NAME" in script and "@POD_IP@/$POD_IP" in script
    rendered = subprocess.run(
        ["sh", "-c", script.replace("/etc/mirror-template/mirror.toml.template", "-")
         .replace("/etc/mirror/mirror.toml", "/dev/stdout")],
        input=template, capture_output=True, text=True, check=True,
        env={"PATH": "/usr/bin:/bin", "POD_NAME": "registry-mirror-1", "POD_IP": "10.1.2.3"},
    ).stdout
    assert "@" not in rendered
    path = tmp_path / "mirror.toml"
    path.write_text(rendered.replace("/etc/mirror/secrets/", f"{secrets}/"))
    config = load_config(path)
    cluster = config.cluster
    assert cluster is not None
    assert cluster.node_id == "registry-mirror-1"
    assert cluster.advertise_url == "http://10.1.2.3:5000"
    # The peer list is the headless Service's DNS name, in the overlay's namespace.
    (peers_svc,) = [s for s in _by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    meta = peers_svc["metadata"]
    assert cluster.peers_dns == f"{meta['name']}.{meta['namespace']}.svc.cluster.local"
    assert peers_svc["spec"]["publishNotReadyAddresses"] is True
    (sts,) = _by_kind(docs, "StatefulSet")
    assert sts["spec"]["serviceName"] == meta["name"]
    # The mounts: the rendered config and the Secret where the config reads them.
    (container,) = spec["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/etc/mirror/secrets"]]["secret"]["secretName"] == \
        secret["metadata"]["name"]
    assert "emptyDir" in volumes[mounts["/etc/mirror"]]
    (pdb,) = _by_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= \
        sts["spec"]["template"]["metadata"]["labels"].items()
    (up,) = config.upstreams
    assert up.password == secret["stringData"]["dockerhub.password"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("name", OVERLAYS)
def test_kubectl_kustomize_agrees(name: str) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "overlays" / name)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    theirs = {_key(d): d for d in yaml.safe_load_all(out) if d}
    ours = {_key(d): d for d in render(DEPLOY / "overlays" / name)}
    assert theirs == ours
