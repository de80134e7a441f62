"""What the Kubernetes backend's integration tests share: the fake API server (module-scoped,
reset per test), its Airflow connection, a fresh store and vault, a cluster spec, and readers of
what the fake holds and was asked. Import the fixtures into a test module to use them."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from airfleet.backends.kubernetes import manifests as m
from airfleet.store import Store
from tests.fakes.kube_apiserver import FakeKubeAPIServer

CONN_ID = "k8s_fake"
REMOTE_WRITE = "http://victoria.example:8428/api/v1/write"
GPU_NODE = {"feature.node.kubernetes.io/pci-10de.present": "true",
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8",
            "nvidia.com/gpu.memory": "81559"}
STOCK_NFD_NODE = {"feature.node.kubernetes.io/pci-0302_10de.present": "true"}


@pytest.fixture(scope="module")
def server():
    with FakeKubeAPIServer(ready_delay=0.3, terminate_delay=0.2) as server:
        yield server


@pytest.fixture
def kube(server, airfleet_home, monkeypatch):
    """The fake API server with three nodes (two with GPUs), the Airflow connection to it, a
    fresh store, vault keys and a registry login (with a canary password) in the vault."""
    from airfleet import crypto
    from airfleet.vault import Vault

    server.reset()
    server.add_node("gpu-1", labels=GPU_NODE, allocatable={"cpu": "32", "nvidia.com/gpu": "8"},
                    capacity={"cpu": "32", "nvidia.com/gpu": "8"})
    server.add_node("gpu-2", labels=STOCK_NFD_NODE, allocatable={"cpu": "16", "nvidia.com/gpu": "2"})
    server.add_node("cpu-1", labels={"kubernetes.io/os": "linux"}, allocatable={"cpu": "8"})
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config": json.dumps(server.kubeconfig())}}))
    monkeypatch.delenv("AIRFLEET_BACKENDS", raising=False)
    Store().migrate()
    keys = Path(os.environ["AIRFLEET_KEYS_DIR"])
    crypto.init_keys(keys)
    canary = f"canary-{secrets.token_hex(16)}"
    login = Vault(Store(), keys).put(json.dumps({"username": "fleet", "password": canary}).encode(),
                                     "registry login")
    server.canary, server.registry_login = canary, login
    return server


def cluster(kube, name: str = "llm-a", **kubernetes) -> dict:
    config = {"credential": {"airflow_conn_id": CONN_ID},
              "metrics": {"remote_write_url": REMOTE_WRITE}, **kubernetes}
    return {"metadata": {"name": name, "labels": {"team": "search"}}, "spec": {
        "type": "kubernetes", "provider": "existing",
        "image_registry": {"url": "registry.example:5000",
                           "credential": {"vault_id": kube.registry_login}},
        "model_caches": [{"name": "hf", "pvc": {"size": "100Gi", "storage_class": "fast"}},
                         {"name": "shared", "nfs": {"server": "10.0.0.9", "path": "/models"}}],
        "config": {"kubernetes": config}}}


def run(dags, dag_id: str, conf: dict):
    return dags[dag_id].test(run_conf=conf)


def states(dr) -> dict[str, str]:
    return {t.task_id: str(t.state) for t in dr.get_task_instances()}


def ours(kube, name: str | None = None) -> list[tuple[str, str, str | None]]:
    """Every object in the fake carrying Airfleet's labels (of one cluster, or of any)."""
    found = []
    for kind in ("Namespace", "Secret", "ConfigMap", "Service", "ServiceAccount", "Deployment",
                 "Ingress", "Role", "RoleBinding", "PersistentVolumeClaim"):
        for obj in kube.list(kind):
            labels = obj["metadata"].get("labels") or {}
            if labels.get(m.MANAGED_BY) == "airfleet" and name in (None, labels[m.CLUSTER_LABEL]):
                found.append((kind, obj["metadata"]["name"], obj["metadata"].get("namespace")))
    return sorted(found, key=str)


def writes(kube) -> list[tuple[str, str, int]]:
    """Requests that could change the cluster (access reviews change nothing)."""
    return [r for r in kube.requests
            if r[0] in ("POST", "PUT", "PATCH", "DELETE") and "selfsubjectaccessreviews" not in r[1]]


def output(capfd, caplog) -> str:
    out = capfd.readouterr()
    return out.out + out.err + caplog.text
