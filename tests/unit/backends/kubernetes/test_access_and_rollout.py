"""The permission check read off the manifests, rollout status as kubectl judges it, and the
changes an update may not make (no API server needed)."""

from __future__ import annotations

import copy

import pytest

from airfleet.backends.kubernetes import access
from airfleet.backends.kubernetes import manifests as m
from airfleet.backends.kubernetes.backend import KubernetesBackend, rollout
from airfleet.errors import InvalidRequest
from airfleet.resources import Cluster, ClusterSpec

LOGIN = {"url": "registry.example:5000", "username": "fleet", "password": "pw"}


def cluster(caches=(), **kubernetes) -> Cluster:
    return Cluster.model_validate({"metadata": {"name": "llm-a"}, "spec": {
        "type": "kubernetes", "provider": "existing", "model_caches": list(caches),
        "config": {"kubernetes": {"credential": {"airflow_conn_id": "k8s"}, **kubernetes}}}})


def described(permissions) -> set[str]:
    return {p.describe("ns") for p in permissions}


def test_every_grant_of_the_role_is_required_so_the_role_can_be_created():
    objects = m.desired_objects(cluster(), LOGIN)
    [role] = [o for o in objects if o["kind"] == "Role"]
    needed = described(access.required(objects, ()))
    for rule in role["rules"]:
        for resource in rule["resources"]:
            for verb in rule["verbs"]:
                assert f"{verb} {resource} (in namespace ns)" in needed
    assert "watch endpoints (in namespace ns)" in needed


def test_a_grant_added_to_the_role_is_required_without_touching_the_check(monkeypatch):
    original = m.pod_reader

    def more(cluster, ns):
        objects = copy.deepcopy(original(cluster, ns))
        objects[1]["rules"].append({"apiGroups": ["batch"], "resources": ["jobs"],
                                    "verbs": ["create"]})
        return objects

    monkeypatch.setattr(m, "pod_reader", more)
    needed = described(access.required(m.desired_objects(cluster(), None), ()))
    assert "create batch/jobs (in namespace ns)" in needed


def test_each_kind_made_is_read_applied_and_deleted_and_each_swept_kind_listed():
    objects = m.desired_objects(cluster(router={"ingress": {"host": "llm.example"}}), LOGIN)
    needed = described(access.required(objects, ("Secret",)))
    for verb in ("get", "create", "patch", "delete"):
        assert f"{verb} namespaces (cluster-wide)" in needed
        assert f"{verb} apps/deployments (in namespace ns)" in needed
        assert f"{verb} networking.k8s.io/ingresses (in namespace ns)" in needed
        assert f"{verb} rbac.authorization.k8s.io/roles (in namespace ns)" in needed
    assert "list secrets (in namespace ns)" in needed
    assert {"list nodes (cluster-wide)", "watch apps/deployments (in namespace ns)"} <= needed
    assert "list namespaces (cluster-wide)" not in needed  # asked for nothing we do not do


# kubectl's DeploymentStatusViewer (kubectl/pkg/polymorphichelpers/rollout_status.go): done
# once the latest generation is observed, every replica is updated and available and no old
# replica is left; a Progressing condition with reason ProgressDeadlineExceeded is an error.
def deployment(generation=2, observed=2, replicas=2, updated=2, total=2, available=2,
               progressing=("True", "NewReplicaSetAvailable", "")) -> dict:
    status = {"observedGeneration": observed, "replicas": total, "updatedReplicas": updated,
              "availableReplicas": available,
              "conditions": [{"type": "Available", "status": "True"},
                             {"type": "Progressing", "status": progressing[0],
                              "reason": progressing[1], "message": progressing[2]}]}
    return {"metadata": {"name": "r", "generation": generation},
            "spec": {"replicas": replicas}, "status": {k: v for k, v in status.items() if v}}


