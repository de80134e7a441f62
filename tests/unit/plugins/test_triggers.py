"""The triggers as the triggerer runs them (``run()`` in an event loop): the drain trigger
against a real HTTP server that answers like Ray's dashboard (reached directly: the SSH tunnel
is exercised end to end in tests/integration/test_ssh_backend.py), and the lease every trigger
keeps while it waits, in a real store."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from airflow.sdk.module_loading import import_string
from airflow.triggers.base import TriggerEvent

from airfleet.backends.ssh import dashboard
from airfleet.errors import LeaseHeld
from airfleet.resources import ClusterRequest
from airfleet.store import Store
from airfleet_airflow import triggers
from airfleet_airflow.triggers import (
    LEASE_LOST,
    AksOperationTrigger,
    ClusterProbeTrigger,
    EksWaitTrigger,
    RayNodesDeadTrigger,
)

NODES = {"10.0.0.2": "a1", "10.0.0.3": "b2"}
NAME, HOLDER = "static-a", "airfleet_cluster_update/run-1"
LEASE = {"name": NAME, "holder": HOLDER, "token": 3}
EKS_WAIT = {"kind": "eks_nodegroup_active", "what": "EKS node group c/gpu CREATING",
            "args": {"cluster": "c", "nodegroup": "gpu", "region": "eu-west-1",
                     "aws_conn_id": "aws_default", "timeout": 1800}}
AKS_WAIT = {"kind": "azure_operation", "what": "agentPool c/gpu: create",
            "args": {"azure_conn_id": "azure_default", "subscription_id": "s",
                     "resource_group": "rg", "cluster": "c", "pool": "gpu",
                     "operation": "agent_pools.begin_create_or_update",
                     "continuation_token": "eyJ2ZXJzaW9uIjoxfQ==", "timeout": 3600}}


class Dashboard:
    """``/api/v0/nodes`` with node states the test changes while the trigger polls."""

    def __init__(self):
        self.states = {"a1": "ALIVE", "b2": "ALIVE"}
        self.requests = 0
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                dashboard.requests += 1
                rows = [{"node_id": i, "node_ip": ip, "state": dashboard.states[i],
                         "is_head_node": False} for ip, i in NODES.items()]
                body = json.dumps({"data": {"result": {"result": rows}}}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_port

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dash():
    d = Dashboard()
    yield d
    d.close()


@pytest.fixture
def store(airfleet_home, monkeypatch):
    """The triggerer's store (``Store()`` reads AIRFLEET_DATABASE_URL), short leases."""
    monkeypatch.setenv("AIRFLEET_LEASE_SECONDS", "2")
    s = Store()
    s.migrate()
    yield s
    s.dispose()


def held_lease(store: Store, port: int = 9) -> dict:
    """A static-nodes cluster whose head (127.0.0.1) serves its dashboard on ``port``, and
    the lease of the run that drains it, taken for AIRFLEET_LEASE_SECONDS."""
    from airfleet import config

    lease = store.acquire_lease(NAME, HOLDER, ttl=config.lease_seconds())
    request = ClusterRequest.model_validate({"metadata": {"name": NAME}, "spec": {
        "type": "ssh", "provider": "static", "config": {"ssh": {
            "head": "127.0.0.1", "workers": list(NODES),
            "credential": {"airflow_conn_id": "ssh_fleet"}, "ray": {"dashboard_port": port}}}}})
    store.register_cluster(request, run_id=HOLDER, token=lease.token)
    return {"name": NAME, "holder": HOLDER, "token": lease.token}


@pytest.fixture
def direct(monkeypatch):
    """The drain trigger reaches the fake dashboard directly (no SSH here)."""
    def reach(self):
        store = Store()
        try:
            return store.require_cluster(self.lease["name"]).cluster, \
                {"dashboard": dashboard.direct}
        finally:
            store.dispose()

    monkeypatch.setattr(RayNodesDeadTrigger, "_reach", reach)


def first_event(trigger, timeout: float = 30):
    async def go():
        async for event in trigger.run():
            return event.payload
    return asyncio.run(asyncio.wait_for(go(), timeout))


# ---- serialization: kwargs only, no secret -------------------------------------------------

