"""One health check probes the whole fleet concurrently: the real SSH backend's async probe
against simulated Ray dashboards on loopback (healthy, failing, broken, slow, hanging)."""

from __future__ import annotations

import time

import pytest

from airfleet import flows
from airfleet.store import Store
from tests.fakes.ray_dashboards import RayDashboards, register_fleet

MIX = {"healthy": 0.4, "failing": 0.2, "broken": 0.1, "slow": 0.2, "hanging": 0.1}


@pytest.fixture
def store(airfleet_home, monkeypatch):
    monkeypatch.delenv("AIRFLEET_BACKENDS", raising=False)  # the real SSH backend
    s = Store()
    s.migrate()
    return s


def _messages(store: Store, fleet: dict[str, str], behaviour: str) -> set[str]:
    return {store.require_cluster(name).cluster.status.message
            for name, b in fleet.items() if b == behaviour and name != "fleet-0000"}


def test_a_fleet_is_probed_concurrently_and_a_hanging_cluster_only_times_out(store):
    with RayDashboards(slow_seconds=0.5) as dashboards:
        fleet = register_fleet(store, 20, dashboards.port, MIX)
        lease = store.acquire_lease("fleet-0000", "update/1")  # a flow holds this one
        started = time.monotonic()
        first = flows.health_check(store, "health/1", concurrency=20, timeout=1.5)
        elapsed = time.monotonic() - started
        store.release_lease("fleet-0000", "update/1", lease.token)
        second = flows.health_check(store, "health/2", concurrency=20, timeout=1.5)

    # 4 slow (0.5 s) and 2 hanging (1.5 s timeout) clusters: one timeout's wait, not a sum.
    assert elapsed < 3, elapsed
    assert first.pop("fleet-0000") == "skipped: held by update/1"
    assert set(first.values()) == {"Running"}  # one failed probe does not flip a cluster
    assert {second[n] for n, b in fleet.items() if b in ("healthy", "slow")} == {"Running"}
    assert {second[n] for n, b in fleet.items() if b not in ("healthy", "slow")} == {"Failed"}

    port = dashboards.port
    assert _messages(store, fleet, "healthy") | _messages(store, fleet, "slow") == \
        {"all 2 nodes ALIVE"}
    assert _messages(store, fleet, "failing") == {
        f"worker 10.21.0.{i}: Ray node not ALIVE; host not probed" for i in (1, 2, 3, 4)}
    assert _messages(store, fleet, "broken") == {
        f"head 127.22.0.{i}: Ray GCS not answering at http://127.22.0.{i}:{port} "
        "(host not probed)" for i in (1, 2)}
    assert _messages(store, fleet, "hanging") == {"health probe timed out after 1.5s"}
    assert all(r.cluster.status.health_checked_at is not None for r in store.list_clusters())
