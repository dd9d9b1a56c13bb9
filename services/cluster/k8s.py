"""`tandem k8s`: a layout's cluster as Kustomize-ready Kubernetes manifests (one file per object).

One Deployment + headless Service + PodDisruptionBudget per pool, the gateway behind a Service, the layout as a
ConfigMap, and a Redis the workers register in (or the layout's own redis:// URL). Pools on other hardware
than CPUs get a nodeSelector and toleration on `tandem.dev/hardware` (Splitwise: prefill and decode on
different machine types). Workers advertise their pod IP; the gateway finds them through the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from services.cluster.compose import REDIS_IMAGE, dump_yaml, redis_service_name
from services.cluster.topology import (
    PRESTOP_S,
    PoolSpec,
    drain_s,
    heterogeneous,
    pools,
    port_of,
    slug,
    stop_grace_s,
)
from services.contracts.layout import Layout
from services.contracts.registry_url import parse_registry
from services.contracts.roles import DIFFUSION_ROLES

IMAGE = "tandem:latest"  # CPU pools (the repo's Dockerfile)
GPU_IMAGE = "tandem-gpu:latest"  # GPU pools (the Dockerfile's CUDA variant, docs/deploy.md)
REDIS_PORT = 6379
HW_LABEL = "tandem.dev/hardware"
LAYOUT_DIR = "/etc/tandem"
LAYOUT_FILE = f"{LAYOUT_DIR}/layout.yaml"
GATEWAY_HTTP, GATEWAY_GRPC = 8000, 50051
Doc = dict[str, Any]


def _meta(name: str, component: str, extra: dict[str, str] | None = None) -> Doc:
    return {"name": name, "labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component,
                                     "app.kubernetes.io/part-of": "tandem", **(extra or {})}}


def _selector(name: str) -> Doc:
    return {"app.kubernetes.io/name": name}


def _grpc_probes(port: int) -> Doc:
    """Native gRPC probes on grpc.health.v1 (workers report SERVING only once the model is loaded)."""
    return {"startupProbe": {"grpc": {"port": port}, "periodSeconds": 5, "timeoutSeconds": 4, "failureThreshold": 120},
            "readinessProbe": {"grpc": {"port": port}, "periodSeconds": 5, "timeoutSeconds": 4, "failureThreshold": 2},
            "livenessProbe": {"grpc": {"port": port}, "periodSeconds": 10, "timeoutSeconds": 4, "failureThreshold": 6}}


def _pod(layout: Layout, name: str, container: Doc, pool: PoolSpec | None) -> Doc:
    """Pod template: the layout mounted, non-root, drain on stop, placed by hardware when the layout says so."""
    container = {
        "name": "tandem", "imagePullPolicy": "IfNotPresent",
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        **container,
        "volumeMounts": [{"name": "layout", "mountPath": LAYOUT_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
        # leave the Service's endpoints first, then SIGTERM starts the drain
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_S)]}}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    spec: Doc = {
        "terminationGracePeriodSeconds": PRESTOP_S + stop_grace_s(layout),
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001},
        "containers": [container],
        "volumes": [{"name": "layout", "configMap": {"name": "tandem-layout"}}, {"name": "tmp", "emptyDir": {}}],
    }
    if pool is not None and heterogeneous(layout):
        spec["nodeSelector"] = {HW_LABEL: pool.hardware}
        spec["tolerations"] = [{"key": HW_LABEL, "operator": "Equal", "value": pool.hardware, "effect": "NoSchedule"}]
        if pool.gpu:
            spec["tolerations"].append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "tandem"}
    return {"metadata": {"labels": labels}, "spec": spec}


def _resources(pool: PoolSpec) -> Doc:
    """Requests from what the layout says: the KV budget adds to the model's memory; a GPU pool takes one GPU."""
    memory_mi = 1024 + int(pool.batching.kv_budget_mb or 0)
    res: Doc = {"requests": {"cpu": "1", "memory": f"{memory_mi}Mi"}}
    if pool.gpu:
        res["limits"] = {"nvidia.com/gpu": 1}
    return res


