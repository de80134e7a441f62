"""``airfleet.flows.admit`` (the first writes of a run, in its first task) and ``held_by``
(how the lease teardown finds what a run holds when its first task told nothing)."""

from __future__ import annotations

import pytest

from airfleet import flows
from airfleet.resources import Phase
from airfleet.store import Store

REQUEST = {"metadata": {"name": "llm-a"},
           "spec": {"type": "ssh", "provider": "static",
                    "config": {"ssh": {"head": "10.0.0.1",
                                       "credential": {"airflow_conn_id": "ssh"}}}}}


@pytest.fixture
def store(airfleet_home, monkeypatch):
    monkeypatch.setenv("AIRFLEET_BACKENDS", "ssh=tests.fakes.recording_backend:RecordingBackend")
    s = Store()
    s.migrate()
    return s


def transitions(store: Store) -> list[tuple[str | None, str | None]]:
    return [(e.from_phase, e.to_phase) for e in store.events("llm-a") if e.to_phase]


def test_create_registers_then_shows_provisioning_under_the_lease(store):
    lease = flows.acquire(store, "llm-a", "create/1")
    assert flows.admit("create", store, lease, {"request": REQUEST}) is True
    assert transitions(store) == [(None, "Pending"), ("Pending", "Provisioning")]
    assert {e.run_id for e in store.events("llm-a")} == {"create/1"}


def test_update_records_the_desired_spec_then_updating(store):
    lease = flows.acquire(store, "llm-a", "create/1")
    flows.register(store, lease, REQUEST)
    flows.finish(store, lease, Phase.RUNNING, "Created")
    flows.release(store, lease)
    desired = {**REQUEST, "spec": {**REQUEST["spec"], "config": {"ssh": {
        **REQUEST["spec"]["config"]["ssh"], "workers": ["10.0.0.2"]}}}}

    lease = flows.acquire(store, "llm-a", "update/2")
    assert flows.admit("update", store, lease, {"request": desired}) is True
    record = store.require_cluster("llm-a")
    assert record.generation == 2 and record.phase is Phase.UPDATING


def test_onboard_registers_and_shows_no_transient_phase(store):
    lease = flows.acquire(store, "llm-a", "onboard/1")
    assert flows.admit("onboard", store, lease, {"request": REQUEST}) is True
    assert store.require_cluster("llm-a").phase is Phase.PENDING


def test_delete_of_a_cluster_that_is_not_registered_has_nothing_to_do(store):
    lease = flows.acquire(store, "llm-a", "delete/1")
    assert flows.admit("delete", store, lease, {"request": None}) is False
    assert store.get_cluster("llm-a") is None


def test_held_by_finds_a_runs_lease_without_its_token_and_only_while_it_holds_it(store):
    lease = flows.acquire(store, "llm-a", "create/1")
    flows.acquire(store, "llm-b", "update/7")
    assert flows.held_by(store, "create/1") == [lease]
    assert flows.held_by(store, "create/2") == []

    flows.release(store, flows.held_by(store, "create/1")[0])
    assert flows.held_by(store, "create/1") == []
    assert store.get_lease("llm-a").holder is None
    assert store.get_lease("llm-b").holder == "update/7"
