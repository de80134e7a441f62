"""The fake Kubernetes API server (tests/fakes/kube_apiserver.py) against real clients: the
`kubernetes` Python client, Airflow's KubernetesHook, kubernetes_asyncio, raw httpx and kubectl.

One server for the module, `reset()` before each test.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time

import httpx
import kubernetes
import pytest
from kubernetes.client import (
    AppsV1Api,
    AuthorizationV1Api,
    CoreV1Api,
    NetworkingV1Api,
    RbacAuthorizationV1Api,
)
from kubernetes.client.rest import ApiException

from tests.fakes.kube_apiserver import FakeKubeAPIServer, KubeAPIError
from tests.integration.fake_kube_support import (  # noqa: F401 - fixtures
    apps,
    client,
    core,
    fresh,
    kubectl,
    ns,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

KUBECTL = "/usr/bin/kubectl"


@pytest.fixture(scope="module")
def server():
    with FakeKubeAPIServer(ready_delay=0.2, terminate_delay=0.2) as server:
        yield server


def status_of(exc: ApiException) -> dict:
    body = json.loads(exc.body)
    assert body["kind"] == "Status" and body["apiVersion"] == "v1" and body["status"] == "Failure"
    assert body["code"] == exc.status
    return body


def fails(fn, *args, **kwargs) -> dict:
    with pytest.raises(ApiException) as info:
        fn(*args, **kwargs)
    return status_of(info.value)


def deployment(name: str = "d", replicas: int = 1, labels: dict | None = None) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "main", "image": "nginx:1"}]}}}}


def pod(name: str, **spec) -> dict:
    return {"metadata": {"name": name},
            "spec": {"containers": [{"name": "main", "image": "busybox"}], **spec}}


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def condition(dep, kind: str) -> str:
    return next(c.status for c in dep.status.conditions if c.type == kind)


# --- CRUD -------------------------------------------------------------------------------------

NAMESPACED = [
    (CoreV1Api, "config_map", {"data": {"a": "1"}}),
    (CoreV1Api, "secret", {"stringData": {"a": "1"}}),
    (CoreV1Api, "service", {"spec": {"ports": [{"port": 80}]}}),
    (CoreV1Api, "service_account", {}),
    (CoreV1Api, "persistent_volume_claim", {"spec": {"accessModes": ["ReadWriteOnce"]}}),
    (CoreV1Api, "pod", {"spec": {"containers": [{"name": "main", "image": "busybox"}]}}),
    (CoreV1Api, "event", {"involvedObject": {"kind": "Pod", "name": "p"}, "reason": "Test"}),
    (AppsV1Api, "deployment", {"spec": deployment()["spec"]}),
    (NetworkingV1Api, "ingress", {"spec": {"ingressClassName": "nginx"}}),
    (RbacAuthorizationV1Api, "role", {"rules": []}),
    (RbacAuthorizationV1Api, "role_binding",
     {"roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"}}),
]
CLUSTER_SCOPED = [
    (CoreV1Api, "namespace", {}),
    (CoreV1Api, "node", {}),
    (RbacAuthorizationV1Api, "cluster_role", {"rules": []}),
    (RbacAuthorizationV1Api, "cluster_role_binding",
     {"roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "r"}}),
]


@pytest.mark.parametrize("api_class, kind, body", NAMESPACED, ids=[k for _, k, _ in NAMESPACED])
def test_crud_of_each_namespaced_kind(client, ns, api_class, kind, body):
    api = api_class(client)
    create, read = getattr(api, f"create_namespaced_{kind}"), getattr(api, f"read_namespaced_{kind}")
    made = create(ns, {"metadata": {"name": "obj", "labels": {"a": "1"}}, **body})
    assert made.metadata.namespace == ns and made.metadata.uid and made.metadata.creation_timestamp
    assert made.metadata.generation == 1 and int(made.metadata.resource_version) > 0
    got = read("obj", ns)
    assert got.metadata.uid == made.metadata.uid
    listed = getattr(api, f"list_namespaced_{kind}")(ns)
    assert [o.metadata.name for o in listed.items] == ["obj"]
    assert int(listed.metadata.resource_version) >= int(made.metadata.resource_version)
    got.metadata.labels = {"a": "2"}
    replaced = getattr(api, f"replace_namespaced_{kind}")("obj", ns, got)
    assert replaced.metadata.labels == {"a": "2"}
    assert int(replaced.metadata.resource_version) > int(made.metadata.resource_version)
    assert replaced.metadata.generation == 1  # metadata only
    getattr(api, f"delete_namespaced_{kind}")("obj", ns, propagation_policy="Background")
    gone = fails(read, "obj", ns)
    assert gone["reason"] == "NotFound" and gone["details"]["name"] == "obj"


@pytest.mark.parametrize("api_class, kind, body", CLUSTER_SCOPED, ids=[k for _, k, _ in CLUSTER_SCOPED])
def test_crud_of_each_cluster_scoped_kind(server, client, api_class, kind, body):
    api = api_class(client)
    made = getattr(api, f"create_{kind}")({"metadata": {"name": "obj"}, **body})
    assert made.metadata.namespace is None and made.metadata.uid
    got = getattr(api, f"read_{kind}")("obj")
    got.metadata.labels = {"b": "1"}
    assert getattr(api, f"replace_{kind}")("obj", got).metadata.labels == {"b": "1"}
    assert "obj" in [o.metadata.name for o in getattr(api, f"list_{kind}")().items]
    getattr(api, f"delete_{kind}")("obj")
    if kind == "namespace":  # terminating first, then gone
        wait_for(lambda: server.get("Namespace", "obj") is None)
    assert fails(getattr(api, f"read_{kind}"), "obj")["code"] == 404


def test_a_fresh_cluster_has_only_the_system_namespaces(core):
    names = [n.metadata.name for n in core.list_namespace().items]
    assert names == ["default", "kube-node-lease", "kube-public", "kube-system"]
    assert core.read_namespace("default").status.phase == "Active"


def test_secret_string_data_lands_in_data_and_status_is_defaulted(core, ns):
    secret = core.create_namespaced_secret(ns, {"metadata": {"name": "s"}, "stringData": {"k": "v"}})
    assert secret.data == {"k": "dg=="} and secret.string_data is None and secret.type == "Opaque"
    assert core.create_namespaced_pod(ns, pod("p")).status.phase == "Pending"
    svc = core.create_namespaced_service(ns, {"metadata": {"name": "svc"}, "spec": {}})
    assert svc.spec.type == "ClusterIP" and svc.spec.cluster_ip.startswith("10.96.")


def test_already_exists_and_stale_resource_version_conflict(core, ns):
    made = core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}, "data": {"a": "1"}})
    dup = fails(core.create_namespaced_config_map, ns, {"metadata": {"name": "c"}})
    assert dup["reason"] == "AlreadyExists" and dup["code"] == 409
    assert dup["message"] == 'configmaps "c" already exists'
    assert dup["details"] == {"name": "c", "kind": "configmaps"}
    made.data = {"a": "2"}
    core.replace_namespaced_config_map("c", ns, made)
    made.data = {"a": "3"}  # still the first resourceVersion
    stale = fails(core.replace_namespaced_config_map, "c", ns, made)
    assert stale["reason"] == "Conflict" and stale["code"] == 409
    assert stale["message"] == ('Operation cannot be fulfilled on configmaps "c": the object has been '
                                "modified; please apply your changes to the latest version and try again")
    made.metadata.resource_version = None  # unconditional
    assert core.replace_namespaced_config_map("c", ns, made).data == {"a": "3"}


def test_errors_are_real_statuses(core, apps, ns):
    missing = fails(apps.read_namespaced_deployment, "nope", ns)
    assert missing["message"] == 'deployments.apps "nope" not found'
    assert missing["details"] == {"name": "nope", "group": "apps", "kind": "deployments"}
    core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}})
    wrong_name = fails(core.replace_namespaced_config_map, "c", ns, {"metadata": {"name": "other"}})
    assert wrong_name["reason"] == "BadRequest" and "does not match the name on the URL" in wrong_name["message"]
    wrong_ns = fails(core.create_namespaced_config_map, ns, {"metadata": {"name": "d", "namespace": "y"}})
    assert wrong_ns["code"] == 400
    no_ns = fails(core.create_namespaced_config_map, "nowhere", {"metadata": {"name": "c"}})
    assert no_ns["reason"] == "NotFound" and no_ns["message"] == 'namespaces "nowhere" not found'
    invalid = fails(core.create_namespace, {"metadata": {"name": "Not_Valid"}})
    assert invalid["reason"] == "Invalid" and invalid["code"] == 422
    # An apply without a field manager is invalid (ValidatePatchOptions in
    # staging/src/k8s.io/apimachinery/pkg/apis/meta/v1/validation/validation.go).
    no_manager = fails(core.patch_namespaced_config_map, "c", ns, {"data": {}},
                       _content_type="application/apply-patch+yaml")
    assert no_manager["code"] == 422 and "fieldManager: Required value" in no_manager["message"]
    media = fails(core.patch_namespaced_config_map, "c", ns, {"data": {}},
                  _content_type="application/unknown-patch+json")
    assert media["code"] == 415
    assert fails(core.delete_namespaced_config_map, "nope", ns)["code"] == 404


def test_generation_counts_spec_changes_only(server, apps, ns):
    server.ready_delay = 30  # no pod turns Ready mid-test: the controllers' status write would
    # change the resourceVersion these steps compare (as a real cluster's would)
    dep = apps.create_namespaced_deployment(ns, deployment(replicas=1))
    assert dep.metadata.generation == 1 and dep.status.observed_generation == 1
    dep = apps.patch_namespaced_deployment("d", ns, {"metadata": {"labels": {"x": "y"}}})
    assert dep.metadata.generation == 1
    dep = apps.patch_namespaced_deployment("d", ns, {"spec": {"replicas": 2}})
    assert dep.metadata.generation == 2 and dep.status.observed_generation == 2
    rv = dep.metadata.resource_version
    dep = apps.patch_namespaced_deployment_status("d", ns, {"status": {"collisionCount": 1}})
    assert dep.metadata.generation == 2 and dep.metadata.resource_version != rv
    same = apps.patch_namespaced_deployment("d", ns, {"spec": {"replicas": 2}})
    assert same.metadata.resource_version == dep.metadata.resource_version  # no-op write


def test_patch_types(core, apps, ns):
    core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}, "data": {"a": "1", "b": "2"}})
    merged = core.patch_namespaced_config_map("c", ns, {"data": {"a": None, "c": "3"}},
                                              _content_type="application/merge-patch+json")
    assert merged.data == {"b": "2", "c": "3"}
    patched = core.patch_namespaced_config_map("c", ns, [
        {"op": "add", "path": "/data/d", "value": "4"},
        {"op": "replace", "path": "/data/b", "value": "20"},
        {"op": "remove", "path": "/data/c"}])  # a list: the client sends application/json-patch+json
    assert patched.data == {"b": "20", "d": "4"}
    bad = fails(core.patch_namespaced_config_map, "c", ns, [{"op": "remove", "path": "/data/zz"}])
    assert bad["code"] == 422
    dep = deployment()
    dep["spec"]["template"]["spec"]["containers"].append({"name": "side", "image": "envoy:1"})
    apps.create_namespaced_deployment(ns, dep)
    strategic = apps.patch_namespaced_deployment("d", ns, {"spec": {"template": {"spec": {
        "containers": [{"name": "side", "image": "envoy:2"}]}}}})  # strategic merge by default
    assert [(c.name, c.image) for c in strategic.spec.template.spec.containers] == [
        ("main", "nginx:1"), ("side", "envoy:2")]
    replaced = apps.patch_namespaced_deployment("d", ns, {"spec": {"template": {"spec": {
        "containers": [{"name": "only", "image": "x"}]}}}}, _content_type="application/merge-patch+json")
    assert [c.name for c in replaced.spec.template.spec.containers] == ["only"]


def test_status_subresource_and_main_resource_ignore_each_other(server, apps, ns):
    server.ready_delay = 30  # no pod turns Ready mid-test: the controllers' status write would
    # change the resourceVersion these steps compare (as a real cluster's would)
    dep = apps.create_namespaced_deployment(ns, deployment(replicas=1))
    dep.status.replicas = 99
    dep.spec.replicas = 2
    replaced = apps.replace_namespaced_deployment("d", ns, dep)
    assert replaced.spec.replicas == 2 and replaced.status.replicas == 2  # status from the server
    replaced.status.replicas = 7
    replaced.spec.replicas = 5
    status = apps.replace_namespaced_deployment_status("d", ns, replaced)
    assert status.status.replicas == 7 and status.spec.replicas == 2
    assert apps.read_namespaced_deployment_status("d", ns).status.replicas == 7


def test_scale_subresource(server, apps, ns):
    server.ready_delay = 30  # no pod turns Ready mid-test: the controllers' status write would
    # change the resourceVersion these steps compare (as a real cluster's would)
    apps.create_namespaced_deployment(ns, deployment(replicas=1))
    scale = apps.read_namespaced_deployment_scale("d", ns)
    assert (scale.kind, scale.api_version, scale.spec.replicas) == ("Scale", "autoscaling/v1", 1)
    assert scale.status.selector == "app=d"
    patched = apps.patch_namespaced_deployment_scale("d", ns, {"spec": {"replicas": 3}})
    assert patched.spec.replicas == 3
    dep = apps.read_namespaced_deployment("d", ns)
    assert dep.spec.replicas == 3 and dep.metadata.generation == 2
    scale = apps.read_namespaced_deployment_scale("d", ns)
    scale.spec.replicas = 4
    assert apps.replace_namespaced_deployment_scale("d", ns, scale).spec.replicas == 4
    scale.spec.replicas = 5  # stale resourceVersion
    assert fails(apps.replace_namespaced_deployment_scale, "d", ns, scale)["reason"] == "Conflict"


# --- selectors --------------------------------------------------------------------------------

@pytest.mark.parametrize("selector, names", [
    ("tier=web", ["a", "b"]),
    ("tier==web", ["a", "b"]),
    ("tier!=web", ["c", "d"]),
    ("tier in (web,db)", ["a", "b", "c"]),
    ("tier notin (web)", ["c", "d"]),
    ("gpu", ["a", "c"]),
    ("!gpu", ["b", "d"]),
    ("tier=web,gpu", ["a"]),
    ("tier in (web, db),!gpu,env notin (prod)", ["b"]),
])
def test_label_selectors(core, ns, selector, names):
    for name, labels in {"a": {"tier": "web", "gpu": "1"}, "b": {"tier": "web", "env": "dev"},
                         "c": {"tier": "db", "gpu": "8"}, "d": {}}.items():
        core.create_namespaced_config_map(ns, {"metadata": {"name": name, "labels": labels}})
    found = core.list_namespaced_config_map(ns, label_selector=selector)
    assert [c.metadata.name for c in found.items] == names


def test_field_selectors(server, core, ns):
    core.create_namespace({"metadata": {"name": "y"}})
    core.create_namespaced_pod(ns, pod("p1", nodeName="n1"))
    core.create_namespaced_pod(ns, pod("p2", nodeName="n2"))
    core.create_namespaced_pod("y", pod("p3", nodeName="n1"))
    server.set_pod_ready(ns, "p1", True)

    def names(**kwargs) -> list[str]:
        return [p.metadata.name for p in core.list_pod_for_all_namespaces(**kwargs).items]

    assert names() == ["p1", "p2", "p3"]
    assert names(field_selector="spec.nodeName=n1") == ["p1", "p3"]
    assert names(field_selector="spec.nodeName==n1,metadata.namespace=y") == ["p3"]
    assert names(field_selector="status.phase!=Running") == ["p2", "p3"]
    assert names(field_selector="metadata.name=p2") == ["p2"]
    assert names(field_selector="metadata.namespace!=x", label_selector="") == ["p3"]
    bad = fails(core.list_namespaced_pod, ns, field_selector="spec.hostname=z")
    assert bad["reason"] == "BadRequest" and bad["message"] == "field label not supported: spec.hostname"
    assert fails(core.list_namespaced_config_map, ns, field_selector="status.phase=x")["code"] == 400
    assert [n.metadata.name for n in core.list_namespace(field_selector="status.phase=Active").items][:1] == ["default"]


# --- watch ------------------------------------------------------------------------------------

def watch_in_thread(fn, *args, until: int, **kwargs) -> tuple[threading.Thread, list]:
    """Collect (type, name) of watch events in a thread until `until` of them arrived."""
    events: list = []
    watch = kubernetes.watch.Watch()

    def run() -> None:
        for event in watch.stream(fn, *args, **kwargs):
            events.append((event["type"], event["object"].metadata.name, event["object"]))
            if len(events) >= until:
                watch.stop()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, events


def watching(server) -> bool:
    return any("watch=True" in path or "watch=true" in path for _, path, _ in server.requests)


def test_watch_streams_added_modified_deleted(server, core, ns):
    core.create_namespaced_config_map(ns, {"metadata": {"name": "old"}})
    thread, events = watch_in_thread(core.list_namespaced_config_map, ns, until=4, timeout_seconds=10)
    wait_for(lambda: watching(server))
    core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}})
    core.patch_namespaced_config_map("c", ns, {"data": {"a": "1"}})
    core.delete_namespaced_config_map("c", ns)
    thread.join(5)
    assert [(t, n) for t, n, _ in events] == [
        ("ADDED", "old"), ("ADDED", "c"), ("MODIFIED", "c"), ("DELETED", "c")]
    assert events[2][2].data == {"a": "1"}
    rvs = [int(o.metadata.resource_version) for _, _, o in events[1:]]
    assert rvs == sorted(rvs) and len(set(rvs)) == 3


def test_watch_resumes_from_a_resource_version_and_410_when_too_old(server, core, ns):
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}})
    core.patch_namespaced_config_map("c", ns, {"data": {"a": "1"}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "elsewhere"}})
    events = [(e["type"], e["object"].metadata.name) for e in kubernetes.watch.Watch().stream(
        core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=1)]
    assert events == [("ADDED", "c"), ("MODIFIED", "c")]
    server.compact()
    with pytest.raises(ApiException) as info:  # the client retries a 410 once, then raises
        for _ in kubernetes.watch.Watch().stream(core.list_namespaced_config_map, ns, resource_version=rv):
            pass
    assert info.value.status == 410


def test_watch_error_event_on_the_wire(server, ns):
    server.compact()
    headers = {"Authorization": f"Bearer {server.token}"}
    with httpx.stream("GET", f"{server.url}/api/v1/namespaces/{ns}/configmaps",
                      params={"watch": "true", "resourceVersion": "1"}, headers=headers) as r:
        assert r.status_code == 200 and r.headers["transfer-encoding"] == "chunked"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[0]["type"] == "ERROR"
    assert lines[0]["object"]["code"] == 410 and lines[0]["object"]["reason"] == "Expired"
    assert lines[0]["object"]["message"].startswith("too old resource version: 1")


def test_watch_timeout_seconds_ends_the_stream(core, ns):
    start = time.monotonic()
    events = list(kubernetes.watch.Watch().stream(core.list_namespaced_config_map, ns, timeout_seconds=1))
    assert events == [] and 0.9 < time.monotonic() - start < 3


def test_watch_with_a_selector_sees_objects_enter_and_leave_it(server, core, ns):
    core.create_namespaced_config_map(ns, {"metadata": {"name": "c", "labels": {"on": "yes"}}})
    thread, events = watch_in_thread(core.list_namespaced_config_map, ns, until=3,
                                     label_selector="on=yes", timeout_seconds=10)
    wait_for(lambda: watching(server))
    core.patch_namespaced_config_map("c", ns, {"metadata": {"labels": {"on": "no"}}})
    core.patch_namespaced_config_map("c", ns, {"metadata": {"labels": {"on": "yes"}}})
    thread.join(5)
    assert [(t, n) for t, n, _ in events] == [("ADDED", "c"), ("DELETED", "c"), ("ADDED", "c")]
    assert events[1][2].metadata.labels == {"on": "yes"}  # the last state that matched


def test_watch_bookmarks_and_many_concurrent_watchers(server, ns):
    headers = {"Authorization": f"Bearer {server.token}"}
    url = f"{server.url}/api/v1/namespaces/{ns}/configmaps"

    async def one(client: httpx.AsyncClient, i: int) -> list[dict]:
        params = {"watch": "1", "timeoutSeconds": "2", "allowWatchBookmarks": "true"} if i == 0 else \
            {"watch": "1", "timeoutSeconds": "1"}
        async with client.stream("GET", url, params=params, headers=headers) as r:
            return [json.loads(line) async for line in r.aiter_lines() if line]

    async def main() -> list[list[dict]]:
        async with httpx.AsyncClient(timeout=10) as client:
            tasks = [asyncio.create_task(one(client, i)) for i in range(20)]
            await asyncio.sleep(0.3)
            await asyncio.to_thread(server.create, {"apiVersion": "v1", "kind": "ConfigMap",
                                                    "metadata": {"name": "c", "namespace": ns}})
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert all([e["type"] for e in r if e["type"] != "BOOKMARK"] == ["ADDED"] for r in results)
    assert any(e["type"] == "BOOKMARK" for e in results[0])


def test_stop_ends_open_watches():
    server = FakeKubeAPIServer().start()
    api = kubernetes.config.new_client_from_config_dict(server.kubeconfig())
    thread, _ = watch_in_thread(CoreV1Api(api).list_namespace, until=100, timeout_seconds=30)
    wait_for(lambda: watching(server))
    start = time.monotonic()
    server.stop()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - start < 4
    api.close()


# --- controllers ------------------------------------------------------------------------------

def test_deployment_becomes_available_after_ready_delay(server, apps, ns):
    server.ready_delay = 0.3
    dep = apps.create_namespaced_deployment(ns, deployment(replicas=3))
    assert condition(dep, "Available") == "False" and dep.status.ready_replicas is None
    assert dep.status.unavailable_replicas == 3
    watch = kubernetes.watch.Watch()
    start = time.monotonic()
    for event in watch.stream(apps.list_namespaced_deployment, ns,
                              resource_version=dep.metadata.resource_version, timeout_seconds=5):
        assert event["type"] == "MODIFIED"
        ready = event["object"]
        break
    assert time.monotonic() - start > 0.15
    assert condition(ready, "Available") == "True"
    assert ready.status.ready_replicas == ready.status.available_replicas == 3
    assert next(c.reason for c in ready.status.conditions if c.type == "Available") == "MinimumReplicasAvailable"
    scaled = apps.patch_namespaced_deployment_scale("d", ns, {"spec": {"replicas": 5}})
    assert scaled.spec.replicas == 5
    assert condition(apps.read_namespaced_deployment("d", ns), "Available") == "False"
    wait_for(lambda: apps.read_namespaced_deployment("d", ns).status.available_replicas == 5)


def test_never_ready_deployments_stay_unavailable(server, apps, ns):
    server.never_ready.add((ns, "stuck"))
    apps.create_namespaced_deployment(ns, deployment("stuck"))
    apps.create_namespaced_deployment(ns, deployment("fine"))
    wait_for(lambda: apps.read_namespaced_deployment("fine", ns).status.available_replicas == 1)
    time.sleep(0.2)
    stuck = apps.read_namespaced_deployment("stuck", ns)
    assert condition(stuck, "Available") == "False" and stuck.status.available_replicas is None


def test_namespace_terminates_then_deletes_its_content(server, core, apps, ns):
    core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}})
    apps.create_namespaced_deployment(ns, deployment())
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    deleted = json.loads(core.delete_namespace(ns, _preload_content=False).data)  # the Namespace
    assert deleted["status"]["phase"] == "Terminating" and deleted["metadata"]["deletionTimestamp"]
    assert core.read_namespace(ns).status.phase == "Terminating"
    blocked = fails(core.create_namespaced_config_map, ns, {"metadata": {"name": "late"}})
    assert blocked["code"] == 403 and blocked["reason"] == "Forbidden"
    assert "because it is being terminated" in blocked["message"]
    assert fails(core.delete_namespace, ns)["reason"] == "Conflict"
    assert fails(core.delete_namespace, "default")["message"] == \
        'namespaces "default" is forbidden: this namespace may not be deleted'
    wait_for(lambda: server.get("Namespace", ns) is None)
    assert fails(core.read_namespace, ns)["code"] == 404
    assert server.list("ConfigMap", ns) == [] and server.list("Deployment", ns) == []
    events = [(e["type"], e["object"].metadata.name) for e in kubernetes.watch.Watch().stream(
        core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=1)]
    assert events == [("DELETED", "c")]


def test_finalizers_hold_a_delete_until_removed(core, ns):
    core.create_namespaced_config_map(ns, {"metadata": {"name": "c", "finalizers": ["x/y"]}})
    core.delete_namespaced_config_map("c", ns)
    held = core.read_namespaced_config_map("c", ns)
    assert held.metadata.deletion_timestamp and held.metadata.finalizers == ["x/y"]
    core.patch_namespaced_config_map("c", ns, {"metadata": {"finalizers": None}},
                                     _content_type="application/merge-patch+json")
    assert fails(core.read_namespaced_config_map, "c", ns)["code"] == 404


def test_dry_run_and_delete_collection(core, ns):
    core.create_namespaced_config_map(ns, {"metadata": {"name": "dry"}}, dry_run="All")
    assert core.list_namespaced_config_map(ns).items == []
    for name, tier in (("a", "web"), ("b", "web"), ("c", "db")):
        core.create_namespaced_config_map(ns, {"metadata": {"name": name, "labels": {"tier": tier}}})
    core.delete_collection_namespaced_config_map(ns, label_selector="tier=web")
    assert [c.metadata.name for c in core.list_namespaced_config_map(ns).items] == ["c"]


# --- authn / authz ----------------------------------------------------------------------------

def can_i(client, verb: str, resource: str, namespace: str, group: str = "") -> bool:
    review = AuthorizationV1Api(client).create_self_subject_access_review({"spec": {
        "resourceAttributes": {"verb": verb, "resource": resource, "group": group,
                               "namespace": namespace}}})
    return review.status.allowed


def test_self_subject_access_review_and_denied_requests(server, client, apps, core, ns):
    assert can_i(client, "create", "deployments", ns, "apps")
    server.deny("create", "deployments", group="apps", namespace=ns)
    server.deny("list", "nodes")
    assert not can_i(client, "create", "deployments", ns, "apps")
    assert can_i(client, "create", "deployments", "default", "apps")
    assert can_i(client, "get", "deployments", ns, "apps")
    forbidden = fails(apps.create_namespaced_deployment, ns, deployment())
    assert forbidden["reason"] == "Forbidden" and forbidden["code"] == 403
    assert forbidden["message"] == (f'deployments.apps is forbidden: User "fake-user" cannot create '
                                    f'resource "deployments" in API group "apps" in the namespace "{ns}"')
    apps.create_namespaced_deployment("default", deployment())
    assert fails(core.list_node)["message"].endswith("at the cluster scope")
    assert apps.list_namespaced_deployment(ns).items == []


def test_requests_without_the_token_get_401(server):
    r = httpx.get(f"{server.url}/api/v1/namespaces")
    assert r.status_code == 401
    assert r.json() == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
    config = server.kubeconfig()
    config["users"][0]["user"]["token"] = "wrong"
    api = kubernetes.config.new_client_from_config_dict(config)
    assert fails(CoreV1Api(api).list_namespace)["reason"] == "Unauthorized"
    api.close()


# --- faults -----------------------------------------------------------------------------------

def test_fail_next_answers_statuses_then_recovers(server, core, ns):
    server.fail_next(2, status=503, method="GET", path=r"/configmaps$")
    for _ in range(2):
        failed = fails(core.list_namespaced_config_map, ns)
        assert failed["code"] == 503 and failed["reason"] == "ServiceUnavailable"
    assert core.list_namespaced_config_map(ns).items == []
    server.fail_next(1, status=500, method="POST")
    assert fails(core.create_namespaced_config_map, ns, {"metadata": {"name": "c"}})["code"] == 500
    assert server.get("ConfigMap", "c", ns) is None  # a fault changes nothing
    server.fail_next(1, status=409)
    conflict = fails(core.create_namespaced_config_map, ns, {"metadata": {"name": "c"}})
    assert conflict["reason"] == "Conflict"
    core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}})
    statuses = [(m, s) for m, p, s in server.requests if "/configmaps" in p]
    assert statuses == [("GET", 503), ("GET", 503), ("GET", 200), ("POST", 500), ("POST", 409),
                        ("POST", 201)]


def test_slow_next_delays_matching_requests(server, core, ns):
    server.slow_next(1, 0.5, path="/configmaps")
    start = time.monotonic()
    core.list_namespace()
    assert time.monotonic() - start < 0.3
    core.list_namespaced_config_map(ns)
    assert time.monotonic() - start >= 0.5
    start = time.monotonic()
    core.list_namespaced_config_map(ns)
    assert time.monotonic() - start < 0.3


def test_requests_are_recorded(server, core, ns):
    server.requests.clear()
    core.list_namespaced_config_map(ns, label_selector="a=b")
    assert server.requests == [("GET", f"/api/v1/namespaces/{ns}/configmaps?labelSelector=a%3Db", 200)]
    assert not [r for r in server.requests if r[0] == "POST"]


# --- the Python state methods -----------------------------------------------------------------

def test_state_methods_bypass_the_api_and_emit_events(server, core, ns):
    server.requests.clear()
    server.deny("*", "*")
    server.fail_next(5)
    made = server.create({"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": "c", "namespace": ns}, "data": {"a": "1"}})
    assert made["metadata"]["uid"] and made["metadata"]["generation"] == 1
    with pytest.raises(KubeAPIError) as dup:
        server.create(made)
    assert dup.value.code == 409
    updated = server.update({**made, "data": {"a": "2"}})
    assert int(updated["metadata"]["resourceVersion"]) > int(made["metadata"]["resourceVersion"])
    assert server.get("ConfigMap", "c", ns)["data"] == {"a": "2"}
    assert [c["metadata"]["name"] for c in server.list("ConfigMap")] == ["c"]
    server.delete("ConfigMap", "c", ns)
    assert server.get("ConfigMap", "c", ns) is None
    node = server.add_node("gpu-1", labels={"k": "v"}, capacity={"nvidia.com/gpu": "8"}, ready=False)
    assert node["status"]["allocatable"] == {"nvidia.com/gpu": "8"}
    assert node["status"]["conditions"][0]["status"] == "False"
    server.create({"apiVersion": "v1", "kind": "Pod", **pod("p"),
                   "metadata": {"name": "p", "namespace": ns}})
    ready = server.set_pod_ready(ns, "p", True)
    assert ready["status"]["phase"] == "Running"
    assert {c["type"]: c["status"] for c in ready["status"]["conditions"]}["Ready"] == "True"
    assert ready["status"]["containerStatuses"][0]["ready"] is True
    assert server.set_pod_ready(ns, "p", False)["status"]["containerStatuses"][0]["ready"] is False
    assert server.requests == []
    server.reset()
    events = [(e["type"], e["object"].metadata.name) for e in kubernetes.watch.Watch().stream(
        core.list_namespaced_pod, "default", timeout_seconds=1)]
    assert events == []
    rv = core.list_namespaced_pod("default").metadata.resource_version
    server.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "q"}, **pod("q")})
    server.set_pod_ready("default", "q", True)
    server.delete("Pod", "q", "default")
    events = [(e["type"], e["object"].metadata.name) for e in kubernetes.watch.Watch().stream(
        core.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=1)]
    assert events == [("ADDED", "q"), ("MODIFIED", "q"), ("DELETED", "q")]


# --- other clients ----------------------------------------------------------------------------

def test_airflow_kubernetes_hook(server, monkeypatch):
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    monkeypatch.setenv("AIRFLOW_CONN_FAKE_KUBE", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config": json.dumps(server.kubeconfig())}}))
    hook = KubernetesHook(conn_id="fake_kube")
    hook.core_v1_client.create_namespace({"metadata": {"name": "from-hook"}})
    assert server.get("Namespace", "from-hook")["status"]["phase"] == "Active"
    assert "from-hook" in [n.metadata.name for n in hook.core_v1_client.list_namespace().items]


def test_kubernetes_asyncio_client(server, ns):
    import kubernetes_asyncio

    async def main() -> list[tuple[str, str]]:
        api = await kubernetes_asyncio.config.new_client_from_config_dict(server.kubeconfig())
        async with api:
            core = kubernetes_asyncio.client.CoreV1Api(api)
            await core.create_namespaced_config_map(ns, {"metadata": {"name": "c"}})
            watch = kubernetes_asyncio.watch.Watch()
            return [(e["type"], e["object"].metadata.name)
                    async for e in watch.stream(core.list_namespaced_config_map, ns, timeout_seconds=1)]

    assert asyncio.run(main()) == [("ADDED", "c")]


def test_https_kubeconfig_with_the_python_client(server):
    api = kubernetes.config.new_client_from_config_dict(server.kubeconfig(tls=True))
    assert [n.metadata.name for n in CoreV1Api(api).list_namespace().items][0] == "default"
    api.close()
    assert server.kubeconfig(tls=True)["clusters"][0]["cluster"]["server"] == server.https_url


# --- kubectl ----------------------------------------------------------------------------------


def test_kubectl_basic_commands(server, kubectl):
    server.add_node("n1", labels={"k": "v"})
    server.add_node("n2")
    listed = kubectl("get", "ns").stdout.split("\n")
    assert listed[0].split() == ["NAME", "STATUS", "AGE"] and listed[1].split()[:2] == ["default", "Active"]
    assert kubectl("create", "namespace", "x").stdout.strip() == "namespace/x created"
    kubectl("-n", "x", "create", "configmap", "c", "--from-literal=a=b")
    cm = json.loads(kubectl("-n", "x", "get", "cm", "c", "-o", "json").stdout)
    assert cm["data"] == {"a": "b"} and cm["metadata"]["namespace"] == "x"
    assert server.get("ConfigMap", "c", "x")["data"] == {"a": "b"}
    kubectl("-n", "x", "create", "secret", "generic", "s", "--from-literal=k=v")  # protobuf bodies
    assert server.get("Secret", "s", "x")["data"] == {"k": "dg=="}
    nodes = kubectl("get", "nodes", "-l", "k=v", "-o", "name").stdout.split()
    assert nodes == ["node/n1"]
    assert kubectl("-n", "x", "delete", "cm", "c").stdout.strip() == 'configmap "c" deleted'
    assert server.get("ConfigMap", "c", "x") is None
    missing = kubectl("-n", "x", "get", "cm", "c", check=False)
    assert missing.returncode == 1 and 'configmaps "c" not found' in missing.stderr


def test_kubectl_auth_can_i_follows_deny(server, kubectl):
    kubectl("create", "namespace", "x")
    assert kubectl("auth", "can-i", "create", "deployments", "-n", "x").stdout.strip() == "yes"
    server.deny("create", "deployments", group="apps", namespace="x")
    no = kubectl("auth", "can-i", "create", "deployments", "-n", "x", check=False)
    assert no.returncode == 1 and no.stdout.strip() == "no"
    assert kubectl("auth", "can-i", "create", "deployments", "-n", "default").stdout.strip() == "yes"


def test_kubectl_scale_and_apply(server, kubectl):
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}})
    server.create({**deployment(), "metadata": {"name": "d", "namespace": "x"}})
    assert kubectl("-n", "x", "scale", "deployment", "d", "--replicas=3").stdout.strip() == \
        "deployment.apps/d scaled"
    assert server.get("Deployment", "d", "x")["spec"]["replicas"] == 3
    manifest = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: applied, namespace: x}\ndata: {a: '%s'}\n"
    assert kubectl("apply", "-f", "-", stdin=manifest % 1).stdout.strip() == "configmap/applied created"
    assert kubectl("apply", "-f", "-", stdin=manifest % 2).stdout.strip() == "configmap/applied configured"
    applied = server.get("ConfigMap", "applied", "x")
    assert applied["data"] == {"a": "2"}
    assert "kubectl.kubernetes.io/last-applied-configuration" in applied["metadata"]["annotations"]
    assert [m for m, p, _ in server.requests if "/configmaps/applied" in p and m != "GET"] == ["PATCH"]


def test_kubectl_over_plain_http_sends_no_token(server, tmp_path):
    """client-go only sends credentials over TLS: a plain-http kubeconfig gets 401 here, as it
    would from a real API server; hence write_kubeconfig() writes the https one by default."""
    config = server.write_kubeconfig(tmp_path / "kubeconfig", tls=False)
    done = subprocess.run([KUBECTL, "--kubeconfig", str(config), "--cache-dir", str(tmp_path),
                           "get", "ns"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 1 and "provide credentials" in done.stderr
    assert {s for _, _, s in server.requests} == {401}
