"""The objects a Kubernetes cluster gets, built from the spec (no API server needed)."""

from __future__ import annotations

import base64
import json

import pytest

from airfleet.backends.kubernetes import manifests as m
from airfleet.backends.kubernetes.kube import contains
from airfleet.resources import Cluster

LOGIN = {"url": "registry.example:5000/team", "username": "fleet", "password": "pw-canary"}


def cluster(name: str = "llm-a", caches=(), **kubernetes) -> Cluster:
    return Cluster.model_validate({"metadata": {"name": name}, "spec": {
        "type": "kubernetes", "provider": "existing", "model_caches": list(caches),
        "config": {"kubernetes": {"credential": {"airflow_conn_id": "k8s"}, **kubernetes}}}})


def by_kind(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def test_namespace_name_is_stable_short_and_per_cluster():
    ns = m.namespace_of("llm-a")
    assert ns == m.namespace_of("llm-a") != m.namespace_of("llm-b")
    assert ns.startswith("airfleet-llm-a-") and len(ns.rsplit("-", 1)[1]) == 8
    assert len(m.namespace_of("x" * 40)) <= 63


def test_every_object_carries_the_owner_labels_and_lives_in_the_namespace():
    c = cluster(metrics={"remote_write_url": "http://vm:8428/api/v1/write"},
                router={"ingress": {"host": "llm.example"}},
                caches=[{"name": "hf", "pvc": {"size": "10Gi"}}])
    objects = m.desired_objects(c, LOGIN)
    assert objects[0]["kind"] == "Namespace"
    for obj in objects:
        meta = obj["metadata"]
        assert meta["labels"][m.MANAGED_BY] == "airfleet"
        assert meta["labels"][m.CLUSTER_LABEL] == "llm-a"
        assert meta["annotations"][m.OWNER_ANNOTATION] == "airfleet cluster llm-a"
        if obj["kind"] != "Namespace":
            assert meta["namespace"] == m.namespace_of("llm-a")
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == ["ConfigMap", "Deployment", "Ingress", "Namespace", "PersistentVolumeClaim",
                     "Role", "RoleBinding", "Secret", "Service", "ServiceAccount"]


def test_pull_secret_only_with_a_registry_login_and_used_by_the_deployments():
    assert ("Secret", m.PULL_SECRET) not in by_kind(m.desired_objects(cluster(), None))
    objects = by_kind(m.desired_objects(cluster(), LOGIN))
    secret = objects[("Secret", m.PULL_SECRET)]
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    config = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
    entry = config["auths"]["registry.example:5000"]
    assert (entry["username"], entry["password"]) == ("fleet", "pw-canary")
    assert base64.b64decode(entry["auth"]) == b"fleet:pw-canary"
    pod = objects[("Deployment", m.ROUTER)]["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": m.PULL_SECRET}]


def test_registry_ca_is_published_as_a_config_map():
    objects = by_kind(m.desired_objects(cluster(), {"url": "r:5000", "ca_pem": "PEM"}))
    assert objects[("ConfigMap", m.REGISTRY_CA)]["data"] == {"ca.crt": "PEM"}
    assert ("Secret", m.PULL_SECRET) not in objects  # a CA alone is no login


@pytest.mark.parametrize("service_type", ["ClusterIP", "NodePort", "LoadBalancer"])
def test_router_service_type_image_and_replicas_come_from_the_spec(service_type):
    objects = by_kind(m.desired_objects(cluster(router={
        "service_type": service_type, "image": "reg/router:1.2", "replicas": 3}), None))
    assert objects[("Service", m.ROUTER)]["spec"]["type"] == service_type
    deployment = objects[("Deployment", m.ROUTER)]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "reg/router:1.2"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert objects[("Service", m.ROUTER)]["spec"]["selector"] == selector
    assert ("Ingress", m.ROUTER) not in objects


