"""One health check probes the whole fleet concurrently: the real SSH backend's async probe
against simulated Ray dashboards on loopback (healthy, failing, broken, slow, hanging), reached
by plain HTTP (``clients["dashboard"] = dashboard.direct``; real heads are reached through SSH)."""

from __future__ import annotations

import time

import pytest

from airfleet import flows
from airfleet.backends.ssh import dashboard
from airfleet.store import Store
from tests.fakes.ray_dashboards import RayDashboards, register_fleet

MIX = {"healthy": 0.4, "failing": 0.2, "broken": 0.1, "slow": 0.2, "hanging": 0.1}


def direct(cluster) -> dict:
    return {"dashboard": dashboard.direct}


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
        first = flows.health_check(store, "health/1", clients_for=direct, concurrency=20,
                                   timeout=1.5)
        elapsed = time.monotonic() - started
        store.release_lease("fleet-0000", "update/1", lease.token)
        second = flows.health_check(store, "health/2", clients_for=direct, concurrency=20,
                                    timeout=1.5)

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
        f"head 127.22.0.{i}: Ray GCS not answering at the dashboard "
        f"(http://127.22.0.{i}:{port}; host not probed)" for i in (1, 2)}
    assert _messages(store, fleet, "hanging") == {"health probe timed out after 1.5s"}
    assert all(r.cluster.status.health_checked_at is not None for r in store.list_clusters())


def test_with_no_way_to_the_dashboard_the_probe_fails_saying_so(store):
    with RayDashboards(slow_seconds=0.5) as dashboards:
        register_fleet(store, 1, dashboards.port, {"healthy": 1.0})
        for _ in range(2):  # no clients at all: never plain HTTP by default
            outcome = flows.health_check(store, "health/x", concurrency=1, timeout=2)
    assert outcome == {"fleet-0000": "Failed"}
    assert store.require_cluster("fleet-0000").cluster.status.message == (
        "head 127.20.0.1: cannot reach the Ray dashboard: no way to reach the Ray dashboard "
        "was given (clients['dashboard'])")


def test_the_parts_of_a_sharded_check_probe_every_cluster_once_between_them(store):
    with RayDashboards(slow_seconds=0.5) as dashboards:
        fleet = register_fleet(store, 30, dashboards.port, {"healthy": 1.0})
        parts = [flows.health_check(store, "health/1", clients_for=direct, concurrency=10,
                                    timeout=2, shard=(i, 3)) for i in range(3)]
        asked = ["fleet-0003", "fleet-0017", "nobody"]
        named = [flows.health_check(store, "health/2", asked, direct, concurrency=10,
                                    timeout=2, shard=(i, 3)) for i in range(3)]

    assert all(parts), [len(p) for p in parts]  # 30 names: no part is left empty
    assert sorted(n for p in parts for n in p) == sorted(fleet)  # each cluster in one part
    assert {o for p in parts for o in p.values()} == {"Running"}
    assert [name for p in named for name in p] == [
        n for i in range(3) for n in asked if flows.in_shard(n, (i, 3))]
    assert {n: o for p in named for n, o in p.items()}["nobody"] == "not registered"


def test_a_part_that_is_not_one_of_the_parts_is_refused_before_anything_is_read(store):
    with pytest.raises(ValueError, match=r"shard \(2, 2\): the index must be from 0 to "):
        flows.health_check(store, "health/x", shard=(2, 2))


@pytest.mark.parametrize("raw", ["0", "65", "two", "-1", "1.5"])
def test_a_bad_number_of_health_check_parts_names_the_setting_and_the_fix(raw, monkeypatch):
    from airfleet import config

    monkeypatch.setenv("AIRFLEET_HEALTH_SHARDS", raw)
    with pytest.raises(ValueError, match="AIRFLEET_HEALTH_SHARDS=.*: set it to a whole number "
                                         "from 1 to 64"):
        config.health_shards()
