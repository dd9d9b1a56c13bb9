"""`tandem k8s`: manifests valid against the official Kubernetes schemas (strict, offline), Kustomize-ready,
drain-aware, placed by hardware; and one layout gives the same topology in `tandem up`, compose and k8s."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services.cluster.compose import compose_doc
from services.cluster.k8s import HW_LABEL, manifests, write
from services.cluster.launcher import plan
from services.cluster.topology import drain_s
from services.contracts.layout import load_layout, parse_layout
from services.contracts.registry_url import parse_registry

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "local-split.yaml"
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())  # 1.27: native gRPC probes are GA
SPLITWISE = {"name": "splitwise-hh", "pools": [
    {"role": "prefill", "count": 2, "hardware": "dgx-h100", "base_port": 50100},
    {"role": "decode", "count": 3, "hardware": "dgx-a100", "base_port": 50200,
     "batching": {"max_batch": 64, "kv_budget_mb": 4096}},
    {"role": "decode", "count": 1, "hardware": "dgx-h100", "power_cap_w": 7000},
    {"role": "dlm", "count": 1}]}


def k8s_errors(doc: dict) -> list[str]:
    """Strict validation against the schemas kubernetes-validate ships (no cluster, no network)."""
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{version} {doc.get('kind')}/{'.'.join(map(str, exc.path))}: {exc.message}")
    return errors


def load_dir(out: Path) -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(out.glob("*.yaml"))}


@pytest.mark.parametrize("layout", ["local-split", "splitwise", "default"])
def test_manifests_pass_strict_schema_validation(layout: str, tmp_path: Path) -> None:
    lay = {"local-split": load_layout(EXAMPLE), "splitwise": parse_layout(SPLITWISE),
           "default": parse_layout({})}[layout]
    write(lay, tmp_path)
    files = load_dir(tmp_path)
    kustomization = files.pop("kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(files)  # every object file is listed, nothing else
    for name, doc in files.items():
        assert k8s_errors(doc) == [], name


def test_a_broken_manifest_fails_validation() -> None:
    docs = manifests(load_layout(EXAMPLE))
    dep = docs["decode-deployment.yaml"]
    assert k8s_errors(dep) == []
    broken = yaml.safe_load(yaml.safe_dump(dep))
    broken["spec"]["replicas"] = "two"
    assert k8s_errors(broken)
    typo = yaml.safe_load(yaml.safe_dump(dep))
    probe = typo["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["grcp"] = probe.pop("grpc")  # an unknown field: only strict validation catches it
    assert k8s_errors(typo)
    kubernetes_validate.validate(typo, K8S_VERSIONS[-1], strict=False)  # passes without --strict
    svc = yaml.safe_load(yaml.safe_dump(docs["decode-service.yaml"]))
    del svc["spec"]["ports"][0]["port"]  # required
    assert k8s_errors(svc)


def test_workers_have_grpc_probes_drain_and_pdb() -> None:
    lay = load_layout(EXAMPLE)
    docs = manifests(lay)
    for pool, port in (("prefill", 50100), ("decode", 50200)):
        pod = docs[f"{pool}-deployment.yaml"]["spec"]["template"]["spec"]
        c = pod["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port}
        svc = docs[f"{pool}-service.yaml"]["spec"]
        assert svc["clusterIP"] == "None" and svc["ports"][0]["appProtocol"] == "grpc"
        pre = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
        assert pod["terminationGracePeriodSeconds"] > pre + drain_s(lay)
        assert "--advertise" in c["args"] and "$(POD_IP):" + str(port) in c["args"]
        assert "nodeSelector" not in pod  # an all-CPU layout schedules anywhere
        assert docs[f"{pool}-pdb.yaml"]["spec"]["selector"]["matchLabels"] == \
            docs[f"{pool}-deployment.yaml"]["spec"]["selector"]["matchLabels"]
    gw = docs["gateway-deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert gw["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert "--worker" not in gw["args"]  # LLM workers register in Redis
    layout_in_pod = yaml.safe_load(docs["layout-configmap.yaml"]["data"]["layout.yaml"])
    assert layout_in_pod["registry"] == "redis://tandem-redis:6379/0" and "redis-deployment.yaml" in docs


@pytest.mark.parametrize("registry, url, service", [
    ("memory", "redis://tandem-redis:6379/0", "tandem-redis"),  # in-process cannot span pods: our own Redis
    ("redis://redis:6380/1?ttl_s=2", "redis://redis:6380/1?ttl_s=2", "redis"),  # a bare name: ours, as in compose
    ("redis://redis.infra.svc:6379/0", "redis://redis.infra.svc:6379/0", None),  # anything else: external
])
def test_registry_in_the_cluster(registry: str, url: str, service: str | None) -> None:
    docs = manifests(parse_layout({"registry": registry}))
    assert yaml.safe_load(docs["layout-configmap.yaml"]["data"]["layout.yaml"])["registry"] == url
    if service is None:
        assert "redis-service.yaml" not in docs and "redis-deployment.yaml" not in docs
    else:
        svc = docs["redis-service.yaml"]
        assert svc["metadata"]["name"] == service and svc["spec"]["ports"][0]["port"] == parse_registry(url).port
        assert k8s_errors(svc) == [] and k8s_errors(docs["redis-deployment.yaml"]) == []


def test_heterogeneous_pools_are_placed_by_hardware() -> None:
    docs = manifests(parse_layout(SPLITWISE), redis_url="redis://redis.shared:6379/3")
    assert "redis-deployment.yaml" not in docs  # an external Redis
    assert yaml.safe_load(docs["layout-configmap.yaml"]["data"]["layout.yaml"])["registry"] == \
        "redis://redis.shared:6379/3"
    placed = {}
    for name in ("prefill", "decode-dgx-a100", "decode-dgx-h100", "dlm"):
        dep = docs[f"{name}-deployment.yaml"]
        pod = dep["spec"]["template"]["spec"]
        placed[name] = (dep["spec"]["replicas"], pod["nodeSelector"][HW_LABEL])
        assert {"key": HW_LABEL, "operator": "Equal", "value": pod["nodeSelector"][HW_LABEL],
                "effect": "NoSchedule"} in pod["tolerations"]
    assert placed == {"prefill": (2, "dgx-h100"), "decode-dgx-a100": (3, "dgx-a100"),
                      "decode-dgx-h100": (1, "dgx-h100"), "dlm": (1, "cpu")}
    a100 = docs["decode-dgx-a100-deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert a100["resources"] == {"requests": {"cpu": "1", "memory": f"{1024 + 4096}Mi"},
                                 "limits": {"nvidia.com/gpu": 1}}
    assert a100["image"] == "tandem-gpu:latest"
    assert docs["decode-dgx-h100-deployment.yaml"]["metadata"]["annotations"]["tandem.dev/power-cap-w"] == "7000"
    gw = docs["gateway-deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert gw["args"][-2:] == ["--worker", "dlm=tandem-dlm:50400"]


def _topology_up(lay) -> dict:
    out: dict = {}
    for s in plan(lay, "layout.yaml"):
        if s.name != "gateway":
            role = s.name.rsplit("-", 1)[0]
            out.setdefault(role, []).append(int(s.grpc.rsplit(":", 1)[1]))
    return {role: (len(ports), min(ports)) for role, ports in out.items()}


def _topology_compose(doc: dict) -> dict:
    out: dict = {}
    for name, svc in doc["services"].items():
        if name != "gateway":
            out.setdefault(name.rsplit("-", 1)[0], []).append(int(svc["expose"][0]))
    return {role: (len(ports), min(ports)) for role, ports in out.items()}


def _topology_k8s(docs: dict) -> dict:
    out: dict = {}
    for doc in docs.values():
        comp = doc["metadata"]["labels"]["app.kubernetes.io/component"]
        if doc["kind"] == "Deployment" and comp not in ("gateway", "registry"):
            port = doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
            n, first = out.get(comp, (0, port))
            out[comp] = (n + doc["spec"]["replicas"], min(first, port))
    return out


@pytest.mark.parametrize("layout", ["local-split", "splitwise", "default"])
def test_one_layout_one_topology_in_up_compose_and_k8s(layout: str) -> None:
    lay = {"local-split": load_layout(EXAMPLE), "splitwise": parse_layout(SPLITWISE),
           "default": parse_layout({})}[layout]
    up, comp, k8s = _topology_up(lay), _topology_compose(compose_doc(lay)), _topology_k8s(manifests(lay))
    assert up == comp == k8s
    # the gateway: same front-door ports everywhere
    gw_up = next(s for s in plan(lay, None) if s.name == "gateway").argv
    gw_compose = compose_doc(lay)["services"]["gateway"]["ports"]
    gw_k8s = manifests(lay)["gateway-service.yaml"]["spec"]["ports"]
    ports = {int(gw_up[gw_up.index(flag) + 1].rsplit(":", 1)[1]) for flag in ("--http", "--grpc")}
    assert ports == {int(p.rsplit(":", 1)[1]) for p in gw_compose} == {p["port"] for p in gw_k8s}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
def test_kustomize_builds_the_directory(tmp_path: Path) -> None:
    write(load_layout(EXAMPLE), tmp_path, namespace="tandem")
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    objs = list(yaml.safe_load_all(out.stdout))
    assert len(objs) == len(list(tmp_path.glob("*.yaml"))) - 1
    assert all(o["metadata"].get("namespace") == "tandem" for o in objs)
    assert all(o["metadata"]["labels"]["tandem.dev/layout"] == "local-split" for o in objs)
