"""Benchmark: one scheduled health check over 100, 300 and 1,000 registered clusters.

Each cluster is a static-nodes cluster (head + 1 worker) whose head is its own loopback address;
its probe is the real SSH backend's async probe (Ray dashboard: GCS health, then the nodes)
against simulated dashboards (tests/fakes/ray_dashboards.py): 70% healthy, 15% failing (a worker
DEAD), 10% slow (answer after 2 s), 5% hanging (never answer; the 5 s per-cluster timeout ends
them). No SSH client is given, so the reachability of a missing node is "host not probed".
The store is SQLite, as `make run`'s. Prints the figures and writes them to
``tests/benchmarks/results/health_fleet.json``; asserts nothing about time (goal: 1,000
clusters under 60 s, cost growing linearly).
"""

from __future__ import annotations

import json
import resource
import time
from collections import Counter
from pathlib import Path

import pytest

from airfleet import flows
from airfleet.store import Store
from tests.fakes.ray_dashboards import RayDashboards, register_fleet

pytestmark = pytest.mark.benchmark

RESULTS = Path(__file__).resolve().parent / "results" / "health_fleet.json"
MIX = {"healthy": 0.70, "failing": 0.15, "slow": 0.10, "hanging": 0.05}
TIMEOUT, CONCURRENCY = 5.0, 50


def test_health_check_cost_over_fleet_sizes(tmp_path, monkeypatch):
    monkeypatch.delenv("AIRFLEET_BACKENDS", raising=False)
    figures = {"timeout_seconds": TIMEOUT, "concurrency": CONCURRENCY, "mix": MIX, "runs": []}
    for size in (100, 300, 1000):
        store = Store(f"sqlite:///{tmp_path / f'fleet-{size}.db'}")
        store.migrate()
        with RayDashboards({}) as dashboards:
            dashboards.heads.update(register_fleet(store, size, dashboards.port, MIX))
            started = time.monotonic()
            outcomes = flows.health_check(store, "health/bench", concurrency=CONCURRENCY,
                                          timeout=TIMEOUT)
            wall = time.monotonic() - started
        run = {"clusters": size, "wall_seconds": round(wall, 2),
               "ms_per_cluster": round(1000 * wall / size, 2),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "outcomes": dict(Counter(outcomes.values()))}
        figures["runs"].append(run)
        print(f"health check of {size} clusters: {run['wall_seconds']} s "
              f"({run['ms_per_cluster']} ms/cluster), peak RSS {run['peak_rss_mib']} MiB, "
              f"outcomes {run['outcomes']}")
        assert len(outcomes) == size  # every cluster got an outcome
        store.dispose()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2))
