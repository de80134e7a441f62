"""One health check probes the whole fleet concurrently: against simulated Ray dashboards on
loopback (healthy, failing, slow, hanging), with the real SSH backend's async probe."""

from __future__ import annotations

import time

import pytest

from airfleet import flows
from airfleet.store import Store
from tests.fakes.ray_dashboards import RayDashboards, register_fleet


@pytest.fixture
def store(airfleet_home, monkeypatch):
    monkeypatch.delenv("AIRFLEET_BACKENDS", raising=False)  # the real SSH backend
    s = Store()
    s.migrate()
    return s


def test_a_fleet_is_probed_concurrently_and_a_hanging_cluster_only_times_out(store):
    mix = {"healthy": 0.5, "failing": 0.25, "slow": 0.125, "hanging": 0.125}
    with RayDashboards({}, slow_seconds=1.0) as dashboards:
        dashboards.heads.update(register_fleet(store, 16, dashboards.port, mix))
        lease = store.acquire_lease("fleet-0000", "update/1")  # a flow holds this one
        started = time.monotonic()
        outcomes = flows.health_check(store, "health/1", concurrency=16, timeout=3.0)
        elapsed = time.monotonic() - started

    # 2 slow (1 s) and 2 hanging (3 s timeout) clusters: one timeout's wait, not a sum.
    assert elapsed < 6, elapsed
    assert outcomes.pop("fleet-0000") == "skipped: held by update/1"
    store.release_lease("fleet-0000", "update/1", lease.token)
    by_probe = {}
    for record in store.list_clusters():
        if record.name in outcomes:
            by_probe.setdefault(record.cluster.metadata.labels["probe"], set()).add(
                (outcomes[record.name], record.cluster.status.message.split(":")[0]))
    # A Running cluster turns Failed only on its second failed probe in a row.
    assert {o for o, _ in by_probe["healthy"] | by_probe["slow"]} == {"Running"}
    assert {o for o, _ in by_probe["failing"] | by_probe["hanging"]} == {"Running"}
    hanging = [r for r in store.list_clusters() if r.cluster.metadata.labels["probe"] == "hanging"]
    assert all("timed out after 3s" in r.cluster.status.message for r in hanging)
    failing = [r for r in store.list_clusters() if r.cluster.metadata.labels["probe"] == "failing"]
    assert all("worker 10.77." in r.cluster.status.message and "not ALIVE" in
               r.cluster.status.message for r in failing)
    assert all(r.cluster.status.health_checked_at is not None
               for r in store.list_clusters() if r.name != "fleet-0000")
