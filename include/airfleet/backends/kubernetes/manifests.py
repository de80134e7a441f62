"""The Kubernetes objects Airfleet keeps in a managed cluster, built from the spec (pure).

Everything lives in one namespace per cluster, ``airfleet-<name>-<hash>``, so deleting the
namespace removes it all. Every object carries the managed-by and cluster labels and an owner
annotation: an orphan sweep finds Airfleet's objects with the selector
``app.kubernetes.io/managed-by=airfleet`` and knows which cluster each belongs to.

The router watches the pods of the namespace labelled ``airfleet.io/endpoint`` (see
``router/README.md``); the metrics collector (vmagent) scrapes the same pods and
remote-writes to the spec's URL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

from airfleet import engines
from airfleet.endpoints import EndpointSpec, EndpointVersion, model_matches
from airfleet.resources import Cluster, KubernetesConfig, ModelCache

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "airfleet"
CLUSTER_LABEL = "airfleet.io/cluster"
COMPONENT_LABEL = "app.kubernetes.io/component"
NAME_LABEL = "app.kubernetes.io/name"
OWNER_ANNOTATION = "airfleet.io/owner"
ENDPOINT_LABEL = "airfleet.io/endpoint"
MODEL_LABEL = "airfleet.io/model"

ROUTER = "airfleet-router"
METRICS = "airfleet-vmagent"
POD_READER = "airfleet-pod-reader"
PULL_SECRET = "airfleet-registry"
REGISTRY_CA = "airfleet-registry-ca"
CACHES = "airfleet-model-caches"
ROUTER_PORT = 8080
VMAGENT_PORT = 8429
# Fields the API server refuses to change on an existing object (422 Invalid): a PVC's spec
# but a larger storage request, a Deployment's selector, a Service's cluster IP, a binding's
# roleRef. An update that would change one is refused before anything is touched.
IMMUTABLE: dict[str, tuple[str, ...]] = {
    "PersistentVolumeClaim": ("spec.storageClassName", "spec.accessModes"),
    "Deployment": ("spec.selector",),
    "Service": ("spec.clusterIP",),
    "RoleBinding": ("roleRef",),
}
PVC_STORAGE = "spec.resources.requests.storage"  # may grow, never shrink
_BINARY_UNITS = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5}


def namespace_of(cluster_name: str) -> str:
    """``airfleet-<name>-<8 hex>``: stable for a name, at most 63 characters."""
    digest = hashlib.sha256(f"airfleet/{cluster_name}".encode()).hexdigest()[:8]
    return f"airfleet-{cluster_name}-{digest}"


def selector(cluster_name: str) -> str:
    """Label selector of every object Airfleet made for the cluster."""
    return f"{MANAGED_BY}={MANAGED_BY_VALUE},{CLUSTER_LABEL}={cluster_name}"


def kube_config(cluster: Cluster) -> KubernetesConfig:
    # eks/aks specs may omit the block: the defaults apply.
    return cluster.spec.config.kubernetes or KubernetesConfig()


def desired_objects(cluster: Cluster, registry: dict[str, str] | None) -> list[dict[str, Any]]:
    """Every object of the cluster, in creation order (namespace first). ``registry``:
    the resolved registry login (``airfleet_airflow.clients.registry_login``)."""
    ns = namespace_of(cluster.name)
    cfg = kube_config(cluster)
    pull_secrets = [PULL_SECRET] if registry and registry.get("password") else []
    objects = [namespace(cluster)]
    if pull_secrets:
        objects.append(pull_secret(cluster, ns, registry))
    if registry and registry.get("ca_pem"):
        objects.append(_meta(cluster, ns, "v1", "ConfigMap", REGISTRY_CA, "registry",
                             data={"ca.crt": registry["ca_pem"]}))
    objects += pod_reader(cluster, ns)
    objects += router(cluster, ns, cfg, pull_secrets)
    if cfg.metrics.remote_write_url:
        objects += metrics(cluster, ns, cfg, pull_secrets)
    objects += model_caches(cluster, ns)
    return objects


def components(cluster: Cluster) -> list[str]:
    """The Deployments that must be Available for the cluster to be healthy."""
    return [ROUTER] + ([METRICS] if kube_config(cluster).metrics.remote_write_url else [])


# ---- the objects ----------------------------------------------------------------------------

def labels(cluster: Cluster, component: str) -> dict[str, str]:
    return {MANAGED_BY: MANAGED_BY_VALUE, CLUSTER_LABEL: cluster.name,
            COMPONENT_LABEL: component}


def _meta(cluster: Cluster, ns: str | None, api_version: str, kind: str, name: str,
          component: str, **body: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": labels(cluster, component),
                                "annotations": {OWNER_ANNOTATION: f"airfleet cluster {cluster.name}"}}
    if ns:
        metadata["namespace"] = ns
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata, **body}


def namespace(cluster: Cluster) -> dict[str, Any]:
    return _meta(cluster, None, "v1", "Namespace", namespace_of(cluster.name), "namespace")


def pull_secret(cluster: Cluster, ns: str, registry: dict[str, str]) -> dict[str, Any]:
    host = registry["url"].split("://", 1)[-1].split("/", 1)[0]
    auth = base64.b64encode(f"{registry['username']}:{registry['password']}".encode()).decode()
    config = {"auths": {host: {"username": registry["username"],
                               "password": registry["password"], "auth": auth}}}
    return _meta(cluster, ns, "v1", "Secret", PULL_SECRET, "registry",
                 type="kubernetes.io/dockerconfigjson",
                 data={".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()})


def pod_reader(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    """The router and vmagent read the namespace's pods (list + watch); the router also reads
    its traffic weights, the ConfigMap airfleet-routes (router/README.md)."""
    rbac = "rbac.authorization.k8s.io/v1"
    return [
        _meta(cluster, ns, "v1", "ServiceAccount", POD_READER, "rbac"),
        _meta(cluster, ns, rbac, "Role", POD_READER, "rbac",
              rules=[{"apiGroups": [""], "resources": ["pods", "endpoints", "services"],
                      "verbs": ["get", "list", "watch"]},
                     # Kubernetes authorizes a list or watch against resourceNames only when
                     # it carries fieldSelector=metadata.name=<that name> (which the router
                     # sends), and not every authorizer in between does so: the namespace
                     # holds Airfleet's objects only, so reading its ConfigMaps is granted.
                     {"apiGroups": [""], "resources": ["configmaps"],
                      "verbs": ["get", "list", "watch"]}]),
        _meta(cluster, ns, rbac, "RoleBinding", POD_READER, "rbac",
              roleRef={"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                       "name": POD_READER},
              subjects=[{"kind": "ServiceAccount", "name": POD_READER, "namespace": ns}]),
    ]


def _deployment(cluster: Cluster, ns: str, name: str, component: str, replicas: int,
                container: dict[str, Any], pull_secrets: list[str],
                volumes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A Deployment whose rollout Kubernetes itself calls failed (Progressing False,
    ProgressDeadlineExceeded) once it makes no progress for the spec's ready timeout."""
    match = {NAME_LABEL: name, CLUSTER_LABEL: cluster.name}
    pod_spec: dict[str, Any] = {"serviceAccountName": POD_READER, "containers": [container]}
    if pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in pull_secrets]
    if volumes:
        pod_spec["volumes"] = volumes
    return _meta(cluster, ns, "apps/v1", "Deployment", name, component, spec={
        "replicas": replicas,
        "progressDeadlineSeconds": kube_config(cluster).ready_timeout_seconds,
        "selector": {"matchLabels": match},
        "template": {"metadata": {"labels": {**labels(cluster, component), **match}},
                     "spec": pod_spec}})


