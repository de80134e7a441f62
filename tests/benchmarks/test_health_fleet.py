"""Benchmark: scheduled health checks over 1,000, 3,000 and 10,000 registered clusters.

Each cluster is a static-nodes cluster (head + 1 worker) whose head is its own loopback address
(127.20-24.x.y); its probe is the real SSH backend's async probe (``health_async``: Ray
dashboard GCS health, then the nodes) against simulated dashboards served by a child process
(tests/fakes/ray_dashboards.py): 70% healthy, 10% failing (the worker DEAD), 5% broken (500),
10% slow (each answer after 1 s: a probe asks twice, so ~2 s), 5% hanging (never answer; the
per-cluster timeout of 5 s ends them). The fleet is checked in ``AIRFLEET_HEALTH_SHARDS``
parts (default 2), each in a process of its own (tests/benchmarks/health_part.py), as the DAG's
mapped ``check_fleet`` task instances run; the parts' processes start before the clock does
(an Airflow task's start-up is not counted here). Each part runs at most 200 probes at once
(``CONCURRENCY``, what ``AIRFLEET_HEALTH_CONCURRENCY`` would be set to for such a fleet: at
its default of 50 the slow and hanging clusters alone hold one part's slots 4,500 s at 10,000
clusters, 90 s however fast the rest is; the printout gives that floor for each size). The
store is SQLite, as
`make run`'s. Each fleet is checked twice: the first check (every failed probe is a first
miss: the cluster stays Running) and the next one (those clusters turn Failed). The fleet is
written into the store in one transaction (``register_fleet(bulk=True)``: the rows the
create flow leaves); that set-up is timed apart and is no part of the check's figures.

Memory, per size: the peak RSS (``VmHWM``) of each part's process (started for that size),
and of this process (which registers the fleet) and the dashboards' child, each reset
(``/proc/<pid>/clear_refs``) before the size's fleet is registered, so a figure is that
size's peak and not the process's lifetime maximum (``ru_maxrss``); a process keeps memory it
freed, so the RSS at the reset is printed beside it.

The SSH tunnel is SIMULATED NOWHERE here: these dashboards are reached by plain HTTP
(``clients["dashboard"] = dashboard.direct``, no SSH client, so a missing node's
reachability is "host not probed" too). A real head's dashboard answers on its loopback only
and production probes reach it through SSH channels, one SSH connection per cluster per
probe. What that costs was measured on real sshd nodes with a real Ray head by
tests/benchmarks/test_tunnel_cost.py: read from its ``results/tunnel_cost.json`` when that
exists (``make bench`` runs it first: this run's figure), else the figures it printed on this
machine (``MEASURED_TUNNEL``). The printout adds it to each measured check as a projection,
not a measurement:

- slot time: every probe holds its slot ``tunnel_adds_per_probe_ms`` longer, so
  ``wall + clusters * tunnel_ms / concurrency``;
- CPU: the SSH client's work is the parts' (one event loop each), so the check cannot take
  less wall time than ``(cpu + clusters * (tunnel_cpu_ms - direct_cpu_ms + key_cpu_ms)) /
  min(parts, cores)``: a probe through the tunnel (``tunnel_cpu_ms``, all of it) replaces the
  plain-HTTP probe measured here (``direct_cpu_ms``: the same ``health_async`` of one healthy
  cluster of this fleet, timed apart in this process, 200 times), and ``key_cpu_ms`` is
  what building a cluster's SSH access from its vault-held key costs
  (test_tunnel_cost.py too): once per check for a fleet that shares one key (the check reads
  each credential once), once per cluster for clusters with keys of their own (both printed);

the projection is the larger of the two. A third figure projects what is not built: a prober
that keeps each head's SSH connection open from one check to the next, paying only the
requests over an open tunnel (``open_tunnel_cpu_ms``, test_tunnel_cost.py's ``http_only``).

Prints the figures and writes them to ``tests/benchmarks/results/health_fleet.json``; asserts
nothing about time (goal: 10,000 clusters under 60 s on 2 cores, cost growing linearly).
``AIRFLEET_BENCH_HEALTH_SIZES`` (e.g. ``1000,3000``) picks other sizes; under
``AIRFLEET_BENCH_QUICK=1`` (CI) a fleet of ``ONCE_FROM`` clusters or more gets the first check
only (the growth of the next check is then taken at the largest size checked twice).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from airfleet import config
from airfleet.backends.ssh import dashboard
from airfleet.store import Store
from tests.benchmarks import QUICK
from tests.fakes.ray_dashboards import RayDashboards, register_fleet

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
MIX = {"healthy": 0.70, "failing": 0.10, "broken": 0.05, "slow": 0.10, "hanging": 0.05}
SIZES = tuple(int(n) for n in
              os.environ.get("AIRFLEET_BENCH_HEALTH_SIZES", "1000,3000,10000").split(","))
TIMEOUT, CONCURRENCY, SLOW_SECONDS = 5.0, 200, 1.0
ONCE_FROM = 10_000  # under AIRFLEET_BENCH_QUICK=1: fleets this large are checked once
DEFAULT_CONCURRENCY = 50  # AIRFLEET_HEALTH_CONCURRENCY's default
PARTS = config.health_shards()  # as the DAG splits the fleet
# test_tunnel_cost.py on this machine (real sshd node, real Ray 2.60 head), 2026-12-07, with
# the dashboard's connections as SSH channels: the tunnel adds 96.2 ms per probe (median of
# 20; SSH connect alone 48.1 ms) and a whole probe through it costs this process 11.96 ms of
# CPU (connect 5.42 ms, the two requests over an open tunnel 3.68 ms).
MEASURED_TUNNEL = {"tunnel_adds_per_probe_ms": 96.2, "probe_client_cpu_ms": 11.96,
                   "open_tunnel_cpu_ms": 3.68, "own_key_cpu_ms": 3.56, "shared_key_cpu_ms": 0.21,
                   "source": "test_tunnel_cost.py as printed on this machine, 2026-12-07"}


def DIRECT(cluster) -> dict:  # noqa: N802 - a constant in spirit: the clients of every probe
    """Plain HTTP to the simulated dashboards, no SSH: the tunnel's cost is not measured here."""
    return {"dashboard": dashboard.direct}


