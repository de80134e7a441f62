"""End to end: every flow over REST with the official client against a running Airflow
(see conftest.py for how it starts and what stands in for the nodes)."""

from __future__ import annotations

import json
import time

import pytest
import requests

from airfleet import config, flows
from tests.e2e.support import (
    CLUSTER,
    DAG_IDS,
    log_until,
    print_failed_tasks,
    store_of,
    task_log,
    token,
    trigger,
    wait_run,
)

pytestmark = pytest.mark.e2e


def test_airflow_is_healthy_with_every_dag_active_and_no_import_errors(client, dags_parsed):
    import airflow_client.client as af

    assert {d.dag_id: d.is_paused for d in dags_parsed} == {d: False for d in DAG_IDS}
    assert af.ImportErrorApi(client).get_import_errors().total_entries == 0


def test_bad_conf_gets_400_naming_the_field_and_changes_nothing(client, dags_parsed, airflow):
    from airflow_client.client.exceptions import ApiException

    store = store_of(airflow)
    store.migrate()
    before = [r.cluster.model_dump() for r in store.list_clusters(include_deleted=True)]
    bad = json.loads(json.dumps(CLUSTER))
    bad["spec"]["config"]["ssh"]["port"] = 70000
    with pytest.raises(ApiException) as err:
        trigger(client, "airfleet_cluster_create", {"cluster": bad})
    assert err.value.status == 400
    assert "param cluster" in err.value.body and "['spec']['config']['ssh']['port']" in err.value.body

    missing = json.loads(json.dumps(CLUSTER))
    del missing["metadata"]["name"]
    with pytest.raises(ApiException) as err:
        trigger(client, "airfleet_cluster_create", {"cluster": missing})
    assert err.value.status == 400 and "'name' is a required property" in err.value.body

    # Other tests of the session may have made clusters: these requests made none.
    after = [r.cluster.model_dump() for r in store.list_clusters(include_deleted=True)]
    assert after == before
    assert store.get_lease("e2e-a") is None


def test_a_viewer_cannot_trigger(airflow, dags_parsed):
    viewer = token(airflow["base"], "viewer", "viewer")
    r = requests.post(f"{airflow['base']}/api/v2/dags/airfleet_cluster_create/dagRuns",
                      headers={"Authorization": f"Bearer {viewer}"},
                      json={"logical_date": None, "conf": {"cluster": CLUSTER}}, timeout=10)
    assert r.status_code == 403, r.text


def test_create_then_delete_over_rest(client, dags_parsed, airflow):
    import airflow_client.client as af

    run = trigger(client, "airfleet_cluster_create", {"cluster": CLUSTER})
    assert wait_run(client, "airfleet_cluster_create", run.dag_run_id) == "success"
    assert "lease on cluster e2e-a taken" in task_log(client, "airfleet_cluster_create",
                                                  run.dag_run_id, "admit")
    record = store_of(airflow).require_cluster("e2e-a")
    assert record.phase.value == "Running" and len(record.cluster.status.nodes) == 2
    # The scheduler wrote the run's note when the run ended.
    note = af.DagRunApi(client).get_dag_run("airfleet_cluster_create", run.dag_run_id).note
    assert note == "e2e-a: Pending → Provisioning → Running", note

    run = trigger(client, "airfleet_cluster_delete", {"name": "e2e-a"})
    assert wait_run(client, "airfleet_cluster_delete", run.dag_run_id) == "success"
    store = store_of(airflow)
    assert store.get_cluster("e2e-a") is None
    phases = [(e.from_phase, e.to_phase) for e in store.events("e2e-a") if e.to_phase]
    assert phases == [(None, "Pending"), ("Pending", "Provisioning"), ("Provisioning", "Running"),
                      ("Running", "Deleting"), ("Deleting", "Deleted")]
    calls = [call["verb"] for call in map(json.loads, (airflow["home"] / "calls.jsonl")
                                          .read_text().splitlines()) if call["cluster"] == "e2e-a"]
    assert calls == ["provision", "detect_accelerators", "apply", "teardown"]


