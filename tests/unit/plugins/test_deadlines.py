"""Deadline alerts (airfleet_airflow.deadlines): what every lifecycle DAG carries, how each flow
configures it, and the triggerer's callback against a real store. The whole path (Airflow's
scheduler missing the deadline, its triggerer running the callback) is in
tests/e2e/test_rest.py."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from airfleet.endpoints import EndpointRequest, example_endpoint
from airfleet.resources import ClusterRequest
from airfleet.store import Store
from airfleet_airflow import deadlines

LIFECYCLE = {"airfleet_cluster_create": "create", "airfleet_cluster_update": "update",
             "airfleet_cluster_onboard": "onboard", "airfleet_cluster_delete": "delete",
             "airfleet_endpoint_deploy": "endpoint_deploy",
             "airfleet_endpoint_scale": "endpoint_scale",
             "airfleet_endpoint_delete": "endpoint_delete"}


def test_every_lifecycle_dag_has_a_usual_time_and_a_ceiling(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    from tests.conftest import ROOT

    dags = DagBag(str(ROOT / "dags")).dags  # not the `dags` fixture: it drops the alerts
    for dag_id, flow in LIFECYCLE.items():
        usual, ceiling = dags[dag_id].deadline
        assert usual.reference.serialize_reference() == {
            "reference_type": "AverageRuntimeDeadline", "max_runs": 10, "min_runs": 3}
        assert usual.interval == timedelta(seconds=deadlines.DEFAULTS[flow][1])
        assert ceiling.reference.serialize_reference() == {
            "reference_type": "DagRunQueuedAtDeadline"}
        assert ceiling.interval == timedelta(seconds=deadlines.DEFAULTS[flow][0])
        assert {usual.callback.path, ceiling.callback.path} == {deadlines.CALLBACK}
        assert usual.callback.kwargs["flow"] == flow
    assert not dags["airfleet_cluster_health_check"].deadline  # scheduled, not a change


def test_each_flow_is_configured_apart(monkeypatch):
    monkeypatch.setenv("AIRFLEET_DEADLINE_CREATE_SECONDS", "1800")
    monkeypatch.setenv("AIRFLEET_DEADLINE_CREATE_SLACK_SECONDS", "90.5")
    usual, ceiling = deadlines.alerts("create")
    assert (usual.interval, ceiling.interval) == (timedelta(seconds=90.5),
                                                  timedelta(seconds=1800))
    assert ceiling.callback.kwargs["expected"] == "ceiling (1800 s after it was queued)"
    assert deadlines.alerts("update")[1].interval == timedelta(seconds=3600)


@pytest.mark.parametrize("value", ["0", "-5", "soon", "", "inf", "nan"])
def test_a_deadline_that_is_not_a_positive_duration_is_refused_naming_it(monkeypatch, value):
    monkeypatch.setenv("AIRFLEET_DEADLINE_DELETE_SECONDS", value)
    with pytest.raises(ValueError, match=(
            r"^AIRFLEET_DEADLINE_DELETE_SECONDS=.*: a deadline is a positive number of "
            r"seconds, e.g. AIRFLEET_DEADLINE_DELETE_SECONDS=3600$")):
        deadlines.alerts("delete")


def test_a_bad_deadline_is_the_dags_import_error_naming_it(airflow_db, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    from tests.conftest import ROOT

    monkeypatch.setenv("AIRFLEET_DEADLINE_ONBOARD_SLACK_SECONDS", "ten minutes")
    bag = DagBag(str(ROOT / "dags" / "airfleet_cluster_onboard.py"))
    (error,) = bag.import_errors.values()
    assert "AIRFLEET_DEADLINE_ONBOARD_SLACK_SECONDS='ten minutes'" in error
    assert "airfleet_cluster_onboard" not in bag.dags


@pytest.fixture
def store(airfleet_home):
    s = Store()
    s.migrate()
    yield s
    s.dispose()


def context(conf: dict, run_id: str = "manual__2026-12-06") -> dict:
    """What Airflow's scheduler hands the callback (``Deadline.handle_miss``)."""
    return {"dag_run": {"dag_id": "airfleet_cluster_update", "dag_run_id": run_id,
                        "conf": conf, "state": "running"},
            "deadline": {"id": "0193", "deadline_time": "2026-12-06T05:00:00+00:00"}}


def test_the_callback_notes_a_warning_in_the_clusters_history(store):
    request = ClusterRequest.model_validate({"metadata": {"name": "llm-a"}, "spec": {
        "type": "ssh", "provider": "static", "config": {"ssh": {
            "head": "10.0.0.1", "credential": {"airflow_conn_id": "ssh_fleet"}}}}})
    store.register_cluster(request, run_id="r0", token=None)
    said = asyncio.run(deadlines.missed("update", "ceiling (3600 s after it was queued)",
                                        context({"cluster": request.model_dump(mode="json")})))
    (event,) = [e for e in store.events("llm-a") if e.reason == "DeadlineMissed"]
    assert event.kind == "Warning"
    assert event.run_id == "airfleet_cluster_update/manual__2026-12-06"
    assert event.message == (
        "the update run airfleet_cluster_update/manual__2026-12-06 is still running past its "
        "ceiling (3600 s after it was queued), deadline 2026-12-06T05:00:00+00:00; it goes "
        "on: look at the run, or mark it failed to stop it")
    assert said == f"{event.message} (noted in the history of cluster llm-a)"


def test_the_callback_notes_an_endpoint_flow_in_the_endpoints_history(store):
    data = example_endpoint()
    store.put_endpoint(EndpointRequest.model_validate(data), run_id="r0", token=None)
    name, version = data["metadata"]["name"], data["spec"]["version"]
    said = asyncio.run(deadlines.missed("endpoint_scale", "usual time",
                                        context({"name": name, "replicas": 2})))
    (event,) = [e for e in store.endpoint_events(name) if e.reason == "DeadlineMissed"]
    assert event.version == version and event.kind == "Warning"
    assert said.endswith(f"(noted in the history of endpoint {name})")


def test_a_run_that_ended_before_its_deadline_is_not_said_to_be_running(store):
    # Airflow prunes deadlines only of a run that succeeded: a failed run's still fire.
    request = ClusterRequest.model_validate({"metadata": {"name": "llm-a"}, "spec": {
        "type": "ssh", "provider": "static", "config": {"ssh": {
            "head": "10.0.0.1", "credential": {"airflow_conn_id": "ssh_fleet"}}}}})
    store.register_cluster(request, run_id="r0", token=None)
    ended = context({"name": "llm-a"})
    ended["dag_run"]["state"] = "failed"
    said = asyncio.run(deadlines.missed("delete", "usual time", ended))
    assert said == ("the delete run airfleet_cluster_update/manual__2026-12-06 had ended "
                    "(failed) before its usual time, deadline 2026-12-06T05:00:00+00:00: "
                    "nothing to note")
    assert [e for e in store.events("llm-a") if e.reason == "DeadlineMissed"] == []


def test_a_run_about_no_registered_cluster_is_logged_only(store, caplog):
    said = asyncio.run(deadlines.missed("delete", "usual time", context({"name": "ghost"})))
    assert said.endswith("(not noted in a history: cluster ghost is not registered)"), said
    assert store.events("ghost") == []
    assert "Deadline missed: the delete run" in caplog.text
