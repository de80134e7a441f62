"""Endpoint versions in the store (airfleet.store.endpoints), on SQLite and on PostgreSQL:
registering, adopting, spec changes, the endpoint state machine, history and fencing by the
cluster's lease."""

from __future__ import annotations

import pytest

from airfleet.endpoints import EndpointPhase, EndpointRequest, EndpointStatus, example_endpoint
from airfleet.errors import Conflict, IllegalTransition, NotFound, StaleFencingToken
from airfleet.store import Store


def request(version: str = "v1", cluster: str = "llm-a", **spec) -> EndpointRequest:
    data = example_endpoint()
    data["spec"].update(version=version, cluster=cluster, **spec)
    return EndpointRequest.model_validate(data)


def status(phase: EndpointPhase, message: str = "", **more) -> EndpointStatus:
    return EndpointStatus(phase=phase, message=message, **more)


def test_a_new_version_is_pending_and_a_rerun_adopts_it(store: Store):
    record, created = store.put_endpoint(request(), run_id="r1", token=None)
    assert created and record.phase is EndpointPhase.PENDING and record.generation == 1
    again, created = store.put_endpoint(request(), run_id="r2", token=None)
    assert not created and again.uid == record.uid and again.generation == 1
    assert [(e.reason, e.to_phase) for e in store.endpoint_events("chat")] == \
        [("Registered", "Pending")]


def test_a_changed_spec_grows_the_generation_and_keeps_the_status(store: Store):
    store.put_endpoint(request(), run_id="r1", token=None)
    store.set_endpoint_status("chat", "v1", status(EndpointPhase.DEPLOYING), reason="Deploy",
                              run_id="r1")
    record, created = store.put_endpoint(request(replicas=3), run_id="r2", token=None)
    assert not created and record.generation == 2 and record.endpoint.spec.replicas == 3
    assert record.phase is EndpointPhase.DEPLOYING
    assert "SpecChanged" in [e.reason for e in store.endpoint_events("chat")]


def test_versions_are_separate_rows_listed_per_endpoint_and_cluster(store: Store):
    store.put_endpoint(request("v1"), run_id="r1", token=None)
    store.put_endpoint(request("v2", traffic_weight=100), run_id="r2", token=None)
    store.put_endpoint(EndpointRequest.model_validate(
        {**example_endpoint(), "metadata": {"name": "embed"},
         "spec": {**example_endpoint()["spec"], "cluster": "llm-b"}}), run_id="r3", token=None)
    assert [r.version for r in store.endpoint_versions("chat")] == ["v1", "v2"]
    assert [(r.name, r.version) for r in store.list_endpoints(cluster="llm-a")] == \
        [("chat", "v1"), ("chat", "v2")]
    assert len(store.list_endpoints()) == 3


def test_a_version_cannot_move_to_another_cluster(store: Store):
    store.put_endpoint(request(), run_id="r1", token=None)
    with pytest.raises(Conflict, match="runs on cluster llm-a; delete it there"):
        store.put_endpoint(request(cluster="llm-b"), run_id="r2", token=None)


def test_the_state_machine_is_enforced_and_recorded(store: Store):
    store.put_endpoint(request(), run_id="r1", token=None)
    with pytest.raises(IllegalTransition, match="from Pending an endpoint may go to"):
        store.set_endpoint_status("chat", "v1", status(EndpointPhase.RUNNING), reason="X",
                                  run_id="r1")
    for phase in (EndpointPhase.DEPLOYING, EndpointPhase.RUNNING, EndpointPhase.FAILED,
                  EndpointPhase.RUNNING, EndpointPhase.DELETED):
        store.set_endpoint_status("chat", "v1", status(phase, ready_replicas=1), reason="Step",
                                  run_id="r1")
    moves = [(e.from_phase, e.to_phase) for e in store.endpoint_events("chat")
             if e.kind == "Transition"]
    assert moves == [("Pending", "Deploying"), ("Deploying", "Running"), ("Running", "Failed"),
                     ("Failed", "Running"), ("Running", "Deleted")]
    assert store.get_endpoint("chat", "v1") is None
    assert store.list_endpoints(include_deleted=True)[0].deleted_at is not None
    # The name and version can be used again; the history keeps both incarnations.
    record, created = store.put_endpoint(request(), run_id="r2", token=None)
    assert created and record.phase is EndpointPhase.PENDING
    assert len({e.run_id for e in store.endpoint_events("chat")}) == 2


def test_only_if_newer_never_overwrites_a_newer_status(store: Store):
    from datetime import timedelta

    record, _ = store.put_endpoint(request(), run_id="r1", token=None)
    old = record.endpoint.status.observed_at - timedelta(seconds=5)
    assert store.set_endpoint_status("chat", "v1", status(EndpointPhase.FAILED,
                                                          observed_at=old),
                                     reason="HealthCheck", run_id="h", only_if_newer=True) is None
    assert store.require_endpoint("chat", "v1").phase is EndpointPhase.PENDING


def test_set_endpoint_spec_changes_fields_as_one_history_entry(store: Store):
    store.put_endpoint(request(), run_id="r1", token=None)
    record = store.set_endpoint_spec("chat", "v1", {"replicas": 4}, reason="Scaled",
                                     message="replicas 1 -> 4", run_id="r2", token=None)
    assert record.endpoint.spec.replicas == 4 and record.generation == 2
    same = store.set_endpoint_spec("chat", "v1", {"replicas": 4}, reason="Scaled",
                                   message="again", run_id="r3", token=None)
    assert same.generation == 2
    assert [e.message for e in store.endpoint_events("chat") if e.reason == "Scaled"] == \
        ["replicas 1 -> 4"]
    assert [e.reason for e in store.run_endpoint_events("r2")] == ["Scaled"]


def test_writes_are_fenced_by_the_clusters_lease(store: Store):
    lease = store.acquire_lease("llm-a", "run-1")
    store.put_endpoint(request(), run_id="run-1", token=lease.token)
    store.break_lease("llm-a")
    store.acquire_lease("llm-a", "run-2")
    with pytest.raises(StaleFencingToken):
        store.set_endpoint_status("chat", "v1", status(EndpointPhase.DEPLOYING), reason="X",
                                  run_id="run-1", token=lease.token)
    with pytest.raises(StaleFencingToken):
        store.put_endpoint(request(replicas=2), run_id="run-1", token=lease.token)
    assert store.require_endpoint("chat", "v1").endpoint.spec.replicas == 1


def test_unknown_versions_are_not_found(store: Store):
    with pytest.raises(NotFound, match="endpoint chat has no version v9"):
        store.require_endpoint("chat", "v9")
    with pytest.raises(NotFound):
        store.set_endpoint_status("chat", "v9", status(EndpointPhase.DEPLOYING), reason="X",
                                  run_id="r")