def test_a_kubernetes_cluster_over_rest_waits_in_the_triggerer(client, dags_parsed, airflow,
                                                                kube_api):
    from airfleet.backends.kubernetes import manifests as m

    cluster = {"metadata": {"name": "e2e-k8s"},
               "spec": {"type": "kubernetes", "provider": "existing",
                        "config": {"kubernetes": {"credential": {"airflow_conn_id": "k8s_fake"}}}}}
    run = trigger(client, "airfleet_cluster_create", {"cluster": cluster})
    assert wait_run(client, "airfleet_cluster_create", run.dag_run_id) == "success"
    waited = log_until(client, "airfleet_cluster_create", run.dag_run_id, "wait_ready",
                        "readiness wait ended")
    # It deferred, and resumed when the trigger fired.
    assert "waiting up to" in waited and "readiness wait ended" in waited, waited
    record = store_of(airflow).require_cluster("e2e-k8s")
    assert record.phase.value == "Running"
    assert record.cluster.status.accelerators["models"] == {"NVIDIA-L4": 1}
    ns = m.namespace_of("e2e-k8s")
    assert kube_api.get("Deployment", m.ROUTER, ns) is not None

    run = trigger(client, "airfleet_cluster_delete", {"name": "e2e-k8s"})
    assert wait_run(client, "airfleet_cluster_delete", run.dag_run_id) == "success"
    assert kube_api.get("Namespace", ns) is None
    assert store_of(airflow).get_cluster("e2e-k8s") is None


def _plugin(airflow, path: str, user: str | None = "admin", method: str = "get", **kw):
    headers = {"Authorization": f"Bearer {token(airflow['base'], user, user)}"} if user else {}
    return requests.request(method, f"{airflow['base']}/airfleet/api/v1/{path}",
                            headers=headers, timeout=10, **kw)


def test_the_plugin_api_is_behind_airflows_auth(airflow, dags_parsed):
    assert _plugin(airflow, "clusters", user=None).status_code == 401
    assert _plugin(airflow, "clusters", user="viewer").status_code == 200
    r = _plugin(airflow, "policies/bindings", user="viewer", method="put",
                json={"bindings": {"add_node": [{"policy": "max_nodes"}]}})
    assert r.status_code == 403, r.text
    assert _plugin(airflow, "credentials", user="viewer", method="post",
                   json={"sealed": "x"}).status_code == 403
    assert _plugin(airflow, "clusters?phase=Sleeping").status_code == 400


