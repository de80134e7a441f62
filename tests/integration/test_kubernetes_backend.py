"""The Kubernetes backend end to end through ``dag.test()``: the real ``kubernetes`` client,
built by the cncf-kubernetes provider's hook from an Airflow connection or the vault, against
the fake API server of tests/fakes (no real one can run here) over HTTP."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest

from airfleet.backends.kubernetes import manifests as m
from airfleet.resources import Phase
from airfleet.store import Store
from tests.integration.kube_support import (  # noqa: F401 - fixtures
    CONN_ID,
    cluster,
    kube,
    ours,
    output,
    run,
    server,
    states,
    writes,
)

pytestmark = pytest.mark.integration

def test_create_health_onboard_delete(dags, kube, capfd, caplog, airfleet_home):
    ns = m.namespace_of("llm-a")
    dr = run(dags, "airfleet_cluster_create", {"cluster": cluster(kube, router={
        "service_type": "LoadBalancer", "ingress": {"host": "llm.example"}})})
    assert str(dr.state) == "success", states(dr)
    record = Store().require_cluster("llm-a")
    assert record.phase is Phase.RUNNING, record.cluster.status.message

    made = ours(kube, "llm-a")
    assert {(kind, name) for kind, name, _ in made} == {
        ("Namespace", ns), ("Secret", m.PULL_SECRET), ("ServiceAccount", m.POD_READER),
        ("Role", m.POD_READER), ("RoleBinding", m.POD_READER), ("Deployment", m.ROUTER),
        ("Service", m.ROUTER), ("Ingress", m.ROUTER), ("ConfigMap", m.METRICS),
        ("Deployment", m.METRICS), ("PersistentVolumeClaim", "cache-hf"), ("ConfigMap", m.CACHES)}
    assert all(namespace == ns for kind, _, namespace in made if kind != "Namespace")
    assert kube.get("Service", m.ROUTER, ns)["spec"]["type"] == "LoadBalancer"
    assert kube.get("Secret", m.PULL_SECRET, ns)["type"] == "kubernetes.io/dockerconfigjson"
    assert kube.get("PersistentVolumeClaim", "cache-hf", ns)["spec"]["storageClassName"] == "fast"
    owner = kube.get("Deployment", m.ROUTER, ns)["metadata"]["annotations"]
    assert owner[m.OWNER_ANNOTATION] == "airfleet cluster llm-a"

    found = record.cluster.status.accelerators
    assert found["count"] == 10
    assert found["models"] == {"NVIDIA-H100-80GB-HBM3": 8}
    assert found["nodes"]["gpu-2"]["vendor"] == "nvidia"
    assert found["nodes"]["cpu-1"]["count"] == 0
    conditions = {c.type: c.status for c in record.cluster.status.conditions}
    assert conditions["ComponentsReady"] == "True"

    # A re-run converges: nothing is created or changed.
    before = len(writes(kube))
    assert str(run(dags, "airfleet_cluster_create", {"cluster": cluster(kube, router={
        "service_type": "LoadBalancer", "ingress": {"host": "llm.example"}})}).state) == "success"
    assert writes(kube)[before:] == []
    assert ours(kube, "llm-a") == made

    dr = run(dags, "airfleet_cluster_health_check", {})
    assert str(dr.state) == "success"
    health = Store().require_cluster("llm-a").cluster.status
    assert health.phase is Phase.RUNNING and health.observed_at > record.cluster.status.observed_at
    assert "nodes 3/3 Ready" in health.message
    nodes = {n.name: n for n in health.nodes}
    assert nodes["gpu-1"].allocatable["nvidia.com/gpu"] == "8"

    # Onboard a cluster whose router already runs: only what is missing is installed.
    onboard_ns = m.namespace_of("llm-b")
    spec = cluster(kube, "llm-b")
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": onboard_ns, "labels": {m.MANAGED_BY: "airfleet", m.CLUSTER_LABEL: "llm-b"}}})
    router = next(o for o in m.desired_objects(_cluster_model(spec), None)
                  if o["kind"] == "Deployment" and o["metadata"]["name"] == m.ROUTER)
    router = copy.deepcopy(router)
    router["spec"]["replicas"] = 2  # tuned by its owner: onboarding must not undo that
    existing = kube.create(router)
    dr = run(dags, "airfleet_cluster_onboard", {"cluster": spec})
    assert str(dr.state) == "success", states(dr)
    onboarded = Store().require_cluster("llm-b")
    assert onboarded.phase is Phase.RUNNING
    assert {n.name for n in onboarded.cluster.status.nodes} == {"gpu-1", "gpu-2", "cpu-1"}
    assert onboarded.cluster.status.accelerators["count"] == 10
    live = kube.get("Deployment", m.ROUTER, onboard_ns)
    assert live["metadata"]["resourceVersion"] == existing["metadata"]["resourceVersion"] or \
        live["spec"]["replicas"] == 2
    assert live["spec"]["replicas"] == 2
    assert kube.get("Service", m.ROUTER, onboard_ns) is not None
    assert kube.get("Deployment", m.METRICS, onboard_ns) is not None

    for name in ("llm-a", "llm-b"):
        dr = run(dags, "airfleet_cluster_delete", {"name": name})
        assert str(dr.state) == "success", states(dr)
        assert Store().get_cluster(name) is None
    assert ours(kube) == []
    assert kube.get("Namespace", ns) is None and kube.get("Namespace", onboard_ns) is None

    # The registry password went to the cluster's Secret only: not to logs, XCom or stores.
    assert kube.canary not in output(capfd, caplog)
    airflow_home = Path(os.environ["AIRFLOW_HOME"])
    for path in [*airfleet_home.rglob("*"), *airflow_home.rglob("*")]:
        if path.is_file():
            assert kube.canary.encode() not in path.read_bytes(), f"canary found in {path}"


def _cluster_model(spec: dict):
    from airfleet.resources import Cluster

    return Cluster.model_validate(spec)


def test_a_denied_permission_fails_validate_listing_each_and_creates_nothing(dags, kube, capfd,
                                                                            caplog):
    ns = m.namespace_of("llm-a")
    kube.deny("create", "deployments", group="apps", namespace=ns)
    kube.deny("list", "nodes")
    dr = run(dags, "airfleet_cluster_create", {"cluster": cluster(kube)})
    assert str(dr.state) == "failed"
    assert states(dr)["admit"] == "failed"  # before any lease, row or object
    said = output(capfd, caplog)
    assert f"create apps/deployments (in namespace {ns})" in said
    assert "list nodes (cluster-wide)" in said
    assert "this run changed nothing in the cluster" in said
    assert Store().list_clusters(include_deleted=True) == []
    assert writes(kube) == []
    assert ours(kube) == []


def test_a_namespace_that_is_not_ours_is_refused_and_left_alone(dags, kube):
    ns = m.namespace_of("llm-a")
    foreign = kube.create({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": ns, "labels": {"team": "someone-else"}}})
    dr = run(dags, "airfleet_cluster_create", {"cluster": cluster(kube)})
    assert str(dr.state) == "failed"
    message = Store().require_cluster("llm-a").cluster.status.message
    assert f"namespace {ns} exists and is not Airfleet's" in message
    assert kube.get("Namespace", ns)["metadata"]["resourceVersion"] == \
        foreign["metadata"]["resourceVersion"]
    assert writes(kube) == [] and ours(kube) == []

    # Deleting that cluster leaves the namespace alone and says so.
    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-a"})
    assert str(dr.state) == "failed"
    assert "is not Airfleet's" in Store().require_cluster("llm-a").cluster.status.message
    assert kube.get("Namespace", ns) is not None


def test_a_5xx_burst_is_retried_and_the_create_succeeds(dags, kube):
    kube.fail_next(4, status=503)
    kube.fail_next(2, status=500, method="PATCH", path="/deployments/")  # the apply
    dr = run(dags, "airfleet_cluster_create", {"cluster": cluster(kube)})
    assert str(dr.state) == "success", states(dr)
    assert Store().require_cluster("llm-a").phase is Phase.RUNNING
    failed = [r for r in kube.requests if r[2] >= 500]
    assert len(failed) == 6
    assert len([o for o in ours(kube) if o[0] == "Deployment"]) == 2


def test_a_deployment_that_never_becomes_available_fails_naming_it(dags, kube):
    kube.never_ready.add((m.namespace_of("llm-a"), m.METRICS))
    dr = run(dags, "airfleet_cluster_create", {"cluster": cluster(kube, ready_timeout_seconds=2)})
    assert str(dr.state) == "failed"
    assert states(dr)["wait_ready"] == "failed"
    status = Store().require_cluster("llm-a").cluster.status
    assert status.phase is Phase.FAILED
    # Its progressDeadlineSeconds is the spec's ready timeout: Kubernetes says it gave up.
    assert f"{m.METRICS}: rollout failed: ProgressDeadlineExceeded" in status.message
    assert m.ROUTER + ":" not in status.message  # the router did roll out


def test_a_rerun_after_a_mid_flow_failure_converges_without_duplicates(dags, kube):
    # The router's Deployment is refused once (a 422 no retry fixes): the run fails midway.
    kube.fail_next(1, status=422, method="PATCH",
                   path=f"/namespaces/{m.namespace_of('llm-a')}/deployments/{m.ROUTER}")
    dr = run(dags, "airfleet_cluster_create", {"cluster": cluster(kube)})
    assert str(dr.state) == "failed"
    assert Store().require_cluster("llm-a").phase is Phase.FAILED
    partial = ours(kube)
    assert ("Namespace", m.namespace_of("llm-a"), None) in partial
    assert ("Deployment", m.ROUTER, m.namespace_of("llm-a")) not in partial

    seen = len(kube.requests)
    dr = run(dags, "airfleet_cluster_create", {"cluster": cluster(kube)})
    assert str(dr.state) == "success", states(dr)
    assert Store().require_cluster("llm-a").phase is Phase.RUNNING
    created = [r for r in kube.requests[seen:] if r[0] == "PATCH"]  # server-side applies
    # Only what the failed run had not made yet is applied now.
    assert len(created) == len(ours(kube)) - len(partial)
    assert len(ours(kube)) == len(set(ours(kube)))


def test_update_patches_changed_objects_and_removes_what_the_spec_dropped(dags, kube):
    ns = m.namespace_of("llm-a")
    assert str(run(dags, "airfleet_cluster_create", {"cluster": cluster(kube, router={
        "ingress": {"host": "llm.example"}})}).state) == "success"
    generation = kube.get("Deployment", m.ROUTER, ns)["metadata"]["generation"]
    desired = cluster(kube, router={"service_type": "NodePort", "replicas": 2},
                      metrics={"remote_write_url": None})
    dr = run(dags, "airfleet_cluster_update", {"cluster": desired})
    assert str(dr.state) == "success", states(dr)
    assert kube.get("Service", m.ROUTER, ns)["spec"]["type"] == "NodePort"
    router = kube.get("Deployment", m.ROUTER, ns)
    assert router["spec"]["replicas"] == 2 and router["metadata"]["generation"] > generation
    assert kube.get("Ingress", m.ROUTER, ns) is None
    assert kube.get("Deployment", m.METRICS, ns) is None
    assert kube.get("PersistentVolumeClaim", "cache-hf", ns) is not None
    assert Store().require_cluster("llm-a").phase is Phase.RUNNING


def test_health_turns_failed_naming_the_component_and_back(dags, kube):
    ns = m.namespace_of("llm-a")
    assert str(run(dags, "airfleet_cluster_create", {"cluster": cluster(kube)}).state) == "success"
    kube.never_ready.add((ns, m.ROUTER))
    router = kube.get("Deployment", m.ROUTER, ns)
    kube.update({**router, "spec": {**router["spec"], "replicas": 2}})  # scaled by someone
    for _ in range(2):  # two failed probes in a row turn a Running cluster Failed
        run(dags, "airfleet_cluster_health_check", {})
    status = Store().require_cluster("llm-a").cluster.status
    assert status.phase is Phase.FAILED
    assert f"{m.ROUTER}: 1 of 2 updated replicas available" in status.message
    kube.never_ready.discard((ns, m.ROUTER))
    router = kube.get("Deployment", m.ROUTER, ns)
    kube.update({**router, "spec": {**router["spec"], "replicas": 1}})
    time.sleep(1)  # the fake's ready_delay
    run(dags, "airfleet_cluster_health_check", {})
    assert Store().require_cluster("llm-a").phase is Phase.RUNNING


def test_a_sealed_kubeconfig_is_stored_in_the_vault_and_used(dags, kube, airfleet_home):
    from airfleet import crypto

    envelope = crypto.seal(crypto.load_public_key(airfleet_home / "keys"),
                           kube.kubeconfig_yaml().encode())
    spec = cluster(kube)
    spec["spec"]["config"]["kubernetes"]["credential"] = {"sealed": envelope}
    dr = run(dags, "airfleet_cluster_onboard", {"cluster": spec})
    assert str(dr.state) == "success", states(dr)
    ref = Store().require_cluster("llm-a").cluster.spec.config.kubernetes.credential
    assert ref.kind == "vault_id"
    assert str(run(dags, "airfleet_cluster_delete", {"name": "llm-a"}).state) == "success"
    assert ours(kube) == []


@pytest.mark.parametrize("change, field", [
    (lambda c: c["spec"]["config"]["kubernetes"].update(credential={"airflow_conn_id": "nope"}),
     "cluster.spec.config.kubernetes.credential: Airflow connection 'nope' does not exist"),
    (lambda c: c["spec"]["config"]["kubernetes"].update(credential={"sealed": SEALED_ELSEWHERE}),
     "cluster.spec.config.kubernetes.credential: "),
    (lambda c: c["spec"]["config"]["kubernetes"].update(credential={"vault_id": "vlt_" + "0" * 32}),
     "cluster.spec.config.kubernetes.credential: "),
], ids=["conn-missing", "sealed-other-key", "vault-id-missing"])
def test_a_credential_that_does_not_resolve_fails_validate_and_touches_nothing(
        dags, kube, capfd, caplog, change, field):
    spec = cluster(kube)
    change(spec)
    dr = run(dags, "airfleet_cluster_create", {"cluster": spec})
    assert str(dr.state) == "failed"
    assert states(dr)["admit"] == "failed"
    assert field in output(capfd, caplog)
    assert Store().list_clusters(include_deleted=True) == []
    assert kube.requests == []


@pytest.mark.parametrize("change, path, field", [
    (lambda c: c["spec"]["config"]["kubernetes"].update(router={"service_type": "Headless"}),
     "['spec']['config']['kubernetes']['router']['service_type']",
     "cluster.spec.config.kubernetes.router.service_type"),
    (lambda c: c["spec"]["model_caches"][0]["pvc"].pop("size"),
     "['spec']['model_caches'][0]", "cluster.spec.model_caches.0.pvc.size"),
], ids=["service-type", "pvc-size"])
def test_a_bad_spec_is_refused_naming_the_field_before_a_run_exists(dags, kube, change, path,
                                                                     field):
    from airflow.sdk.definitions.param import ParamValidationError

    from airfleet import flows
    from airfleet.errors import InvalidRequest

    spec = cluster(kube)
    change(spec)
    with pytest.raises(ParamValidationError) as err:
        run(dags, "airfleet_cluster_create", {"cluster": spec})
    assert path in str(err.value)
    with pytest.raises(InvalidRequest) as err:  # the first task's check says it the same way
        flows.validate("create", {"cluster": spec})
    assert field in str(err.value)
    assert Store().list_clusters(include_deleted=True) == []
    assert kube.requests == []


# Sealed with a key pair that is not this platform's: it cannot be opened here.
def _sealed_elsewhere() -> str:
    import tempfile

    from airfleet import crypto

    with tempfile.TemporaryDirectory() as keys:
        crypto.init_keys(Path(keys))
        return crypto.seal(crypto.load_public_key(Path(keys)), b"apiVersion: v1")


SEALED_ELSEWHERE = _sealed_elsewhere()


def test_a_long_wait_moves_to_the_triggerer_and_ends_when_available(dags, kube, capfd, caplog,
                                                                     monkeypatch):
    """The wait watches in the task for AIRFLEET_READY_INLINE_SECONDS, then defers."""
    monkeypatch.setenv("AIRFLEET_READY_INLINE_SECONDS", "0.5")
    kube.ready_delay = 3.0
    started = time.monotonic()
    dr = run(dags, "airfleet_cluster_create", {"cluster": cluster(kube)})
    assert str(dr.state) == "success", states(dr)
    assert time.monotonic() - started >= 3
    assert "waiting up to" in output(capfd, caplog)  # it deferred
    status = Store().require_cluster("llm-a").cluster.status
    assert status.phase is Phase.RUNNING
    assert {c.type: c.status for c in status.conditions}["ComponentsReady"] == "True"


def test_the_readiness_trigger_reports_the_deadline_naming_the_component(kube, dags):
    import asyncio

    from airfleet_airflow.triggers import ClusterProbeTrigger

    assert str(run(dags, "airfleet_cluster_create", {"cluster": cluster(kube)}).state) == "success"
    kube.never_ready.add((m.namespace_of("llm-a"), m.ROUTER))
    router = kube.get("Deployment", m.ROUTER, m.namespace_of("llm-a"))
    kube.update({**router, "spec": {**router["spec"], "replicas": 3}})
    lease = Store().acquire_lease("llm-a", "test/holder")
    trigger = ClusterProbeTrigger({"name": "llm-a", "holder": "test/holder", "token": lease.token},
                                  "wait_ready", time.time() + 1.5, poll_interval=0.3)
    classpath, kwargs = trigger.serialize()
    assert set(kwargs) == {"lease", "verb", "deadline", "poll_interval"}  # no secret in it

    async def first_event():
        async for event in trigger.run():
            return event.payload

    event = asyncio.run(first_event())
    assert event["done"] is False
    assert f"{m.ROUTER}: 1 of 3 updated replicas available" in event["message"]


def test_delete_of_a_cluster_whose_api_is_gone_fails_unless_forced(dags, kube, monkeypatch):
    assert str(run(dags, "airfleet_cluster_create", {"cluster": cluster(kube)}).state) == "success"
    gone = kube.kubeconfig()
    gone["clusters"][0]["cluster"]["server"] = "http://127.0.0.1:9"  # nothing listens there
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config": json.dumps(gone)}}))
    monkeypatch.setattr("airfleet.backends.kubernetes.kube.RETRY_SECONDS", 1)
    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-a"})
    assert str(dr.state) == "failed"
    status = Store().require_cluster("llm-a").cluster.status
    assert status.phase is Phase.FAILED and "did not answer" in status.message
    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-a", "force": True})
    assert str(dr.state) == "success", states(dr)
    assert Store().get_cluster("llm-a") is None
    [gone] = Store().list_clusters(include_deleted=True)
    assert gone.phase is Phase.DELETED
    [left] = gone.cluster.status.left_behind  # the namespace, never reached
    assert "did not answer" in left
    assert gone.cluster.status.message == f"deleted by force; left behind: {left}"
