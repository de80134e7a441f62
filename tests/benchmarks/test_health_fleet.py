"""Benchmark: scheduled health checks over 100, 300 and 1,000 registered clusters.

Each cluster is a static-nodes cluster (head + 1 worker) whose head is its own loopback address
(127.20-24.x.y); its probe is the real SSH backend's async probe (``health_async``: Ray
dashboard GCS health, then the nodes) against simulated dashboards served by a child process
(tests/fakes/ray_dashboards.py): 70% healthy, 10% failing (the worker DEAD), 5% broken (500),
10% slow (each answer after 1 s: a probe asks twice, so ~2 s), 5% hanging (never answer; the
per-cluster timeout of 5 s ends them). At most 50 probes run at once. The store is SQLite, as
`make run`'s. Each fleet is checked twice: the first check (every failed probe is a first miss:
the cluster stays Running) and the next one (those clusters turn Failed).

The SSH tunnel is NOT part of these figures. A real head's dashboard answers on its loopback
only and production probes reach it through an SSH forward (one SSH connection per cluster
per probe); these simulated dashboards are reached by plain HTTP because the benchmark passes
``clients["dashboard"] = dashboard.direct`` explicitly and no SSH client, so a missing node's
reachability is "host not probed" too. What the tunnel adds per cluster is measured on real
sshd nodes by tests/benchmarks/test_tunnel_cost.py.

Prints the figures and writes them to ``tests/benchmarks/results/health_fleet.json``; asserts
nothing about time (goal: 1,000 clusters under 60 s, cost growing linearly).
"""

from __future__ import annotations

import json
import resource
import time
from collections import Counter
from pathlib import Path

import pytest

from airfleet import flows
from airfleet.backends.ssh import dashboard
from airfleet.store import Store
from tests.fakes.ray_dashboards import RayDashboards, register_fleet

pytestmark = pytest.mark.benchmark

RESULTS = Path(__file__).resolve().parent / "results" / "health_fleet.json"
MIX = {"healthy": 0.70, "failing": 0.10, "broken": 0.05, "slow": 0.10, "hanging": 0.05}
SIZES = (100, 300, 1000)
TIMEOUT, CONCURRENCY, SLOW_SECONDS = 5.0, 50, 1.0


def DIRECT(cluster) -> dict:  # noqa: N802 - a constant in spirit: the clients of every probe
    """Plain HTTP to the simulated dashboards, no SSH: the tunnel's cost is not measured here."""
    return {"dashboard": dashboard.direct}


def _check(store: Store, run_id: str) -> dict:
    started, cpu = time.monotonic(), time.process_time()
    outcomes = flows.health_check(store, run_id, clients_for=DIRECT, concurrency=CONCURRENCY,
                                  timeout=TIMEOUT)
    wall, cpu = time.monotonic() - started, time.process_time() - cpu
    timed_out = sum("timed out" in r.cluster.status.message for r in store.list_clusters())
    return {"wall_seconds": round(wall, 2), "ms_per_cluster": round(1000 * wall / len(outcomes), 2),
            "cpu_seconds": round(cpu, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "outcomes": dict(Counter(outcomes.values())), "timed_out": timed_out}


def test_health_check_cost_over_fleet_sizes(tmp_path, monkeypatch):
    monkeypatch.delenv("AIRFLEET_BACKENDS", raising=False)  # the real SSH backend
    figures = {"timeout_seconds": TIMEOUT, "concurrency": CONCURRENCY,
               "slow_seconds": SLOW_SECONDS, "mix": MIX, "fleets": []}
    with RayDashboards(slow_seconds=SLOW_SECONDS) as dashboards:
        for size in SIZES:
            store = Store(f"sqlite:///{tmp_path / f'fleet-{size}.db'}")
            store.migrate()
            started = time.monotonic()
            register_fleet(store, size, dashboards.port, MIX)
            fleet = {"clusters": size, "register_seconds": round(time.monotonic() - started, 2),
                     "first": _check(store, f"health/{size}/1"),
                     "next": _check(store, f"health/{size}/2")}
            store.dispose()
            figures["fleets"].append(fleet)
            for which in ("first", "next"):
                run = fleet[which]
                print(f"health check ({which}) of {size} clusters: {run['wall_seconds']} s "
                      f"({run['ms_per_cluster']} ms/cluster, {run['cpu_seconds']} s CPU), "
                      f"peak RSS {run['peak_rss_mib']} MiB, outcomes {run['outcomes']}, "
                      f"{run['timed_out']} timed out")
            assert sum(fleet["next"]["outcomes"].values()) == size  # each cluster has one
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