def test_every_flow_over_rest_and_the_plugin_api_view(client, dags_parsed, airflow):
    from airflow_client.client.exceptions import ApiException

    cluster = json.loads(json.dumps(CLUSTER))
    cluster["metadata"]["name"] = "e2e-flows"
    for dag_id, conf in (("airfleet_cluster_update", {"cluster": {"metadata": {}}}),
                         ("airfleet_cluster_delete", {"name": "Bad_Name"}),
                         ("airfleet_cluster_onboard", {"cluster": {"spec": {}}})):
        with pytest.raises(ApiException) as err:
            trigger(client, dag_id, conf)
        assert err.value.status == 400 and "Invalid input for param" in err.value.body, dag_id

    run = trigger(client, "airfleet_cluster_create", {"cluster": cluster})
    assert wait_run(client, "airfleet_cluster_create", run.dag_run_id) == "success"

    cluster["spec"]["config"]["ssh"]["workers"].append("10.0.0.3")
    run = trigger(client, "airfleet_cluster_update", {"cluster": cluster})
    assert wait_run(client, "airfleet_cluster_update", run.dag_run_id) == "success"

    run = trigger(client, "airfleet_cluster_health_check", {"names": ["e2e-flows"]})
    assert wait_run(client, "airfleet_cluster_health_check", run.dag_run_id) == "success"
    # The part of the fleet e2e-flows falls in (the DAG splits it by AIRFLEET_HEALTH_SHARDS).
    parts = config.health_shards()
    part = next(i for i in range(parts) if flows.in_shard("e2e-flows", (i, parts)))
    assert "e2e-flows: Running" in log_until(client, "airfleet_cluster_health_check",
                                             run.dag_run_id, "check_fleet", "e2e-flows: Running",
                                             map_index=part)
    view = _plugin(airflow, "clusters/e2e-flows", user="viewer").json()
    assert view["phase"] == "Running" and view["nodes"]["desired"] == 3
    assert view["health_checked_at"] is not None
    assert view["last_run"]["dag_id"] == "airfleet_cluster_health_check"
    history = _plugin(airflow, "clusters/e2e-flows/events", user="viewer").json()["events"]
    assert {e["run"]["dag_id"] for e in history if e["run"]} >= {
        "airfleet_cluster_create", "airfleet_cluster_update"}

    onboard = json.loads(json.dumps(CLUSTER))
    onboard["metadata"]["name"] = "e2e-onboarded"
    run = trigger(client, "airfleet_cluster_onboard", {"cluster": onboard})
    assert wait_run(client, "airfleet_cluster_onboard", run.dag_run_id) == "success"
    names = {c["name"]: c["phase"] for c in _plugin(airflow, "clusters").json()["clusters"]}
    assert names.get("e2e-onboarded") == "Running" and names.get("e2e-flows") == "Running"

    for name in ("e2e-flows", "e2e-onboarded"):
        run = trigger(client, "airfleet_cluster_delete", {"name": name})
        assert wait_run(client, "airfleet_cluster_delete", run.dag_run_id) == "success"
        assert _plugin(airflow, f"clusters/{name}").status_code == 404


def test_an_endpoint_deployed_on_the_cluster_asset_then_scaled_shifted_and_deleted(
        client, dags_parsed, airflow, kube_api):
    """A Kubernetes cluster created over REST announces Running; the downstream DAG scheduled
    on its asset (tests/e2e/dags) deploys an endpoint; the official client then scales it,
    rolls a v2 at 10 %, deletes v1 and the endpoint; the Airfleet API tells each step."""
    import airflow_client.client as af
    from airflow_client.client.exceptions import ApiException

    from airfleet.backends.kubernetes import manifests as m

    cluster = {"metadata": {"name": "e2e-asset"},
               "spec": {"type": "kubernetes", "provider": "existing",
                        "config": {"kubernetes": {"credential": {"airflow_conn_id": "k8s_fake"}}}}}
    run = trigger(client, "airfleet_cluster_create", {"cluster": cluster})
    assert wait_run(client, "airfleet_cluster_create", run.dag_run_id) == "success"
    assert "asset event airfleet://cluster/e2e-asset: Running" in log_until(
        client, "airfleet_cluster_create", run.dag_run_id, "release_lease", "asset event")

    downstream = _first_run(client, "e2e_on_cluster_running")
    assert str(getattr(downstream.run_type, "value", downstream.run_type)) == "asset_triggered"
    assert wait_run(client, "e2e_on_cluster_running", downstream.dag_run_id) == "success"
    deploy = _first_run(client, "airfleet_endpoint_deploy")
    assert wait_run(client, "airfleet_endpoint_deploy", deploy.dag_run_id) == "success"
    note = af.DagRunApi(client).get_dag_run("airfleet_endpoint_deploy", deploy.dag_run_id).note
    assert "endpoint chat v1 Running: 1/1 replicas ready" in note, note

    with pytest.raises(ApiException) as err:  # refused by the form's schema: no run at all
        trigger(client, "airfleet_endpoint_scale", {"name": "chat", "replicas": -1})
    assert err.value.status == 400 and "replicas" in err.value.body

    def step(dag_id: str, conf: dict) -> None:
        run = trigger(client, dag_id, conf)
        assert wait_run(client, dag_id, run.dag_run_id) == "success", (dag_id, conf)

    def versions() -> dict[str, tuple]:
        view = _plugin(airflow, "endpoints/chat", user="viewer").json()
        return {v["version"]: (v["phase"], v["ready_replicas"], v["replicas"],
                               v["traffic_weight"]) for v in view["versions"]}

    ns = m.namespace_of("e2e-asset")
    step("airfleet_endpoint_scale", {"name": "chat", "replicas": 2})
    assert versions() == {"v1": ("Running", 2, 2, 100)}
    v2 = {**_ENDPOINT, "spec": {**_ENDPOINT["spec"], "version": "v2", "traffic_weight": 10}}
    step("airfleet_endpoint_deploy", {"endpoint": v2})
    assert versions() == {"v1": ("Running", 2, 2, 90), "v2": ("Running", 1, 1, 10)}
    routes = json.loads(kube_api.get("ConfigMap", m.ROUTES, ns)["data"]["routes.json"])
    assert routes["models"] == {"chat": {"v1": 90, "v2": 10}}

    step("airfleet_endpoint_delete", {"name": "chat", "version": "v1"})
    assert versions() == {"v2": ("Running", 1, 1, 100)}
    assert kube_api.get("Deployment", "chat-v1", ns) is None
    step("airfleet_endpoint_delete", {"name": "chat"})
    assert _plugin(airflow, "endpoints/chat").status_code == 404
    assert kube_api.get("Deployment", "chat-v2", ns) is None

    step("airfleet_cluster_delete", {"name": "e2e-asset"})
    assert kube_api.get("Namespace", ns) is None
    # The Deleted event runs the downstream DAG again, which deploys nothing this time.
    deadline, runs = time.monotonic() + 120, []
    while len(runs) < 2 and time.monotonic() < deadline:
        runs = af.DagRunApi(client).get_dag_runs("e2e_on_cluster_running").dag_runs
        time.sleep(2)
    assert len(runs) == 2, [r.dag_run_id for r in runs]
    assert all(wait_run(client, "e2e_on_cluster_running", r.dag_run_id) == "success"
               for r in runs)
    deploys = af.DagRunApi(client).get_dag_runs("airfleet_endpoint_deploy").dag_runs
    assert len(deploys) == 2, [r.dag_run_id for r in deploys]  # the asset's and v2's