@pytest.mark.parametrize("dep, done, failed, says", [
    (deployment(), True, False, "r: rolled out"),
    (deployment(observed=1), False, False, "has not seen generation 2"),
    (deployment(updated=1, total=3), False, False, "1 of 2 replicas updated"),
    (deployment(total=3), False, False, "1 old replicas pending termination"),
    (deployment(available=1), False, False, "1 of 2 updated replicas available"),
    (deployment(updated=1, total=3, progressing=(
        "False", "ProgressDeadlineExceeded", 'ReplicaSet "r-1" has timed out progressing.')),
     False, True, 'rollout failed: ProgressDeadlineExceeded: ReplicaSet "r-1" has timed out'),
    (deployment(replicas=0, updated=0, total=0, available=0), True, False, "rolled out"),
], ids=["done", "not-observed", "updating", "old-left", "unavailable", "deadline", "zero"])
def test_a_rollout_is_judged_as_kubectl_rollout_status_does(dep, done, failed, says):
    seen = rollout(dep)
    assert (seen.done, seen.failed) == (done, failed)
    assert says in seen.message


def test_the_old_replicas_being_available_is_not_a_done_rollout():
    old_ones_serve = deployment(updated=1, total=3, available=2)
    assert rollout(old_ones_serve).done is False


PVC = {"name": "hf", "pvc": {"size": "100Gi", "storage_class": "fast"}}


def desired(**pvc) -> ClusterSpec:
    return cluster([{"name": "hf", "pvc": {**PVC["pvc"], **pvc}}]).spec


@pytest.mark.parametrize("change, says", [
    ({"storage_class": "slow"},
     "cluster.spec.model_caches.0.pvc.storage_class: cannot change once created"),
    ({"access_mode": "ReadWriteOnce"},
     "cluster.spec.model_caches.0.pvc.access_mode: cannot change once created"),
    ({"size": "99Gi"}, "cluster.spec.model_caches.0.pvc.size: may not shrink"),
])
def test_an_immutable_change_is_refused_naming_the_field_and_the_fix(change, says):
    with pytest.raises(InvalidRequest) as err:
        KubernetesBackend().validate_update(cluster([PVC]), desired(**change))
    assert says in str(err.value)
    assert "Kubernetes refuses it on PersistentVolumeClaim cache-hf" in str(err.value)
    assert "give the cache a new name" in str(err.value)


def test_what_kubernetes_allows_passes():
    backend = KubernetesBackend()
    backend.validate_update(cluster([PVC]), desired(size="1Ti"))  # growing
    backend.validate_update(cluster([PVC]), cluster([PVC, {"name": "more", "pvc": {
        "size": "1Gi", "storage_class": "slow"}}]).spec)  # a new cache
    backend.validate_update(cluster([PVC], router={"service_type": "ClusterIP"}),
                            cluster([PVC], router={"service_type": "LoadBalancer"}).spec)


def test_every_deployment_carries_the_ready_timeout_as_its_progress_deadline():
    objects = m.desired_objects(cluster(ready_timeout_seconds=120,
                                        metrics={"remote_write_url": "http://vm/api/v1/write"}),
                                None)
    deadlines = {o["metadata"]["name"]: o["spec"]["progressDeadlineSeconds"]
                 for o in objects if o["kind"] == "Deployment"}
    assert deadlines == {m.ROUTER: 120, m.METRICS: 120}


@pytest.mark.parametrize("kind, path, was, wanted", [
    ("Deployment", "spec.selector", {"matchLabels": {"a": "1"}}, {"matchLabels": {"a": "2"}}),
    ("Service", "spec.clusterIP", "10.96.0.10", "10.96.0.11"),
    ("RoleBinding", "roleRef", {"kind": "Role", "name": "a"}, {"kind": "Role", "name": "b"}),
    ("PersistentVolumeClaim", "spec.storageClassName", "fast", "slow"),
])
def test_every_field_kubernetes_keeps_immutable_is_caught(kind, path, was, wanted):
    """apps/validation ValidateDeploymentUpdate (selector), core ValidateService (clusterIP),
    rbac ValidateRoleBindingUpdate (roleRef), core ValidatePersistentVolumeClaimUpdate."""
    def obj(value):
        body: dict = {"kind": kind, "metadata": {"name": "x"}}
        node = body
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        if kind == "PersistentVolumeClaim":
            body["spec"]["resources"] = {"requests": {"storage": "1Gi"}}
        return body

    assert m.immutable_changes([obj(was)], [obj(was)]) == []
    [(changed, field, before, after)] = m.immutable_changes([obj(was)], [obj(wanted)])
    assert (changed["kind"], field, before, after) == (kind, path, was, wanted)