@pytest.mark.parametrize("trigger, kwargs", [
    (RayNodesDeadTrigger(LEASE, NODES, 1234.5, poll_interval=2),
     {"lease": LEASE, "nodes": NODES, "deadline": 1234.5, "poll_interval": 2}),
    (ClusterProbeTrigger(LEASE, "wait_ready", 1234.5, poll_interval=3),
     {"lease": LEASE, "verb": "wait_ready", "deadline": 1234.5, "poll_interval": 3}),
    (ClusterProbeTrigger(LEASE, "teardown_done", 1234.5, poll_interval=3),
     {"lease": LEASE, "verb": "teardown_done", "deadline": 1234.5, "poll_interval": 3}),
    (triggers.cloud_wait_trigger(EKS_WAIT, LEASE, 0.5),
     {"lease": LEASE, "wait": EKS_WAIT, "poll_interval": 0.5}),
    (triggers.cloud_wait_trigger(AKS_WAIT, LEASE, 0.5),
     {"lease": LEASE, "wait": AKS_WAIT, "poll_interval": 0.5}),
], ids=["RayNodesDead", "ClusterReady", "TeardownDone", "EksWait", "AksOperation"])
def test_serialize_round_trip_carries_the_lease_and_no_secret(trigger, kwargs):
    path, got = trigger.serialize()
    assert got == kwargs
    again = import_string(path)(**got)
    assert type(again) is type(trigger) and again.serialize() == (path, got)


def test_the_cloud_wait_trigger_is_chosen_by_the_waits_kind():
    assert type(triggers.cloud_wait_trigger(EKS_WAIT, LEASE, 1)) is EksWaitTrigger
    assert type(triggers.cloud_wait_trigger(AKS_WAIT, LEASE, 1)) is AksOperationTrigger
    with pytest.raises(ValueError, match="no trigger waits on 'gce_cluster'"):
        triggers.cloud_wait_trigger({"kind": "gce_cluster", "what": "?", "args": {}}, LEASE, 1)


# ---- the drain wait ------------------------------------------------------------------------

def test_reports_dead_once_every_drained_node_is(dash, store, direct):
    lease = held_lease(store, dash.port)

    def die_later():
        time.sleep(0.5)
        dash.states["a1"] = "DEAD"
        time.sleep(0.5)
        dash.states["b2"] = "DEAD"

    threading.Thread(target=die_later).start()
    event = first_event(RayNodesDeadTrigger(lease, NODES, time.time() + 20, 0.1))
    assert event == {"status": "dead", "alive": [], "dead": list(NODES),
                     "message": "every drained node is DEAD"}
    assert dash.requests >= 3  # it polled until both were DEAD


def test_reports_the_nodes_still_alive_at_the_deadline(dash, store, direct):
    lease = held_lease(store, dash.port)
    dash.states["a1"] = "DEAD"
    started = time.monotonic()
    event = first_event(RayNodesDeadTrigger(lease, NODES, time.time() + 1, 0.2))
    assert event["status"] == "deadline" and event["alive"] == ["10.0.0.3"]
    assert event["dead"] == ["10.0.0.2"]
    assert 0.8 <= time.monotonic() - started < 5


def test_a_silent_dashboard_is_asked_until_the_deadline(store, direct):
    lease = held_lease(store, port=9)  # nothing listens there
    event = first_event(RayNodesDeadTrigger(lease, NODES, time.time() + 1, 0.2))
    assert event["status"] == "deadline" and event["alive"] == list(NODES)
    assert event["message"].startswith("dashboard did not answer")


def test_without_a_way_to_the_dashboard_it_says_so_at_the_deadline(store, monkeypatch):
    lease = held_lease(store)  # the real clients: the Airflow connection ssh_fleet is missing
    monkeypatch.delenv("AIRFLOW_CONN_SSH_FLEET", raising=False)
    event = first_event(RayNodesDeadTrigger(lease, NODES, time.time() + 1, 0.2))
    assert event["status"] == "deadline"
    assert "Airflow connection 'ssh_fleet' does not exist" in event["message"]


# ---- the lease, kept while waiting ---------------------------------------------------------

def test_a_drain_twice_as_long_as_the_lease_keeps_the_cluster_held(dash, store, direct):
    from airfleet import config

    ttl = config.lease_seconds()  # 2 s here
    lease = held_lease(store, dash.port)
    refusals: list[str] = []

    def another_flow_tries():
        deadline = time.monotonic() + 2 * ttl
        while time.monotonic() < deadline:
            time.sleep(ttl / 2)
            try:
                store.acquire_lease(NAME, "airfleet_cluster_delete/run-2", ttl=ttl)
                refusals.append("TAKEN")
            except LeaseHeld as exc:
                refusals.append(str(exc))
        dash.states.update(a1="DEAD", b2="DEAD")  # the drain ends after 2 TTLs

    threading.Thread(target=another_flow_tries).start()
    started = time.monotonic()
    event = first_event(RayNodesDeadTrigger(lease, NODES, time.time() + 30, 0.2))
    assert event["status"] == "dead", event
    assert time.monotonic() - started >= 2 * ttl
    assert len(refusals) >= 3 and "TAKEN" not in refusals
    assert all(f"is held by run {HOLDER}" in r for r in refusals), refusals
    held = store.get_lease(NAME)
    assert (held.holder, held.token) == (HOLDER, lease["token"]) and held.held


