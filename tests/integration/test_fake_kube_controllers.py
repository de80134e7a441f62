"""The controllers of the fake Kubernetes API server (tests/fakes/kube_controllers.py) against
the real `kubernetes` client and kubectl: Deployment rollouts through ReplicaSets, the progress
deadline, rollback, scaling, garbage collection and namespace finalization.

Each test names the Kubernetes documentation or source it holds the fake to. One server for
the module, `reset()` before each test; pods start 0.3 s after they are created.
"""

from __future__ import annotations

import json
import time

import kubernetes
import pytest
from kubernetes.client import AppsV1Api, CoreV1Api
from kubernetes.client.rest import ApiException

from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.integration.fake_kube_support import (  # noqa: F401 - fixtures
    apps,
    client,
    core,
    fresh,
    kubectl,
    ns,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

READY_DELAY = 0.3
DEPLOYMENT_DOC = "https://kubernetes.io/docs/concepts/workloads/controllers/deployment/"
REVISION = "deployment.kubernetes.io/revision"


@pytest.fixture(scope="module")
def server():
    with FakeKubeAPIServer(ready_delay=READY_DELAY, terminate_delay=0.2) as server:
        yield server


def deployment(name: str = "d", replicas: int = 1, image: str = "nginx:1", **spec) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "main", "image": image}]}},
                     **spec}}


def set_image(apps: AppsV1Api, ns: str, image: str, name: str = "d") -> dict:
    """What `kubectl set image` sends: a strategic merge patch of the container."""
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "main", "image": image}]}}}}
    return apps.api_client.sanitize_for_serialization(
        apps.patch_namespaced_deployment(name, ns, patch))


def wait_for(predicate, timeout: float = 8.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def status(server, name: str = "d", ns: str = "x") -> dict:
    return server.get("Deployment", name, ns)["status"]


def conditions(obj_status: dict) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"])
            for c in obj_status.get("conditions", [])}


def counts(obj_status: dict) -> dict:
    return {k: v for k, v in obj_status.items() if k not in ("conditions", "observedGeneration")}


def replica_sets(server, ns: str = "x") -> dict[str, dict]:
    return {rs["metadata"]["name"]: rs for rs in server.list("ReplicaSet", ns)}


def complete(server, name: str = "d") -> dict | None:
    s = status(server, name)
    return s if conditions(s).get("Progressing", ("",) * 3)[1] == "NewReplicaSetAvailable" \
        and s.get("updatedReplicas") == s.get("replicas") == s.get("availableReplicas") else None


def replay(list_fn, *args: str, since: str) -> list[tuple[str, dict]]:
    """Every watch event since resourceVersion `since`, as a client resuming a watch gets them."""
    stream = kubernetes.watch.Watch().stream(list_fn, *args, resource_version=since,
                                             timeout_seconds=1)
    return [(e["type"], e["raw_object"]) for e in stream]


# --- Deployments and their ReplicaSets ---------------------------------------------------------

