"""Endpoints on a Kubernetes cluster, through ``dag.test()`` of the endpoint DAGs, the real
``kubernetes`` client and the fake API server (its kubelet marks a pod Ready once started, or
never for an image in ``bad_images``): deploy, scale, a canary from 10 to 100, deleting the
old version; each kind of bad input refused before anything is written; a denied policy and a
dry run change nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from airfleet import cli
from airfleet.backends.kubernetes import manifests as m
from airfleet.endpoints import EndpointPhase, example_endpoint
from airfleet.store import Store
from tests.integration.kube_support import (  # noqa: F401 - fixtures
    cluster,
    kube,
    run,
    server,
    states,
    writes,
)

pytestmark = pytest.mark.integration

NS = m.namespace_of("llm-a")


@pytest.fixture
def running(dags, kube):
    """Cluster llm-a created (Running) on the fake, with its GPUs detected."""
    spec = cluster(kube, ready_timeout_seconds=3)
    assert str(run(dags, "airfleet_cluster_create", {"cluster": spec}).state) == "success"
    kube.requests.clear()
    return kube


def endpoint(**spec) -> dict:
    data = example_endpoint()
    data["spec"].update(spec)
    return {"endpoint": data}


def deploy(dags, **spec):
    return run(dags, "airfleet_endpoint_deploy", endpoint(**spec))


def routes(kube) -> dict:
    cm = kube.get("ConfigMap", m.ROUTES, NS)
    return json.loads(cm["data"]["routes.json"])["models"] if cm else {}


def version(name: str, v: str):
    return Store().get_endpoint(name, v)


def note(dag_run) -> str:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return session.scalar(select(DagRun).where(DagRun.dag_id == dag_run.dag_id,
                                                   DagRun.run_id == dag_run.run_id)).note


def test_deploy_scale_canary_and_delete_the_old_version(dags, running):
    kube = running
    dr = deploy(dags, model={"name": "Qwen/Qwen2.5-0.5B-Instruct", "served_name": "chat",
                             "cache": "hf"})
    assert str(dr.state) == "success", states(dr)
    v1 = version("chat", "v1")
    assert v1.phase is EndpointPhase.RUNNING
    assert (v1.endpoint.status.ready_replicas, v1.endpoint.status.replicas) == (1, 1)
    assert v1.endpoint.status.url == f"http://airfleet-router.{NS}.svc/v1"
    assert "endpoint chat v1 Running: 1/1 replicas ready" in note(dr)
    live = kube.get("Deployment", "chat-v1", NS)
    template = live["spec"]["template"]
    assert template["metadata"]["labels"][m.ENDPOINT_LABEL] == "chat"
    assert template["metadata"]["annotations"][m.SERVED_ANNOTATION] == "chat"
    assert {"name": "hf", "persistentVolumeClaim": {"claimName": "cache-hf"}} in \
        template["spec"]["volumes"]
    assert routes(kube) == {"chat": {"v1": 100}}

    dr = run(dags, "airfleet_endpoint_scale", {"name": "chat", "replicas": 3})
    assert str(dr.state) == "success", states(dr)
    assert kube.get("Deployment", "chat-v1", NS)["status"]["readyReplicas"] == 3
    assert version("chat", "v1").endpoint.status.ready_replicas == 3

    assert str(deploy(dags, version="v2", traffic_weight=10).state) == "success"
    assert routes(kube) == {"chat": {"v1": 90, "v2": 10}}
    assert version("chat", "v1").endpoint.spec.traffic_weight == 90
    assert str(deploy(dags, version="v2", traffic_weight=100).state) == "success"
    assert routes(kube) == {"chat": {"v1": 0, "v2": 100}}
    # Shifting traffic restarted nothing: v1 kept its pods' template.
    assert kube.get("Deployment", "chat-v1", NS)["metadata"]["generation"] == \
        live["metadata"]["generation"] + 1  # (+1: the scale to 3)

    dr = run(dags, "airfleet_endpoint_delete", {"name": "chat", "version": "v1"})
    assert str(dr.state) == "success", states(dr)
    assert kube.get("Deployment", "chat-v1", NS) is None
    assert not [p for p in kube.list("Pod", NS)
                if p["metadata"]["labels"].get(m.VERSION_LABEL) == "v1"]
    assert version("chat", "v1") is None
    assert routes(kube) == {"chat": {"v2": 100}}
    assert version("chat", "v2").endpoint.spec.traffic_weight == 100
    history = [(e.version, e.to_phase) for e in Store().endpoint_events("chat") if e.to_phase]
    assert ("v1", "Deleted") in history

    # Deleting again is done already; deleting the rest leaves nothing of the endpoint.
    assert str(run(dags, "airfleet_endpoint_delete",
                   {"name": "chat", "version": "v1"}).state) == "success"
    # (version None said out loud: dag.test() keeps the last run's Params in the DAG object)
    dr = run(dags, "airfleet_endpoint_delete", {"name": "chat", "version": None})
    assert str(dr.state) == "success", (states(dr), note(dr))
    assert kube.get("Deployment", "chat-v2", NS) is None and routes(kube) == {}
    assert Store().endpoint_versions("chat") == []


def test_a_version_that_never_becomes_ready_fails_naming_the_deadline(dags, running):
    running.bad_images.add("airfleet/mock-engine:broken")
    dr = deploy(dags, image="airfleet/mock-engine:broken")
    assert str(dr.state) == "failed"
    assert states(dr)["wait_ready"] == "failed"
    v1 = version("chat", "v1")
    assert v1.phase is EndpointPhase.FAILED
    assert "ProgressDeadlineExceeded" in v1.endpoint.status.message
    assert "ProgressDeadlineExceeded" in note(dr).splitlines()[0]
    # Rolling back to a working image converges.
    assert str(deploy(dags).state) == "success"
    assert version("chat", "v1").phase is EndpointPhase.RUNNING


@pytest.mark.parametrize("spec, field", [
    ({"cluster": "nope"}, "endpoint.spec.cluster: cluster nope is not registered"),
    ({"model": {"name": "m", "cache": "s3"}}, "endpoint.spec.model.cache: cluster llm-a has no "
                                              "model cache 's3'"),
    ({"engine": "vllm", "resources": {"gpu": 1, "gpu_model": "B200"}},
     "endpoint.spec.resources.gpu_model: cluster llm-a has no B200 GPUs"),
    ({"engine": "vllm", "replicas": 9, "resources": {"gpu": 1, "gpu_model": "H100"}},
     "endpoint.spec.replicas: 9 replicas of 1 GPU(s) do not fit"),
    ({"traffic_weight": 40}, "endpoint.spec.traffic_weight: v1 is the endpoint's only version"),
    ({"engine_args": {"hf-token": "hf_canary"}}, "endpoint.spec.engine_args.hf-token"),
])
def test_bad_input_is_refused_in_admit_and_nothing_is_written(dags, running, spec, field):
    dr = deploy(dags, **spec)
    assert str(dr.state) == "failed"
    assert states(dr)["admit"] == "failed"
    assert field in note(dr).splitlines()[0]
    assert writes(running) == []
    assert Store().list_endpoints(include_deleted=True) == []
    assert "hf_canary" not in json.dumps([e.message for e in Store().endpoint_events("chat")])


def test_scale_beyond_the_gpus_names_replicas(dags, running):
    assert str(deploy(dags, engine="vllm", resources={"gpu": 4, "gpu_model": "H100"}).state) \
        == "success"
    running.requests.clear()
    dr = run(dags, "airfleet_endpoint_scale", {"name": "chat", "replicas": 3})
    assert str(dr.state) == "failed"
    assert note(dr).splitlines()[0].startswith("Failed at admit: replicas: 3 replicas of 4")
    assert writes(running) == []
    assert version("chat", "v1").endpoint.spec.replicas == 1


def test_a_denied_deploy_and_a_dry_run_leave_nothing_behind(dags, running):
    other_day = (datetime.now(UTC) + timedelta(days=3)).strftime("%a").lower()
    assert cli.main(["policies", "bind", "deploy_endpoint=maintenance_window", "--param",
                     f'windows=[{{"days": ["{other_day}"], "start": "00:00", '
                     '"end": "00:01"}]']) == 0
    dr = deploy(dags)
    assert str(dr.state) == "failed"
    assert states(dr)["admit"] == "failed" and states(dr)["deploy"] == "upstream_failed"
    # admit took the cluster's lease before the policies said no: the teardown freed it.
    assert states(dr)["release_lease"] == "success"
    assert Store().get_lease("llm-a").holder is None
    assert "denied by policy" in note(dr).splitlines()[0]
    assert writes(running) == []
    assert Store().list_endpoints(include_deleted=True) == []

    assert cli.main(["policies", "bind", "deploy_endpoint="]) == 0
    dr = run(dags, "airfleet_endpoint_deploy", {**endpoint(), "dry_run": True})
    assert str(dr.state) == "success"
    assert {t for t, s in states(dr).items() if s != "skipped"} == {"admit"}
    assert writes(running) == []
    assert Store().list_endpoints(include_deleted=True) == []


def test_a_dry_deploy_reports_the_approval_it_would_wait_for(dags, running):
    assert cli.main(["policies", "bind", "deploy_endpoint=approve_destructive", "--param",
                     'approvers=["alice"]', "--param", 'always=["deploy_endpoint"]']) == 0
    dr = run(dags, "airfleet_endpoint_deploy", {**endpoint(), "dry_run": True})
    assert str(dr.state) == "success"
    assert {t for t, s in states(dr).items() if s != "skipped"} == {"admit"}
    report = dr.get_task_instance("admit").xcom_pull(task_ids="admit", key="dry_run")
    assert report["approval"] == {
        "reason": "approve_destructive: deploy_endpoint of cluster llm-a always needs "
                  "approval (binding param always)",
        "approvers": ["alice"], "timeout_seconds": 3600.0}
    assert writes(running) == [] and Store().list_endpoints(include_deleted=True) == []


def test_an_endpoint_flow_holds_the_clusters_lease(dags, running):
    Store().acquire_lease("llm-a", "someone/else")
    dr = deploy(dags)
    assert str(dr.state) == "failed"
    assert "held by run someone/else" in note(dr).splitlines()[0]
    assert writes(running) == []


def test_a_cluster_update_keeps_the_endpoints(dags, running):
    assert str(deploy(dags).state) == "success"
    spec = cluster(running, ready_timeout_seconds=3)
    spec["spec"]["config"]["kubernetes"]["metrics"] = {}
    assert str(run(dags, "airfleet_cluster_update", {"cluster": spec}).state) == "success"
    assert running.get("Deployment", "chat-v1", NS) is not None
    assert routes(running) == {"chat": {"v1": 100}}


def test_health_checks_follow_the_endpoints_engines(dags, running):
    """The scheduled health check looks at the endpoints too: a version whose engines are gone
    turns Failed with the reason, and comes back Running once they are ready again."""
    assert str(deploy(dags).state) == "success"
    health = {"names": None}
    dr = run(dags, "airfleet_cluster_health_check", health)
    assert str(dr.state) == "success", states(dr)
    assert version("chat", "v1").phase is EndpointPhase.RUNNING
    assert "checked 1 endpoint versions" in note(dr)

    running.delete("Deployment", "chat-v1", NS)  # someone removed it by hand
    dr = run(dags, "airfleet_cluster_health_check", health)
    assert str(dr.state) == "success", states(dr)
    v1 = version("chat", "v1")
    assert v1.phase is EndpointPhase.FAILED
    assert "chat-v1" in v1.endpoint.status.message, v1.endpoint.status.message
    assert ("v1", "Failed") in [(e.version, e.to_phase) for e in Store().endpoint_events("chat")]

    assert str(deploy(dags).state) == "success"  # a re-deploy puts it back
    run(dags, "airfleet_cluster_health_check", health)
    assert version("chat", "v1").phase is EndpointPhase.RUNNING


def test_a_cluster_that_serves_endpoints_is_deleted_only_with_force(dags, running):
    """Deleting a cluster would take its endpoints along: refused in validate, naming them,
    unless forced; forced, each version is recorded Deleted with the cluster, not left
    Running on a cluster that is gone."""
    assert str(deploy(dags).state) == "success"
    running.requests.clear()
    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-a", "force": False})
    assert str(dr.state) == "failed"
    assert states(dr)["admit"] == "failed"
    assert "cluster llm-a serves endpoints chat; delete them first" in note(dr).splitlines()[0]
    assert writes(running) == []
    assert Store().require_cluster("llm-a").phase.value == "Running"

    # approve_destructive sees the endpoints in its request: a forced delete would wait for
    # an approval naming them (a dry run reports it and changes nothing).
    assert cli.main(["policies", "bind", "delete_cluster=approve_destructive", "--param",
                     'approvers=["alice"]']) == 0
    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-a", "force": True, "dry_run": True})
    assert str(dr.state) == "success"
    report = dr.get_task_instance("admit").xcom_pull(task_ids="admit", key="dry_run")
    assert report["approval"]["reason"] == (
        "approve_destructive: deleting cluster llm-a removes the endpoints it serves: chat")
    assert writes(running) == []
    assert cli.main(["policies", "bind", "delete_cluster="]) == 0

    # dry_run False said: dag.test() of the same DAG object keeps a param a run's conf set.
    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-a", "force": True, "dry_run": False})
    assert str(dr.state) == "success", states(dr)
    assert running.get("Namespace", NS) is None
    assert version("chat", "v1") is None
    last = [e for e in Store().endpoint_events("chat") if e.to_phase][-1]
    assert (last.to_phase, last.reason, last.message) == (
        "Deleted", "ClusterDeleted", "removed with cluster llm-a")