@pytest.mark.parametrize("trigger_class, args", [
    (RayNodesDeadTrigger, (NODES, 10**10, 0.1)),
    (ClusterProbeTrigger, ("teardown_done", 10**10, 0.1)),
    (EksWaitTrigger, (EKS_WAIT, 0.1)),
    (AksOperationTrigger, (AKS_WAIT, 0.1)),
], ids=["RayNodesDead", "ClusterProbe", "EksWait", "AksOperation"])
def test_a_lease_lost_while_waiting_ends_the_wait_with_the_reason(trigger_class, args, store,
                                                                  monkeypatch):
    async def forever(self):
        await asyncio.sleep(3600)
        yield  # pragma: no cover

    monkeypatch.setattr(trigger_class, "wait", forever)  # a wait that would never end itself
    lease = held_lease(store)
    if trigger_class in (EksWaitTrigger, AksOperationTrigger):
        trigger = trigger_class(args[0], lease, args[1])
    else:
        trigger = trigger_class(lease, *args)

    def break_it():
        time.sleep(1.5)  # past the first renewals
        store.break_lease(NAME)

    threading.Thread(target=break_it).start()
    started = time.monotonic()
    event = first_event(trigger, timeout=10)
    assert time.monotonic() - started < 1.5 + 2  # found at the next renewal (every TTL/3)
    assert event["status"] == LEASE_LOST
    assert event["message"].startswith(f"run {HOLDER} lost its lease on cluster {NAME} "
                                       "while waiting (")
    assert "released" in event["message"] and event["message"].endswith("changes nothing more")


def test_a_lease_taken_over_before_the_wait_starts_ends_it_at_once(dash, store, direct):
    lease = held_lease(store, dash.port)
    store.break_lease(NAME)
    store.acquire_lease(NAME, "airfleet_cluster_delete/run-2")
    event = first_event(RayNodesDeadTrigger(lease, NODES, time.time() + 20, 0.1), timeout=5)
    assert event["status"] == LEASE_LOST
    assert "held by airfleet_cluster_delete/run-2" in event["message"]


@pytest.mark.parametrize("operator, resumed", [("WaitReadyOperator", "execute_complete"),
                                               ("CloudReconcileOperator", "execute_complete"),
                                               ("CloudReconcileOperator", "drained")])
def test_the_operator_fails_the_task_with_the_reason_when_the_lease_was_lost(operator, resumed):
    from airflow.sdk.exceptions import AirflowFailException

    from airfleet_airflow import operators

    kwargs = {"verb": "scale", "then": ["drain_nodes", "apply"]} \
        if operator == "CloudReconcileOperator" else {}
    task = getattr(operators, operator)(task_id="t", lease=LEASE, **kwargs)
    reason = f"run {HOLDER} lost its lease on cluster {NAME} while waiting (...)"
    with pytest.raises(AirflowFailException, match=r"lost its lease on cluster static-a"):
        getattr(task, resumed)({}, event={"status": LEASE_LOST, "message": reason})


# ---- the hold: Airflow 3.3 fails a task that resumes too soon after defer() ----------------

@pytest.mark.parametrize("wait_seconds, seen_after", [(0, 1.5), (2.5, 2.5)],
                         ids=["ends-at-once", "ends-after-the-hold"])
def test_the_event_of_a_wait_is_held_until_resume_after_seconds_and_no_longer(
        wait_seconds, seen_after, store, monkeypatch):
    """apache/airflow#72716: the scheduler marks a resumed task failed when it takes in the
    executor's "success" for the deferring worker's exit only after the resumed try started.
    A wait that ends at once is held until AIRFLEET_RESUME_AFTER_SECONDS after it began; one
    that ends later is not held at all."""
    async def ends(self):
        await asyncio.sleep(wait_seconds)
        yield TriggerEvent({"done": True, "message": "gone"})

    monkeypatch.setenv("AIRFLEET_RESUME_AFTER_SECONDS", "1.5")
    monkeypatch.setattr(ClusterProbeTrigger, "wait", ends)
    trigger = ClusterProbeTrigger(held_lease(store), "teardown_done", time.time() + 30, 0.1)
    started = time.monotonic()
    event = first_event(trigger, timeout=10)
    took = time.monotonic() - started
    assert event == {"done": True, "message": "gone"}
    assert seen_after <= took < seen_after + 0.5, took