def _deployment(name: str, component: str, replicas: int, pod: Doc, annotations: dict[str, str] | None = None) -> Doc:
    meta = _meta(name, component)
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
            "spec": {"replicas": replicas, "selector": {"matchLabels": _selector(name)},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": pod}}


def _service(name: str, component: str, ports: list[Doc], headless: bool) -> Doc:
    spec: Doc = {"selector": _selector(name), "ports": ports}
    if headless:  # one DNS record per ready pod: gRPC clients balance per call, not per connection
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, component), "spec": spec}


def _pdb(name: str, component: str) -> Doc:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(name, component),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(name)}}}


def registry_url(layout: Layout, redis_url: str | None = None) -> tuple[str, str | None]:
    """(the URL pods use, the Redis Service to deploy or None). As in compose, a redis:// URL whose host is a
    bare name (`redis://redis:6379/0`) names a Redis we run under that name; any other host is external, and
    so is `redis_url`. `memory` (in-process) cannot span pods: it becomes our own `tandem-redis`."""
    if redis_url:
        return redis_url, None
    spec = parse_registry(layout.registry)
    if spec.kind == "redis" and spec.host != "localhost":
        return layout.registry, redis_service_name(spec.host)
    return f"redis://tandem-redis:{REDIS_PORT}/0", "tandem-redis"