_ENDPOINT = {"metadata": {"name": "chat"},
             "spec": {"cluster": "e2e-asset", "engine": "mock",
                      "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct", "served_name": "chat"}}}


def _first_run(client, dag_id: str, timeout: float = 120):
    import airflow_client.client as af

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = af.DagRunApi(client).get_dag_runs(dag_id).dag_runs
        if runs:
            return runs[0]
        time.sleep(2)
    pytest.fail(f"{dag_id} never ran")


def test_an_overrun_flow_misses_its_deadline_and_the_cluster_history_says_so(
        client, dags_parsed, airflow):
    # Airflow's scheduler sees the deadline (3 s after the run was queued) pass while the run
    # goes on, and its triggerer runs Airfleet's callback (tests/e2e/dags/e2e_deadline.py).
    cluster = json.loads(json.dumps(CLUSTER))
    cluster["metadata"]["name"] = "e2e-deadline"
    run = trigger(client, "airfleet_cluster_create", {"cluster": cluster})
    assert wait_run(client, "airfleet_cluster_create", run.dag_run_id) == "success"
    try:
        _parsed(client, "e2e_deadline")
        late = trigger(client, "e2e_deadline", {"name": "e2e-deadline"})
        assert wait_run(client, "e2e_deadline", late.dag_run_id) == "success"  # not stopped
        events, deadline = [], time.monotonic() + 90
        while not events and time.monotonic() < deadline:
            events = [e for e in store_of(airflow).events("e2e-deadline")
                      if e.reason == "DeadlineMissed"]
            time.sleep(1)
        assert len(events) == 1, [(e.reason, e.message) for e in store_of(airflow)
                                  .events("e2e-deadline")]
        (event,) = events
        assert event.kind == "Warning" and event.run_id == f"e2e_deadline/{late.dag_run_id}"
        assert event.message.startswith(
            f"the update run e2e_deadline/{late.dag_run_id} is still running past its ceiling "
            "(3 s after it was queued), deadline "), event.message
    finally:
        run = trigger(client, "airfleet_cluster_delete", {"name": "e2e-deadline"})
        assert wait_run(client, "airfleet_cluster_delete", run.dag_run_id) == "success"