def tunnel_cost() -> dict:
    measured = RESULTS / "tunnel_cost.json"
    if measured.exists():
        figures = json.loads(measured.read_text())
        keys = figures["credentials"]
        return {"tunnel_adds_per_probe_ms": figures["tunnel_adds_per_probe_ms"],
                "probe_client_cpu_ms": figures["probe_client_cpu_ms"],
                "open_tunnel_cpu_ms": figures["http_only"]["client_cpu_ms"],
                "own_key_cpu_ms": keys["own_key"]["client_cpu_ms"],
                "shared_key_cpu_ms": keys["shared_key"]["client_cpu_ms"],
                "source": str(measured.relative_to(RESULTS.parents[2]))}
    return dict(MEASURED_TUNNEL)  # the test adds this run's direct_cpu_ms to it


def reset_peak(pid: int | str = "self") -> float:
    """Reset the peak RSS of ``pid`` to its RSS now; return that RSS (MiB)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_mib(pid, "VmRSS")


def peak_mib(pid: int | str = "self") -> float:
    return _status_mib(pid, "VmHWM")


def _status_mib(pid: int | str, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise LookupError(field)


def wait_floor(size: int, concurrency: int) -> float:
    """Seconds the slow and hanging clusters alone hold ``concurrency`` slots in each part."""
    held = size * (MIX["slow"] * 2 * SLOW_SECONDS + MIX["hanging"] * TIMEOUT)
    return round(held / concurrency / PARTS, 1)


class Parts:
    """One process per part of the fleet (tests/benchmarks/health_part.py), started and
    ready before a check is timed; :meth:`check` runs one check in all of them at once."""

    def __init__(self, url: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")])}
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "tests.benchmarks.health_part", url, str(i), str(PARTS),
             str(CONCURRENCY), str(TIMEOUT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, cwd=ROOT, env=env) for i in range(PARTS)]
        for proc in self.procs:
            assert proc.stdout.readline().strip() == "ready", "a part's process did not start"

    def check(self, run_id: str) -> tuple[float, list[dict]]:
        started = time.monotonic()
        for proc in self.procs:
            proc.stdin.write(run_id + "\n")
            proc.stdin.flush()
        results = [json.loads(proc.stdout.readline()) for proc in self.procs]
        return time.monotonic() - started, results

    def close(self) -> None:
        for proc in self.procs:
            proc.stdin.close()
            assert proc.wait(60) == 0, "a part's process failed"


def direct_probe_cpu_ms(store: Store, rounds: int = 200) -> float:
    """This process's CPU for one plain-HTTP ``health_async`` of a healthy cluster of the
    fleet in ``store``: what a probe through the tunnel replaces, not adds to."""
    import asyncio

    from airfleet.backends import BackendContext
    from airfleet.backends.ssh.backend import SSHBackend

    record = next(r for r in store.list_clusters()
                  if r.cluster.metadata.labels.get("probe") == "healthy")
    ctx, backend = BackendContext("bench", clients=DIRECT(record.cluster)), SSHBackend()

    async def probes() -> float:
        await backend.health_async(record.cluster, ctx)  # imports, first connection
        cpu = time.process_time()
        for _ in range(rounds):
            seen = await backend.health_async(record.cluster, ctx)
            assert seen.healthy, seen.message
        return time.process_time() - cpu
    return round(1000 * asyncio.run(probes()) / rounds, 2)


def _check(parts: Parts, store: Store, run_id: str, tunnel: dict) -> dict:
    wall, results = parts.check(run_id)
    cpu = sum(r["cpu"] for r in results)
    outcomes = {name: o for r in results for name, o in r["outcomes"].items()}
    size = len(outcomes)
    timed_out = sum("timed out" in r.cluster.status.message for r in store.list_clusters())
    by_slots = wall + size * tunnel["tunnel_adds_per_probe_ms"] / 1000 / CONCURRENCY / PARTS

    def by_cpu(key_ms: float, probe_ms: float = tunnel["probe_client_cpu_ms"]) -> float:
        per_probe_ms = max(0.0, probe_ms - tunnel["direct_cpu_ms"]) + key_ms
        return (cpu + size * per_probe_ms / 1000) / min(PARTS, os.cpu_count())
    return {"wall_seconds": round(wall, 2), "ms_per_cluster": round(1000 * wall / size, 2),
            "cpu_seconds": round(cpu, 2), "cpu_ms_per_cluster": round(1000 * cpu / size, 2),
            "parts": [{"clusters": len(r["outcomes"]), "wall_seconds": round(r["wall"], 2),
                       "cpu_seconds": round(r["cpu"], 2)} for r in results],
            "outcomes": dict(Counter(outcomes.values())), "timed_out": timed_out,
            "projected_with_tunnel_seconds": round(
                max(by_slots, by_cpu(tunnel["shared_key_cpu_ms"])), 1),
            "projected_with_tunnel_own_keys_seconds": round(
                max(by_slots, by_cpu(tunnel["own_key_cpu_ms"])), 1),
            "projected_with_tunnel": {
                "slot_time_seconds": round(by_slots, 1),
                "cpu_floor_seconds": round(by_cpu(tunnel["shared_key_cpu_ms"]), 1),
                "cpu_floor_own_keys_seconds": round(by_cpu(tunnel["own_key_cpu_ms"]), 1)},
            # Not built: a prober that keeps each head's connection open from one check to
            # the next would pay only the requests over an open tunnel.
            "projected_with_kept_connections_seconds": round(max(by_slots, by_cpu(
                0.0, tunnel["open_tunnel_cpu_ms"])), 1)}


def test_health_check_cost_over_fleet_sizes(tmp_path, monkeypatch):
    monkeypatch.delenv("AIRFLEET_BACKENDS", raising=False)  # the real SSH backend
    tunnel = tunnel_cost()
    figures = {"timeout_seconds": TIMEOUT, "concurrency": CONCURRENCY, "parts": PARTS,
               "slow_seconds": SLOW_SECONDS, "mix": MIX, "tunnel": tunnel, "fleets": []}
    print(f"\nSSH tunnel (not simulated; from {tunnel['source']}): "
          f"+{tunnel['tunnel_adds_per_probe_ms']} ms per probe, "
          f"{tunnel['probe_client_cpu_ms']} ms of this process's CPU per probe; the SSH key "
          f"from the vault {tunnel['shared_key_cpu_ms']} ms per cluster in a fleet sharing one, "
          f"{tunnel['own_key_cpu_ms']} ms for a cluster with its own")
    with RayDashboards(slow_seconds=SLOW_SECONDS) as dashboards:
        child = dashboards._child.pid
        for size in SIZES:
            gc.collect()
            rss_before = {"self": reset_peak(), "dashboards": reset_peak(child)}
            url = f"sqlite:///{tmp_path / f'fleet-{size}.db'}"
            store = Store(url)
            store.migrate()
            started = time.monotonic()
            register_fleet(store, size, dashboards.port, MIX, bulk=True)
            if "direct_cpu_ms" not in tunnel:
                tunnel["direct_cpu_ms"] = direct_probe_cpu_ms(store)
                print(f"a plain-HTTP probe of a healthy cluster (what a probe through the "
                      f"tunnel replaces): {tunnel['direct_cpu_ms']} ms of CPU")
            fleet = {"clusters": size, "register_seconds": round(time.monotonic() - started, 2),
                     "wait_floor_seconds": wait_floor(size, CONCURRENCY),
                     f"wait_floor_at_{DEFAULT_CONCURRENCY}_seconds":
                         wait_floor(size, DEFAULT_CONCURRENCY)}
            parts = Parts(url)
            fleet["first"] = _check(parts, store, f"health/{size}/1", tunnel)
            if not (QUICK and size >= ONCE_FROM):
                fleet["next"] = _check(parts, store, f"health/{size}/2", tunnel)
            part_peaks = [peak_mib(proc.pid) for proc in parts.procs]
            parts.close()
            store.dispose()
            fleet["rss_at_start_mib"] = rss_before
            fleet["peak_rss_mib"] = {"parts": part_peaks, "self": peak_mib(),
                                     "dashboards": peak_mib(child)}
            figures["fleets"].append(fleet)
            _print(fleet)
            for which in ("first", "next"):  # each cluster has one outcome
                assert sum(fleet.get(which, {"outcomes": {"": size}})["outcomes"].values()) == size
    figures["growth"] = _growth(figures["fleets"])
    for which, factors in figures["growth"].items():
        print(f"growth ({which} check), per cluster at {factors['clusters'][1]:,} vs "
              f"{factors['clusters'][0]:,}: wall x{factors['wall']}, CPU x{factors['cpu']} "
              "(1.0 = linear)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "health_fleet.json").write_text(json.dumps(figures, indent=2) + "\n")


def _print(fleet: dict) -> None:
    size = fleet["clusters"]
    print(f"{size:,} clusters: registered in {fleet['register_seconds']} s (set-up); the slow "
          f"and hanging alone hold the slots {fleet['wait_floor_seconds']} s at {CONCURRENCY} "
          f"at once in each of {PARTS} parts "
          f"({fleet[f'wait_floor_at_{DEFAULT_CONCURRENCY}_seconds']} s at "
          f"{DEFAULT_CONCURRENCY}); peak RSS {fleet['peak_rss_mib']['parts']} MiB (each part's "
          f"process), {fleet['peak_rss_mib']['self']} MiB (this process, which registers the "
          f"fleet; {fleet['rss_at_start_mib']['self']} MiB at start), "
          f"{fleet['peak_rss_mib']['dashboards']} MiB (dashboards child, "
          f"{fleet['rss_at_start_mib']['dashboards']} at start)")
    for which in ("first", "next"):
        if which not in fleet:
            print(f"  health check ({which}): not run (AIRFLEET_BENCH_QUICK)")
            continue
        run = fleet[which]
        print(f"  health check ({which}): {run['wall_seconds']} s "
              f"({run['ms_per_cluster']} ms/cluster), {run['cpu_seconds']} s CPU "
              f"({run['cpu_ms_per_cluster']} ms/cluster; parts "
              f"{[(p['clusters'], p['wall_seconds'], p['cpu_seconds']) for p in run['parts']]} "
              f"as (clusters, s, CPU s)), outcomes {run['outcomes']}, "
              f"{run['timed_out']} timed out; with SSH tunnels (projected): "
              f"{run['projected_with_tunnel_seconds']} s with one shared key, "
              f"{run['projected_with_tunnel_own_keys_seconds']} s with a key per cluster "
              f"(slot time {run['projected_with_tunnel']['slot_time_seconds']} s, CPU floor "
              f"{run['projected_with_tunnel']['cpu_floor_seconds']} s / "
              f"{run['projected_with_tunnel']['cpu_floor_own_keys_seconds']} s); were the "
              f"connections kept open between checks (not built): "
              f"{run['projected_with_kept_connections_seconds']} s")


def _growth(fleets: list[dict]) -> dict:
    """Time per cluster at the largest size over the smallest, for each check."""
    growth = {}
    for which in ("first", "next"):
        checked = [f for f in fleets if which in f]
        if len(checked) < 2:
            continue
        small, large = checked[0], checked[-1]
        growth[which] = {"clusters": [small["clusters"], large["clusters"]],
                         "wall": round(large[which]["ms_per_cluster"]
                                       / small[which]["ms_per_cluster"], 2),
                         "cpu": round(large[which]["cpu_ms_per_cluster"]
                                      / small[which]["cpu_ms_per_cluster"], 2)}
    return growth