def test_a_deployment_runs_its_pods_through_one_replicaset_named_by_the_template_hash(
        server, apps, ns):
    """Deployment doc, "Creating a Deployment": the ReplicaSet is named
    [DEPLOYMENT-NAME]-[HASH], the HASH is the pod-template-hash label on the ReplicaSet, its
    selector and its pods; ownerReferences point at the owner (docs: owners and dependents).
    Status per pkg/controller/deployment/sync.go calculateStatus and progress.go: before the
    pods are ready Available is False / MinimumReplicasUnavailable and Progressing True /
    ReplicaSetUpdated; then Available / NewReplicaSetAvailable, zero counts omitted."""
    made = apps.api_client.sanitize_for_serialization(
        apps.create_namespaced_deployment(ns, deployment(replicas=3)))
    (rs_name, rs), = replica_sets(server).items()
    pod_hash = rs["metadata"]["labels"]["pod-template-hash"]
    assert rs_name == f"d-{pod_hash}" and 8 <= len(pod_hash) <= 10
    assert rs["spec"]["selector"]["matchLabels"] == {"app": "d", "pod-template-hash": pod_hash}
    assert rs["spec"]["template"]["metadata"]["labels"] == {"app": "d",
                                                            "pod-template-hash": pod_hash}
    owner = rs["metadata"]["ownerReferences"]
    assert owner == [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "d",
                      "uid": made["metadata"]["uid"], "controller": True,
                      "blockOwnerDeletion": True}]
    assert rs["metadata"]["annotations"] == {REVISION: "1",
                                             "deployment.kubernetes.io/desired-replicas": "3",
                                             "deployment.kubernetes.io/max-replicas": "4"}
    assert made["metadata"]["annotations"] == {REVISION: "1"}
    assert made["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {
        "maxUnavailable": "25%", "maxSurge": "25%"}}  # the apps/v1 defaults
    assert (made["spec"]["progressDeadlineSeconds"], made["spec"]["revisionHistoryLimit"]) == \
        (600, 10)
    assert counts(made["status"]) == {"replicas": 3, "updatedReplicas": 3,
                                      "unavailableReplicas": 3}
    assert made["status"]["observedGeneration"] == 1
    assert conditions(made["status"]) == {
        "Available": ("False", "MinimumReplicasUnavailable",
                      "Deployment does not have minimum availability."),
        "Progressing": ("True", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.')}

    pods = server.list("Pod", ns)
    assert len(pods) == 3 and all(p["metadata"]["name"].startswith(f"{rs_name}-") for p in pods)
    assert all(p["metadata"]["labels"] == {"app": "d", "pod-template-hash": pod_hash}
               and p["metadata"]["ownerReferences"][0]["name"] == rs_name
               and p["status"]["phase"] == "Pending" for p in pods)

    done = wait_for(lambda: complete(server))
    assert counts(done) == {"replicas": 3, "updatedReplicas": 3, "readyReplicas": 3,
                            "availableReplicas": 3}
    assert [c["type"] for c in done["conditions"]] == ["Available", "Progressing"]
    assert conditions(done) == {
        "Available": ("True", "MinimumReplicasAvailable", "Deployment has minimum availability."),
        "Progressing": ("True", "NewReplicaSetAvailable",
                        f'ReplicaSet "{rs_name}" has successfully progressed.')}
    ready = server.list("Pod", ns)
    assert all(p["status"]["phase"] == "Running" and p["status"]["podIP"] and
               {c["type"]: c["status"] for c in p["status"]["conditions"]}["Ready"] == "True"
               for p in ready)
    assert replica_sets(server)[rs_name]["status"] == {
        "replicas": 3, "fullyLabeledReplicas": 3, "readyReplicas": 3, "availableReplicas": 3,
        "observedGeneration": 1}


def test_a_rolling_update_stays_within_max_surge_and_max_unavailable(server, apps, ns):
    """Deployment doc, "Updating a Deployment" / "Rolling Update Deployment": at least 75% of
    the desired pods stay available and at most 125% exist (maxUnavailable 25% rounds down,
    maxSurge 25% rounds up); old replicas go only as new ones become available; the old
    ReplicaSet is kept at 0 for rollbacks and the new one takes revision 2."""
    apps.create_namespaced_deployment(ns, deployment(replicas=4))
    wait_for(lambda: complete(server))
    (old_name,) = replica_sets(server)
    since = apps.list_namespaced_deployment(ns).metadata.resource_version
    set_image(apps, ns, "nginx:2")
    mid = status(server)
    assert counts(mid) == {"replicas": 5, "updatedReplicas": 2, "readyReplicas": 3,
                           "availableReplicas": 3, "unavailableReplicas": 2}
    assert conditions(mid)["Available"][0] == "True"  # 3 >= 4 - maxUnavailable(1)
    wait_for(lambda: complete(server) and status(server).get("replicas") == 4)

    for _, dep in replay(apps.list_namespaced_deployment, ns, since=since):
        s = dep["status"]
        assert s.get("availableReplicas", 0) >= 3, s  # never below 4 - 1
        assert conditions(s)["Available"][0] == "True"
    sizes: dict[str, int] = {}
    for _, rs in replay(apps.list_namespaced_replica_set, ns, since=since):
        sizes[rs["metadata"]["name"]] = rs["spec"]["replicas"]
        assert sum(sizes.values()) <= 5  # never above 4 + maxSurge(1)
    rss = replica_sets(server)
    (new_name,) = set(rss) - {old_name}
    assert (rss[old_name]["spec"]["replicas"], rss[new_name]["spec"]["replicas"]) == (0, 4)
    assert (rss[old_name]["metadata"]["annotations"][REVISION],
            rss[new_name]["metadata"]["annotations"][REVISION]) == ("1", "2")
    assert server.get("Deployment", "d", ns)["metadata"]["annotations"][REVISION] == "2"
    assert {p["spec"]["containers"][0]["image"] for p in server.list("Pod", ns)} == {"nginx:2"}


def test_kubectl_rollout_status_reports_a_good_rollout(server, apps, ns, kubectl):
    """kubectl rollout status (staging/src/k8s.io/kubectl/pkg/polymorphichelpers/
    rollout_status.go) against the fake: it watches the Deployment until updatedReplicas,
    replicas and availableReplicas agree for the observed generation."""
    server.ready_delay = 2.0  # kubectl must see the rollout in progress
    apps.create_namespaced_deployment(ns, deployment(replicas=2))
    set_image(apps, ns, "nginx:2")
    done = kubectl("-n", "x", "rollout", "status", "deployment/d", "--timeout=20s")
    assert done.stdout.strip().splitlines()[-1] == 'deployment "d" successfully rolled out'
    assert "Waiting for deployment" in done.stdout  # it did wait for the new pods
    rows = [line.split() for line in kubectl("-n", "x", "get", "rs").stdout.strip().splitlines()]
    assert rows[0] == ["NAME", "DESIRED", "CURRENT", "READY", "AGE"]
    assert sorted(row[1:4] for row in rows[1:]) == [["0", "0", "0"], ["2", "2", "2"]]


def test_an_image_that_never_starts_holds_the_rollout_until_the_progress_deadline(
        server, apps, ns, kubectl):
    """Deployment doc, "Failed Deployment" / "Progress Deadline Seconds": a rollout stuck on
    an image that cannot be pulled keeps the old replica available (maxUnavailable 25% of 1
    rounds to 0), then reports Progressing False / ProgressDeadlineExceeded and
    `kubectl rollout status` exits non-zero with "exceeded its progress deadline"."""
    server.bad_images.add("nginx:broken")
    # 3 s: the deadline counts from a lastUpdateTime cut to the second, so it can pass up to a
    # second early; the 1 s `rollout status` below must end before it
    apps.create_namespaced_deployment(ns, deployment(progressDeadlineSeconds=3))
    wait_for(lambda: complete(server))
    (old_name,) = replica_sets(server)
    set_image(apps, ns, "nginx:broken")
    (new_name,) = set(replica_sets(server)) - {old_name}
    stuck = status(server)
    assert counts(stuck) == {"replicas": 2, "updatedReplicas": 1, "readyReplicas": 1,
                             "availableReplicas": 1, "unavailableReplicas": 1}
    assert conditions(stuck) == {
        "Available": ("True", "MinimumReplicasAvailable", "Deployment has minimum availability."),
        "Progressing": ("True", "ReplicaSetUpdated", f'ReplicaSet "{new_name}" is progressing.')}

    waiting = kubectl("-n", "x", "rollout", "status", "deployment/d", "--timeout=1s", check=False)
    assert waiting.returncode == 1
    assert 'Waiting for deployment "d" rollout to finish: 1 old replicas are pending ' \
           "termination..." in waiting.stdout
    pods = {line.split()[0]: line.split()[1:3] for line in
            kubectl("-n", "x", "get", "pods", "--no-headers").stdout.strip().splitlines()}
    assert sorted(pods.values()) == [["0/1", "ImagePullBackOff"], ["1/1", "Running"]]

    failed = wait_for(lambda: conditions(status(server))["Progressing"][0] == "False"
                      and status(server), timeout=6)
    assert conditions(failed)["Progressing"] == (
        "False", "ProgressDeadlineExceeded", f'ReplicaSet "{new_name}" has timed out progressing.')
    assert conditions(failed)["Available"][0] == "True"
    assert counts(failed) == counts(stuck)  # the old pod still serves
    exceeded = kubectl("-n", "x", "rollout", "status", "deployment/d", "--timeout=10s", check=False)
    assert exceeded.returncode == 1
    assert exceeded.stderr.strip() == 'error: deployment "d" exceeded its progress deadline'


def test_kubectl_rollout_undo_goes_back_to_the_previous_replicaset(server, apps, ns, kubectl):
    """Deployment doc, "Rolling Back a Deployment": `kubectl rollout undo` puts the previous
    revision's template back; the controller reuses that ReplicaSet (no new one), gives it the
    newest revision (the old number goes to deployment.kubernetes.io/revision-history, as
    deployment_util.go SetNewReplicaSetAnnotations does), scales the bad one to 0 and the
    rollout completes again."""
    server.bad_images.add("nginx:broken")
    apps.create_namespaced_deployment(ns, deployment(replicas=2, progressDeadlineSeconds=2))
    wait_for(lambda: complete(server))
    (good,) = replica_sets(server)
    set_image(apps, ns, "nginx:broken")
    wait_for(lambda: conditions(status(server))["Progressing"][1] == "ProgressDeadlineExceeded",
             timeout=6)
    (bad,) = set(replica_sets(server)) - {good}

    assert kubectl("-n", "x", "rollout", "undo", "deployment/d").stdout.strip() == \
        "deployment.apps/d rolled back"
    assert kubectl("-n", "x", "rollout", "status", "deployment/d", "--timeout=20s").returncode == 0
    rss = replica_sets(server)
    assert set(rss) == {good, bad}
    assert (rss[good]["spec"]["replicas"], rss[bad]["spec"]["replicas"]) == (2, 0)
    assert rss[good]["metadata"]["annotations"][REVISION] == "3"
    assert rss[good]["metadata"]["annotations"]["deployment.kubernetes.io/revision-history"] \
        == "1"
    dep = server.get("Deployment", "d", ns)
    assert dep["metadata"]["annotations"][REVISION] == "3"
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1"
    assert conditions(dep["status"])["Progressing"] == (
        "True", "NewReplicaSetAvailable", f'ReplicaSet "{good}" has successfully progressed.')
    assert counts(dep["status"]) == {"replicas": 2, "updatedReplicas": 2, "readyReplicas": 2,
                                     "availableReplicas": 2}


def test_never_ready_pods_leave_new_replicas_not_updated(server, apps, ns, kubectl):
    """`never_ready` is a readiness probe that never passes: the new pods run but are not
    Ready, so with 3 replicas (maxSurge 1, maxUnavailable 0) only one new replica exists and
    kubectl prints its "N out of M new replicas have been updated" line (rollout_status.go)."""
    apps.create_namespaced_deployment(ns, deployment(replicas=3))
    wait_for(lambda: complete(server))
    server.never_ready.add((ns, "d"))
    set_image(apps, ns, "nginx:2")
    waiting = kubectl("-n", "x", "rollout", "status", "deployment/d", "--timeout=1s", check=False)
    assert waiting.returncode == 1
    assert 'Waiting for deployment "d" rollout to finish: 1 out of 3 new replicas have been ' \
           "updated..." in waiting.stdout
    new_pod = next(p for p in server.list("Pod", ns)
                   if p["spec"]["containers"][0]["image"] == "nginx:2")
    assert new_pod["status"]["phase"] == "Running"
    ready = {c["type"]: c for c in new_pod["status"]["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"], ready["message"]) == (
        "False", "ContainersNotReady", "containers with unready status: [main]")
    assert counts(status(server)) == {"replicas": 4, "updatedReplicas": 1, "readyReplicas": 3,
                                      "availableReplicas": 3, "unavailableReplicas": 1}


def test_scaling_resizes_the_current_replicaset_and_removes_pending_pods_first(
        server, apps, ns):
    """Deployment doc, "Scaling a Deployment": a replicas change alone resizes the current
    ReplicaSet (no new one, no new revision); ReplicaSet doc, "Scaling a ReplicaSet": when
    scaling down, pending pods go first, then the more recently created ones."""
    apps.create_namespaced_deployment(ns, deployment(replicas=2))
    wait_for(lambda: complete(server))
    first = {p["metadata"]["name"] for p in server.list("Pod", ns)}
    scaled = apps.patch_namespaced_deployment_scale("d", ns, {"spec": {"replicas": 4}})
    assert scaled.spec.replicas == 4 and scaled.status.replicas == 4
    (rs,) = replica_sets(server).values()
    assert rs["spec"]["replicas"] == 4 and rs["metadata"]["annotations"][REVISION] == "1"
    assert rs["metadata"]["annotations"]["deployment.kubernetes.io/desired-replicas"] == "4"
    s = status(server)
    assert counts(s) == {"replicas": 4, "updatedReplicas": 4, "readyReplicas": 2,
                         "availableReplicas": 2, "unavailableReplicas": 2}
    assert conditions(s)["Available"][:2] == ("False", "MinimumReplicasUnavailable")  # 2 < 4-1
    assert conditions(s)["Progressing"][1] == "NewReplicaSetAvailable"  # not a rollout

    apps.patch_namespaced_deployment("d", ns, {"spec": {"replicas": 1}})
    (survivor,) = server.list("Pod", ns)
    assert survivor["metadata"]["name"] in first and survivor["status"]["phase"] == "Running"
    assert len(replica_sets(server)) == 1
    assert conditions(status(server))["Available"][0] == "True"


def test_recreate_removes_every_old_pod_before_creating_new_ones(server, apps, ns):
    """Deployment doc, "Recreate Deployment": all existing pods are killed before new ones are
    created (pkg/controller/deployment/recreate.go)."""
    apps.create_namespaced_deployment(ns, deployment(replicas=2, strategy={"type": "Recreate"}))
    wait_for(lambda: complete(server))
    since = apps.list_namespaced_deployment(ns).metadata.resource_version
    set_image(apps, ns, "nginx:2")
    wait_for(lambda: complete(server) and status(server).get("replicas") == 2)
    running: dict[str, str] = {}
    for kind, pod in replay(CoreV1Api(apps.api_client).list_namespaced_pod, ns, since=since):
        name, image = pod["metadata"]["name"], pod["spec"]["containers"][0]["image"]
        if kind == "DELETED":
            running.pop(name, None)
        else:
            running[name] = image
        assert len(set(running.values())) <= 1, running  # never old and new together
    assert set(running.values()) == {"nginx:2"} and len(running) == 2


def test_pausing_holds_a_template_change_until_resumed(server, apps, ns, kubectl):
    """Deployment doc, "Pausing and Resuming a rollout of a Deployment": while paused a
    template change starts no rollout and Progressing is Unknown / DeploymentPaused
    (sync.go checkPausedConditions); resuming rolls it out."""
    apps.create_namespaced_deployment(ns, deployment())
    wait_for(lambda: complete(server))
    assert kubectl("-n", "x", "rollout", "pause", "deployment/d").stdout.strip() == "deployment.apps/d paused"
    set_image(apps, ns, "nginx:2")
    assert len(replica_sets(server)) == 1
    assert conditions(status(server))["Progressing"] == ("Unknown", "DeploymentPaused",
                                                          "Deployment is paused")
    kubectl("-n", "x", "rollout", "resume", "deployment/d")
    wait_for(lambda: complete(server) and len(replica_sets(server)) == 2)


# --- garbage collection -----------------------------------------------------------------------

def test_deleting_a_deployment_deletes_its_replicasets_and_pods_unless_orphaned(
        server, apps, ns):
    """Garbage collection doc (https://kubernetes.io/docs/concepts/architecture/
    garbage-collection/), "Cascading deletion": background deletion removes the dependents;
    propagationPolicy Orphan leaves them without the ownerReference."""
    apps.create_namespaced_deployment(ns, deployment("gone", replicas=2))
    apps.create_namespaced_deployment(ns, deployment("kept", replicas=2))
    apps.delete_namespaced_deployment("gone", ns)
    apps.delete_namespaced_deployment("kept", ns, propagation_policy="Orphan")
    (rs,) = server.list("ReplicaSet", ns)
    assert rs["metadata"]["name"].startswith("kept-")
    assert "ownerReferences" not in rs["metadata"]  # omitted once empty, as the real server does
    pods = server.list("Pod", ns)
    assert len(pods) == 2 and all(p["metadata"]["name"].startswith("kept-") for p in pods)


# --- namespace finalization -------------------------------------------------------------------

def ns_conditions(server, name: str = "x") -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"])
            for c in server.get("Namespace", name)["status"].get("conditions", [])}


def test_a_namespace_stays_terminating_while_content_with_finalizers_remains(
        server, apps, core, ns):
    """Finalizers doc (https://kubernetes.io/docs/concepts/overview/working-with-objects/
    finalizers/): an object with finalizers is only marked for deletion; the namespace
    controller (pkg/controller/namespace/deletion, status_condition_utils.go) deletes the rest,
    reports what remains in the five deletion conditions ("pods." / "configmaps." for the core
    group) and keeps the `kubernetes` finalizer until the content is gone."""
    hold = {"finalizers": ["example.com/hold"]}
    apps.create_namespaced_deployment(ns, {**deployment(), "metadata": {"name": "d", **hold}})
    core.create_namespaced_config_map(ns, {"metadata": {"name": "held", **hold}})
    core.create_namespaced_config_map(ns, {"metadata": {"name": "free"}})
    core.delete_namespace(ns)
    wait_for(lambda: "NamespaceContentRemaining" in ns_conditions(server))
    terminating = server.get("Namespace", ns)
    assert terminating["status"]["phase"] == "Terminating"
    assert terminating["spec"]["finalizers"] == ["kubernetes"]
    assert ns_conditions(server) == {
        "NamespaceDeletionDiscoveryFailure": (
            "False", "ResourcesDiscovered", "All resources successfully discovered"),
        "NamespaceDeletionGroupVersionParsingFailure": (
            "False", "ParsedGroupVersions", "All legacy kube types successfully parsed"),
        "NamespaceDeletionContentFailure": (
            "False", "ContentDeleted",
            "All content successfully deleted, may be waiting on finalization"),
        "NamespaceContentRemaining": (
            "True", "SomeResourcesRemain", "Some resources are remaining: configmaps. has 1 "
            "resource instances, deployments.apps has 1 resource instances"),
        "NamespaceFinalizersRemaining": (
            "True", "SomeFinalizersRemain", "Some content in the namespace has finalizers "
            "remaining: example.com/hold in 2 resource instances")}
    held = server.get("Deployment", "d", ns)
    assert held["metadata"]["deletionTimestamp"]
    assert server.list("ReplicaSet", ns) == [] and server.list("Pod", ns) == []
    assert [c["metadata"]["name"] for c in server.list("ConfigMap", ns)] == ["held"]

    unhold = {"metadata": {"finalizers": None}}
    apps.patch_namespaced_deployment("d", ns, unhold, _content_type="application/merge-patch+json")
    wait_for(lambda: ns_conditions(server)["NamespaceContentRemaining"] == (
        "True", "SomeResourcesRemain", "Some resources are remaining: configmaps. has 1 "
        "resource instances"))
    since = core.list_namespace().metadata.resource_version
    core.patch_namespaced_config_map("held", ns, unhold,
                                     _content_type="application/merge-patch+json")
    wait_for(lambda: server.get("Namespace", ns) is None)
    events = [(kind, obj) for kind, obj in replay(core.list_namespace, since=since)
              if obj["metadata"]["name"] == ns]
    assert [kind for kind, _ in events] == ["MODIFIED", "DELETED"]
    last = {c["type"]: (c["status"], c["reason"]) for c in events[0][1]["status"]["conditions"]}
    assert last["NamespaceContentRemaining"] == last["NamespaceFinalizersRemaining"] == (
        "False", "ContentRemoved")
    with pytest.raises(ApiException) as gone:
        core.read_namespace(ns)
    assert gone.value.status == 404


def test_delete_collection_marks_objects_with_finalizers(server, core, ns):
    """Finalizers doc: deleting an object with finalizers sets its deletionTimestamp and leaves
    it in place; a collection delete does the same to each object."""
    core.create_namespaced_config_map(ns, {"metadata": {"name": "a", "finalizers": ["x/y"]}})
    core.create_namespaced_config_map(ns, {"metadata": {"name": "b"}})
    core.delete_collection_namespaced_config_map(ns)
    (left,) = server.list("ConfigMap", ns)
    assert left["metadata"]["name"] == "a" and left["metadata"]["deletionTimestamp"]


def test_the_deployment_status_is_json_with_zero_counts_omitted(server, apps, ns):
    """apps/v1 DeploymentStatus fields are all omitempty: a fresh Deployment of 0 replicas has
    no counts at all, only observedGeneration and the conditions (complete at once)."""
    apps.create_namespaced_deployment(ns, deployment(replicas=0))
    raw = json.loads(apps.read_namespaced_deployment("d", ns, _preload_content=False).data)
    assert set(raw["status"]) == {"observedGeneration", "conditions"}
    assert conditions(raw["status"])["Progressing"][1] == "NewReplicaSetAvailable"