def _parsed(client, dag_id: str, timeout: float = 120) -> None:
    """Wait for a DAG of the e2e-tests bundle (parsed apart from Airfleet's own)."""
    import airflow_client.client as af
    from airflow_client.client.exceptions import NotFoundException

    deadline = time.monotonic() + timeout
    while True:
        try:
            af.DAGApi(client).get_dag(dag_id)
            return
        except NotFoundException:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


# ---- approvals: a policy asks a human before a destructive action (Airflow's HITL) -----------

DELETE = "airfleet_cluster_delete"


def _hitl(airflow, run_id: str, user: str, answer: str | None = None) -> requests.Response:
    """The delete run's approval as ``user`` sees it (GET), or ``user``'s answer (PATCH)."""
    url = (f"{airflow['base']}/api/v2/dags/{DELETE}/dagRuns/{run_id}/taskInstances/admit/-1/"
           "hitlDetails")
    headers = {"Authorization": f"Bearer {token(airflow['base'], user, user)}"}
    if answer is None:
        return requests.get(url, headers=headers, timeout=10)
    return requests.patch(url, headers=headers, timeout=10,
                          json={"chosen_options": [answer], "params_input": {}})


def _awaiting_input(client, run_id: str, timeout: float = 180) -> None:
    import airflow_client.client as af

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ti = af.TaskInstanceApi(client).get_task_instance(DELETE, run_id, "admit")
        state = str(getattr(ti.state, "value", ti.state))
        if state == "awaiting_input":
            return
        if state in ("success", "failed", "skipped", "upstream_failed"):
            print_failed_tasks(client, DELETE, run_id)
            pytest.fail(f"admit of {run_id} ended {state} instead of waiting for input")
        time.sleep(1)
    pytest.fail(f"admit of {run_id} never waited for input")


def _teardowns(airflow, name: str) -> int:
    calls = map(json.loads, (airflow["home"] / "calls.jsonl").read_text().splitlines())
    return sum(1 for c in calls if c["cluster"] == name and c["verb"] == "teardown")