def test_ingress_routes_its_host_to_the_router():
    objects = by_kind(m.desired_objects(cluster(router={"ingress": {
        "host": "llm.example", "class_name": "nginx"}}), None))
    spec = objects[("Ingress", m.ROUTER)]["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["rules"][0]["host"] == "llm.example"
    assert spec["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == m.ROUTER


def test_the_router_may_watch_pods_of_its_namespace_and_nothing_more():
    objects = by_kind(m.desired_objects(cluster(), None))
    role = objects[("Role", m.POD_READER)]
    assert all(set(rule["verbs"]) == {"get", "list", "watch"} for rule in role["rules"])
    binding = objects[("RoleBinding", m.POD_READER)]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": m.POD_READER,
                                    "namespace": m.namespace_of("llm-a")}]


def test_metrics_collector_only_with_a_remote_write_url_and_scrapes_endpoints():
    assert m.components(cluster()) == [m.ROUTER]
    assert ("Deployment", m.METRICS) not in by_kind(m.desired_objects(cluster(), None))
    c = cluster(metrics={"remote_write_url": "http://vm:8428/api/v1/write",
                         "image": "victoriametrics/vmagent:v1.2.3"})
    assert m.components(c) == [m.ROUTER, m.METRICS]
    objects = by_kind(m.desired_objects(c, None))
    container = objects[("Deployment", m.METRICS)]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "victoriametrics/vmagent:v1.2.3"
    assert "-remoteWrite.url=http://vm:8428/api/v1/write" in container["args"]
    scrape = json.loads(objects[("ConfigMap", m.METRICS)]["data"]["scrape.yaml"])
    job = scrape["scrape_configs"][0]
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [m.namespace_of("llm-a")]
    assert job["relabel_configs"][0] == {
        "source_labels": ["__meta_kubernetes_pod_label_airfleet_io_endpoint"],
        "regex": ".+", "action": "keep"}


def test_model_caches_pvc_created_nfs_and_host_path_recorded():
    c = cluster(caches=[
        {"name": "hf", "pvc": {"size": "500Gi", "storage_class": "fast",
                               "access_mode": "ReadWriteOnce"}},
        {"name": "shared", "nfs": {"server": "10.0.0.9", "path": "/export/models"}},
        {"name": "local", "host_path": {"path": "/data/models"}, "mount_path": "/cache"}])
    objects = by_kind(m.desired_objects(c, None))
    pvc = objects[("PersistentVolumeClaim", "cache-hf")]["spec"]
    assert pvc == {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                   "resources": {"requests": {"storage": "500Gi"}}}
    assert [k for k in objects if k[0] == "PersistentVolumeClaim"] == [
        ("PersistentVolumeClaim", "cache-hf")]
    recorded = json.loads(objects[("ConfigMap", m.CACHES)]["data"]["caches.json"])
    assert recorded["hf"]["volume"]["persistentVolumeClaim"] == {"claimName": "cache-hf"}
    assert recorded["shared"] == {"mount_path": "/models/shared", "volume": {
        "name": "shared", "nfs": {"server": "10.0.0.9", "path": "/export/models",
                                  "readOnly": False}}}
    assert recorded["local"]["mount_path"] == "/cache"
    assert recorded["local"]["volume"]["hostPath"]["path"] == "/data/models"


def test_contains_ignores_server_added_fields_but_not_changed_ones():
    desired = {"spec": {"type": "ClusterIP", "ports": [{"port": 80, "targetPort": "http"}]}}
    live = {"spec": {"type": "ClusterIP", "clusterIP": "10.96.0.7",
                     "ports": [{"port": 80, "targetPort": "http", "protocol": "TCP"}]},
            "status": {}}
    assert contains(live, desired)
    assert not contains({"spec": {**live["spec"], "type": "NodePort"}}, desired)
    assert not contains({"spec": {**live["spec"], "ports": []}}, desired)
    assert not contains({"spec": {"type": "ClusterIP", "ports": [
        {"port": 80, "targetPort": "http"}, {"port": 81}]}}, desired)
    assert not contains({}, desired)