def router(cluster: Cluster, ns: str, cfg: KubernetesConfig,
           pull_secrets: list[str]) -> list[dict[str, Any]]:
    # Ready once its pod list is synced (/healthz); alive while it accepts connections, so an
    # API server that is briefly away does not get the router restarted.
    container = {
        "name": "router", "image": cfg.router.image,
        "ports": [{"name": "http", "containerPort": ROUTER_PORT}],
        "env": [{"name": "AIRFLEET_ROUTER_PORT", "value": str(ROUTER_PORT)}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 6},
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"memory": "512Mi"}}}
    out = [
        _deployment(cluster, ns, ROUTER, "router", cfg.router.replicas, container, pull_secrets),
        _meta(cluster, ns, "v1", "Service", ROUTER, "router", spec={
            "type": cfg.router.service_type,
            "selector": {NAME_LABEL: ROUTER, CLUSTER_LABEL: cluster.name},
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}),
    ]
    if cfg.router.ingress:
        rule = {"host": cfg.router.ingress.host, "http": {"paths": [{
            "path": "/", "pathType": "Prefix",
            "backend": {"service": {"name": ROUTER, "port": {"name": "http"}}}}]}}
        spec: dict[str, Any] = {"rules": [rule]}
        if cfg.router.ingress.class_name:
            spec["ingressClassName"] = cfg.router.ingress.class_name
        out.append(_meta(cluster, ns, "networking.k8s.io/v1", "Ingress", ROUTER, "router",
                         spec=spec))
    return out