def _redis(name: str, port: int) -> dict[str, Doc]:
    probe = {"tcpSocket": {"port": port}, "periodSeconds": 5}
    pod = {"metadata": {"labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "tandem"}},
           "spec": {"securityContext": {"runAsNonRoot": True, "runAsUser": 999},
                    "containers": [{"name": "redis", "image": REDIS_IMAGE, "imagePullPolicy": "IfNotPresent",
                                    "args": ["--port", str(port), "--save", "", "--appendonly", "no"],
                                    "ports": [{"name": "redis", "containerPort": port}],
                                    "readinessProbe": probe, "livenessProbe": probe,
                                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}}
    dep = _deployment(name, "registry", 1, pod)
    dep["spec"]["strategy"] = {"type": "Recreate"}
    svc = _service(name, "registry", [{"name": "redis", "port": port, "targetPort": port,
                                       "appProtocol": "redis"}], headless=False)
    return {"redis-deployment.yaml": dep, "redis-service.yaml": svc}


def _worker(layout: Layout, pool: PoolSpec) -> dict[str, Doc]:
    name = f"tandem-{pool.name}"
    port = pool.port
    if pool.role in DIFFUSION_ROLES:
        args = ["serve", pool.role, "--layout", LAYOUT_FILE, "--port", str(port)]
    else:  # every replica listens on the pool's port; it registers under its own pod IP
        args = ["serve", pool.role, "--layout", LAYOUT_FILE, "--address", f"0.0.0.0:{port}",
                "--advertise", f"$(POD_IP):{port}"]
        if pool.device is not None:  # cuda:N becomes cuda: the pod sees the one GPU it was given
            args[4:4] = ["--device", pool.device]
    container = {"image": GPU_IMAGE if pool.gpu else IMAGE, "command": ["tandem"], "args": args,
                 "ports": [{"name": "grpc", "containerPort": port},
                           {"name": "metrics", "containerPort": pool.metrics_port}],
                 "resources": _resources(pool), **_grpc_probes(port)}
    pod = _pod(layout, name, container, pool)
    pod["spec"]["containers"][0]["env"].append(
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    notes = {"tandem.dev/hardware": pool.hardware, "tandem.dev/max-batch": str(pool.batching.max_batch)}
    if pool.power_cap_w:
        notes["tandem.dev/power-cap-w"] = f"{pool.power_cap_w:g}"
    ports = [{"name": "grpc", "port": port, "targetPort": port, "appProtocol": "grpc"},
             {"name": "metrics", "port": pool.metrics_port, "targetPort": pool.metrics_port, "appProtocol": "http"}]
    return {f"{pool.name}-deployment.yaml": _deployment(name, pool.role, pool.count, pod, notes),
            f"{pool.name}-service.yaml": _service(name, pool.role, ports, headless=True),
            f"{pool.name}-pdb.yaml": _pdb(name, pool.role)}


def _gateway(layout: Layout, specs: list[PoolSpec]) -> dict[str, Doc]:
    name = "tandem-gateway"
    http, grpc_port = port_of(layout.gateway.http), port_of(layout.gateway.grpc)
    args = ["serve", "gateway", "--layout", LAYOUT_FILE, "--http", f"0.0.0.0:{http}", "--grpc", f"0.0.0.0:{grpc_port}"]
    for p in specs:  # dlm workers do not register; the gateway reaches them through their Service
        if p.role == "dlm":
            args += ["--worker", f"dlm=tandem-{p.name}:{p.port}"]
    container = {
        "image": IMAGE, "command": ["tandem"], "args": args,
        "ports": [{"name": "http", "containerPort": http}, {"name": "grpc", "containerPort": grpc_port}],
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
        "startupProbe": {"httpGet": {"path": "/v1/models", "port": http}, "periodSeconds": 5, "failureThreshold": 60},
        # ready when a route can be made (a prefill+decode pair or a mixed worker); alive while it answers at all
        "readinessProbe": {"httpGet": {"path": "/health", "port": http}, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/v1/models", "port": http}, "periodSeconds": 10, "failureThreshold": 6},
    }
    ports = [{"name": "http", "port": http, "targetPort": http, "appProtocol": "http"},
             {"name": "grpc", "port": grpc_port, "targetPort": grpc_port, "appProtocol": "grpc"}]
    return {"gateway-deployment.yaml": _deployment(name, "gateway", 1, _pod(layout, name, container, None)),
            "gateway-service.yaml": _service(name, "gateway", ports, headless=False),
            "gateway-pdb.yaml": _pdb(name, "gateway")}


def manifests(layout: Layout, redis_url: str | None = None) -> dict[str, Doc]:
    """File name -> Kubernetes object, in apply order (config, registry, workers, gateway)."""
    layout.check_servable()
    url, redis_name = registry_url(layout, redis_url)
    in_cluster = layout.model_copy(update={"registry": url})
    text = yaml.safe_dump(in_cluster.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    out: dict[str, Doc] = {"layout-configmap.yaml": {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("tandem-layout", "config"),
        "data": {"layout.yaml": text}}}
    if redis_name:
        out.update(_redis(redis_name, parse_registry(url).port))
    specs = pools(layout)
    for pool in specs:
        out.update(_worker(layout, pool))
    out.update(_gateway(layout, specs))
    return out


def kustomization(layout: Layout, files: list[str], namespace: str | None = None) -> Doc:
    doc: Doc = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    if namespace:
        doc["namespace"] = namespace
    doc["labels"] = [{"pairs": {"tandem.dev/layout": slug(layout.name)}, "includeSelectors": False}]
    doc["resources"] = files
    doc["images"] = [{"name": IMAGE.split(":")[0], "newTag": IMAGE.split(":")[1]}]
    if any(p.gpu for p in pools(layout)):
        doc["images"].append({"name": GPU_IMAGE.split(":")[0], "newTag": GPU_IMAGE.split(":")[1]})
    return doc


HEADER = ("# Generated by `tandem k8s{src}`: do not edit; regenerate from the layout.\n"
          "# drain: {drain:g} s after a {pre} s preStop; SIGKILL {grace} s after the pod is told to stop.\n")


def write(layout: Layout, out_dir: str | Path, source: str | None = None, namespace: str | None = None,
          redis_url: str | None = None) -> list[Path]:
    """Write every manifest plus kustomization.yaml into `out_dir`; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = manifests(layout, redis_url)
    header = HEADER.format(src=f" {source}" if source else "", drain=drain_s(layout), pre=PRESTOP_S,
                           grace=PRESTOP_S + stop_grace_s(layout))
    paths = []
    for fname, doc in {**docs, "kustomization.yaml": kustomization(layout, list(docs), namespace)}.items():
        path = out / fname
        path.write_text(header + dump_yaml(doc))
        paths.append(path)
    return paths