def test_a_delete_waits_for_an_approver_who_approves_rejects_or_never_answers(
        client, dags_parsed, airflow):
    import airflow_client.client as af

    names = {"yes": "e2e-approve", "no": "e2e-reject", "late": "e2e-late"}
    creates = []
    for name in names.values():
        cluster = json.loads(json.dumps(CLUSTER))
        cluster["metadata"]["name"] = name
        creates.append(trigger(client, "airfleet_cluster_create", {"cluster": cluster}))
    assert [wait_run(client, "airfleet_cluster_create", r.dag_run_id) for r in creates] == \
        ["success"] * 3

    def bind(name: str, params: dict) -> requests.Response:
        return _plugin(airflow, "policies/bindings", method="put", json={
            "cluster": name, "bindings": {"delete_cluster": [
                {"policy": "approve_destructive", "params": params}]}})

    # Bad params are refused at bind time, naming the param; nothing is bound.
    refused = bind(names["yes"], {"always": ["delete_cluster"]})
    assert refused.status_code == 400, refused.text
    assert "params: 'approvers' is a required property" in refused.text
    assert _plugin(airflow, f"policies/bindings?cluster={names['yes']}").json() == \
        {"bindings": []}
    for key, name in names.items():
        timeout = 5 if key == "late" else 600
        r = bind(name, {"approvers": ["alice", "bob"], "always": ["delete_cluster"],
                        "timeout_seconds": timeout})
        assert r.status_code == 200, r.text

    runs = {key: trigger(client, DELETE, {"name": name}).dag_run_id
            for key, name in names.items()}
    for run_id in runs.values():
        _awaiting_input(client, run_id)

    store = store_of(airflow)
    asked = _hitl(airflow, runs["yes"], "viewer")
    assert asked.status_code == 200, asked.text
    detail = asked.json()
    assert detail["subject"] == f"Approve the delete of {names['yes']}?"
    assert detail["options"] == ["Approve", "Reject"]
    assert sorted(u["id"] for u in detail["assigned_users"]) == ["alice", "bob"]
    assert "delete_cluster of cluster e2e-approve always needs approval" in detail["body"]
    # Waiting changed nothing, and the run keeps the cluster's lease through the wait.
    for name in names.values():
        assert store.require_cluster(name).phase.value == "Running"
        assert _teardowns(airflow, name) == 0
        assert store.get_lease(name).holder is not None
    assert [e.reason for e in store.events(names["yes"])][-1] == "ApprovalRequested"

    # A viewer may not answer; an admin who is not an approver may not either.
    assert _hitl(airflow, runs["yes"], "viewer", "Approve").status_code == 403
    assert _hitl(airflow, runs["yes"], "admin", "Approve").status_code == 403
    assert store.require_cluster(names["yes"]).phase.value == "Running"

    approved = _hitl(airflow, runs["yes"], "alice", "Approve")
    assert approved.status_code == 200, approved.text
    rejected = _hitl(airflow, runs["no"], "bob", "Reject")
    assert rejected.status_code == 200, rejected.text
    assert _hitl(airflow, runs["yes"], "bob", "Reject").status_code == 409  # answered once

    assert wait_run(client, DELETE, runs["yes"]) == "success"
    assert store.get_cluster(names["yes"]) is None and _teardowns(airflow, names["yes"]) == 1
    reasons = [e.reason for e in store.events(names["yes"])]
    assert reasons[reasons.index("ApprovalRequested"):][:2] == ["ApprovalRequested", "Approved"]
    assert "approved by alice" in store.events(names["yes"])[reasons.index("Approved")].message
    note = af.DagRunApi(client).get_dag_run(DELETE, runs["yes"]).note
    assert note.startswith("approved by alice: approve_destructive: delete_cluster of "
                           "cluster e2e-approve always needs approval"), note
    assert "awaiting" not in note, note

    for key, why in (("no", "rejected by bob"), ("late", "no answer from alice or bob within 5 s")):
        name = names[key]
        assert wait_run(client, DELETE, runs[key], timeout=120) == "failed"
        record = store.require_cluster(name)
        assert record.phase.value == "Running" and _teardowns(airflow, name) == 0
        assert store.get_lease(name).holder is None  # the teardown released it
        (refusal,) = [e for e in store.events(name) if e.reason.startswith("Approval")
                      and e.reason != "ApprovalRequested"]
        assert refusal.reason == {"no": "ApprovalRejected", "late": "ApprovalTimedOut"}[key]
        assert refusal.kind == "Warning"
        assert refusal.message.startswith(f"the delete of {name} was not done: {why} ")
        assert refusal.message.endswith("; nothing was changed")
        assert refusal.message in log_until(client, DELETE, runs[key], "admit", why)
        # The scheduler writes the run's note when the run ends: the refusal, first line.
        note, deadline = None, time.monotonic() + 30
        while note is None and time.monotonic() < deadline:
            note = af.DagRunApi(client).get_dag_run(DELETE, runs[key]).note
            time.sleep(1)
        assert note is not None and note.startswith(f"Failed at admit: {refusal.message}"), note

    # Unbound, the rejected and timed-out clusters delete without asking.
    for key in ("no", "late"):
        r = _plugin(airflow, "policies/bindings", method="put",
                    json={"cluster": names[key], "bindings": {"delete_cluster": []}})
        assert r.status_code == 200, r.text
        run = trigger(client, DELETE, {"name": names[key]})
        assert wait_run(client, DELETE, run.dag_run_id) == "success"
        assert store.get_cluster(names[key]) is None