def vmagent_config(ns: str, scrape_interval: str) -> str:
    """Scrape every pod labelled as an Airfleet endpoint, on its port named ``metrics``."""
    job = {
        "job_name": "airfleet-endpoints",
        "kubernetes_sd_configs": [{"role": "pod", "namespaces": {"names": [ns]}}],
        "relabel_configs": [
            {"source_labels": ["__meta_kubernetes_pod_label_airfleet_io_endpoint"],
             "regex": ".+", "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_container_port_name"],
             "regex": "metrics", "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_label_airfleet_io_model"],
             "target_label": "model"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        ]}
    return json.dumps({"global": {"scrape_interval": scrape_interval},
                       "scrape_configs": [job]}, indent=2)


def metrics(cluster: Cluster, ns: str, cfg: KubernetesConfig,
            pull_secrets: list[str]) -> list[dict[str, Any]]:
    container = {
        "name": "vmagent", "image": cfg.metrics.image,
        "args": ["-promscrape.config=/config/scrape.yaml",
                 f"-remoteWrite.url={cfg.metrics.remote_write_url}",
                 f"-remoteWrite.label=airfleet_cluster={cluster.name}"],
        "ports": [{"name": "http", "containerPort": VMAGENT_PORT}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
        "volumeMounts": [{"name": "config", "mountPath": "/config"}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                      "limits": {"memory": "256Mi"}}}
    return [
        _meta(cluster, ns, "v1", "ConfigMap", METRICS, "metrics",
              data={"scrape.yaml": vmagent_config(ns, cfg.metrics.scrape_interval)}),
        _deployment(cluster, ns, METRICS, "metrics", 1, container, pull_secrets,
                    volumes=[{"name": "config", "configMap": {"name": METRICS}}]),
    ]


def cache_volume(cache: ModelCache) -> dict[str, Any]:
    """The pod volume an endpoint Deployment mounts for a cache."""
    if cache.pvc:
        return {"name": cache.name, "persistentVolumeClaim": {"claimName": f"cache-{cache.name}"}}
    if cache.nfs:
        return {"name": cache.name, "nfs": {"server": cache.nfs.server, "path": cache.nfs.path,
                                            "readOnly": cache.nfs.read_only}}
    return {"name": cache.name, "hostPath": {"path": cache.host_path.path,
                                             "type": "DirectoryOrCreate"}}


def model_caches(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    """PVCs for ``pvc`` caches; every cache's volume and mount path recorded in a ConfigMap
    that endpoint Deployments read."""
    caches = cluster.spec.model_caches
    if not caches:
        return []
    out = []
    for cache in caches:
        if cache.pvc:
            spec: dict[str, Any] = {"accessModes": [cache.pvc.access_mode],
                                    "resources": {"requests": {"storage": cache.pvc.size}}}
            if cache.pvc.storage_class:
                spec["storageClassName"] = cache.pvc.storage_class
            out.append(_meta(cluster, ns, "v1", "PersistentVolumeClaim", f"cache-{cache.name}",
                             "model-cache", spec=spec))
    recorded = {c.name: {"volume": cache_volume(c),
                         "mount_path": c.mount_path or f"/models/{c.name}"} for c in caches}
    out.append(_meta(cluster, ns, "v1", "ConfigMap", CACHES, "model-cache",
                     data={"caches.json": json.dumps(recorded, indent=2, sort_keys=True)}))
    return out


# ---- what an update may not change -----------------------------------------------------------

def _field(obj: dict[str, Any], path: str) -> Any:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def storage_bytes(size: str) -> int:
    """A PVC size as the spec allows it (``500Gi``) in bytes."""
    return int(size[:-2]) * 1024 ** _BINARY_UNITS[size[-2:]]


def immutable_changes(before: list[dict[str, Any]], after: list[dict[str, Any]],
                      ) -> list[tuple[dict[str, Any], str, Any, Any]]:
    """``(object, field, was, wanted)`` for each field of :data:`IMMUTABLE` (and each PVC
    shrink) that going from the objects ``before`` to ``after`` would change."""
    old = {(o["kind"], o["metadata"]["name"]): o for o in before}
    changes = []
    for obj in after:
        was = old.get((obj["kind"], obj["metadata"]["name"]))
        if was is None:
            continue
        for path in IMMUTABLE.get(obj["kind"], ()):
            if _field(was, path) != _field(obj, path):
                changes.append((obj, path, _field(was, path), _field(obj, path)))
        if obj["kind"] == "PersistentVolumeClaim" and \
                storage_bytes(_field(obj, PVC_STORAGE)) < storage_bytes(_field(was, PVC_STORAGE)):
            changes.append((obj, PVC_STORAGE, _field(was, PVC_STORAGE), _field(obj, PVC_STORAGE)))
    return changes


# ---- endpoints -------------------------------------------------------------------------------
# One Deployment per endpoint version, in the cluster's namespace. The router (router/README.md)
# finds its pods by ENDPOINT_LABEL, routes by the served model (SERVED_ANNOTATION; labels
# cannot hold "/"), splits traffic between versions by the weights in the ROUTES ConfigMap, and
# scrapes the engine's own /metrics on the port named "metrics", as vmagent does.

VERSION_LABEL = "airfleet.io/version"
SERVED_ANNOTATION = "airfleet.io/served-model"
PORT_ANNOTATION = "airfleet.io/port"
ROUTES = "airfleet-routes"
# Components the endpoint flows own: a cluster update never sweeps them.
ENDPOINT_COMPONENTS = frozenset({"endpoint", "routes"})
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# The image each engine runs from unless the spec names one (the mock engine's is built from
# deploy/mock-engine.Dockerfile).
ENGINE_IMAGES = {"vllm": "vllm/vllm-openai:v0.11.0", "sglang": "lmsysorg/sglang:v0.5.4",
                 "mock": "airfleet/mock-engine:0.1.0"}


def endpoint_deployment_name(endpoint: EndpointVersion) -> str:
    """``<endpoint>-<version>``: at most 40 + 1 + 20 characters, a DNS-1123 label."""
    return f"{endpoint.name}-{endpoint.spec.version}"


def label_value(text: str) -> str:
    """``text`` as a label value: at most 63 of [A-Za-z0-9._-], alphanumeric at both ends."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def endpoint_deployment(cluster: Cluster, endpoint: EndpointVersion,
                        pull_secrets: list[str]) -> dict[str, Any]:
    """The Deployment of one endpoint version: the engine's command from the spec, GPUs as
    ``nvidia.com/gpu`` limits on nodes whose detected GPUs match, the model cache mounted,
    probes on the engine's ``/health``."""
    spec, name = endpoint.spec, endpoint_deployment_name(endpoint)
    ns = namespace_of(cluster.name)
    cache = next((c for c in cluster.spec.model_caches if c.name == spec.model.cache), None)
    mount = (cache.mount_path or f"/models/{cache.name}") if cache else None
    container: dict[str, Any] = {
        "name": "engine", "image": spec.image or ENGINE_IMAGES[spec.engine.value],
        "command": engines.command(spec, cache_dir=mount),
        "ports": [{"name": "metrics", "containerPort": engines.PORT, "protocol": "TCP"}],
        # Ready when the engine answers /health (the model is loaded). Loading a large model
        # takes minutes: the startup probe gives it up to 30 before liveness takes over.
        "startupProbe": {"httpGet": {"path": engines.HEALTH_PATH, "port": "metrics"},
                         "periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": {"httpGet": {"path": engines.HEALTH_PATH, "port": "metrics"},
                           "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": engines.HEALTH_PATH, "port": "metrics"},
                          "periodSeconds": 10, "failureThreshold": 6},
        "resources": _endpoint_resources(spec)}
    volumes = []
    if cache:
        volumes.append(cache_volume(cache))
        container["volumeMounts"] = [{"name": cache.name, "mountPath": mount}]
    if spec.resources.gpu > 1:  # tensor parallel workers share memory through /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        container.setdefault("volumeMounts", []).append({"name": "dshm",
                                                         "mountPath": "/dev/shm"})
    match = {ENDPOINT_LABEL: endpoint.name, VERSION_LABEL: spec.version,
             CLUSTER_LABEL: cluster.name}
    pod_spec: dict[str, Any] = {"containers": [container], "automountServiceAccountToken": False,
                                **_gpu_placement(cluster, spec)}
    if volumes:
        pod_spec["volumes"] = volumes
    if pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in pull_secrets]
    deployment = _meta(cluster, ns, "apps/v1", "Deployment", name, "endpoint", spec={
        "replicas": spec.replicas,
        "progressDeadlineSeconds": kube_config(cluster).ready_timeout_seconds,
        "selector": {"matchLabels": match},
        "template": {"metadata": {
            "labels": {**labels(cluster, "endpoint"), **match,
                       MODEL_LABEL: label_value(spec.model.served)},
            "annotations": {SERVED_ANNOTATION: spec.model.served,
                            PORT_ANNOTATION: str(engines.PORT)}},
            "spec": pod_spec}})
    deployment["metadata"]["labels"].update(match)
    return deployment


def _endpoint_resources(spec: EndpointSpec) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if spec.resources.cpu:
        requests["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        requests["memory"] = limits["memory"] = spec.resources.memory
    if spec.resources.gpu:  # an extended resource: limits only (requests default to them)
        limits[GPU_RESOURCE] = str(spec.resources.gpu)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _gpu_placement(cluster: Cluster, spec: EndpointSpec) -> dict[str, Any]:
    """Node selection for a GPU endpoint: nodes with NVIDIA GPUs, of the asked model (by the
    GPU feature discovery product label Airfleet recorded for the nodes), tolerating the
    taints of the cluster's GPU node pools."""
    if not spec.resources.gpu:
        return {}
    out: dict[str, Any] = {"nodeSelector": {GPU_PRESENT_LABEL: "true"}}
    if spec.resources.gpu_model:
        products = sorted({n.labels[GPU_PRODUCT_LABEL] for n in cluster.status.nodes
                           if GPU_PRODUCT_LABEL in n.labels and
                           model_matches(spec.resources.gpu_model,
                                                   n.labels[GPU_PRODUCT_LABEL])})
        if products:
            out["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": products}]}]}}}
    tolerations = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    block = cluster.spec.config.eks or cluster.spec.config.aks
    for pool in (block.node_pools if block else []):
        if pool.gpu:
            tolerations += [{"key": t.key, "operator": "Equal", "value": t.value,
                             "effect": t.effect} for t in pool.taints]
    out["tolerations"] = [t for i, t in enumerate(tolerations) if t not in tolerations[:i]]
    return out


def routes(cluster: Cluster, versions: list[EndpointVersion]) -> dict[str, Any]:
    """The router's traffic weights: ``{"models": {served model: {version: weight}}}`` for
    every endpoint version of the cluster (router/README.md)."""
    models: dict[str, dict[str, int]] = {}
    for v in versions:
        models.setdefault(v.spec.model.served, {})[v.spec.version] = v.spec.traffic_weight
    return _meta(cluster, namespace_of(cluster.name), "v1", "ConfigMap", ROUTES, "routes",
                 data={"routes.json": json.dumps({"models": models}, indent=2,
                                                 sort_keys=True)})
