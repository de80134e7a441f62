"""Benchmark: creating a Ray cluster (head + 2 workers) through the create DAG, against the
same ``ray start`` commands run by hand over SSH (goal: the DAG adds under 50 %). Prints the
figures and writes them to ``tests/benchmarks/results/create_time.json``; it asserts nothing
about time.

Three real sshd nodes (tests/fakes/nodes.py), Ray as host processes (``container_runtime:
none``). Two rounds, alternating so drift hits both sides alike:

- direct: what a careful operator does by hand with the commands the backend sends
  (``commands.ray_start_head`` / ``ray_start_worker``): plain ``ssh`` to start the head, poll
  ``/api/gcs_healthz`` until it answers "success", start both workers concurrently, poll
  ``/api/v0/nodes`` until 3 nodes are ALIVE. The dashboard answers on the head's loopback
  only, so the polls go through ``ssh -N -L`` (the forward README shows), opened with the
  clock running. Polls every 0.1 s, so this is the floor.
- dag: ``dag.test()`` of ``airfleet_cluster_create`` until the run ends (cluster Running).

Not timed: tearing down (``ray stop --force`` on each node for direct, the delete DAG for dag)
and waiting until no Ray process is left on any node.

The DAG run is broken down from its task instances (start/end dates) and from timing spans
recorded around the flow and backend calls inside the tasks (``dag.test`` runs tasks in this
process, so patching the classes here instruments them): Airflow's share (before the first
task, between tasks, inside a task around our code), our bookkeeping (lease, store, clients),
and the backend's own work, split into SSH commands and waits on the dashboard.

Note: ``dag.test`` runs each task in-process. A deployed Airflow also pays, per task, the
executor's queueing and a fresh task process (fork, imports, DAG file parse), so the overhead
measured here is a lower bound for a real deployment.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import inspect
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from airfleet.accelerators import probe_command
from airfleet.backends import BackendContext
from airfleet.backends.ssh import backend as ssh_backend
from airfleet.backends.ssh import commands, dashboard
from airfleet.backends.ssh import remote as ssh_remote
from airfleet.resources import Cluster, Phase
from airfleet.store import Store
from tests.fakes.nodes import NodeFarm
from tests.fakes.static_fleet import alive, ray_processes, static_cluster

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "benchmarks" / "results" / "create_time.json"
RUNS = 2
GOAL_RATIO = 1.5
NAME = "bench"
POLL = 0.1  # direct: dashboard polling interval (the backend polls every 1 s)
READY_TIMEOUT = 120
SETTLE_PAUSE = 2.0  # after the last Ray process is gone, before the next measurement


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def farm():
    with NodeFarm(3, name_prefix="bench") as farm:
        yield farm



def cluster(farm) -> dict:
    return static_cluster(farm, 2, NAME)


# ---- helpers ----------------------------------------------------------------------------------

def settle(farm, timeout: float = 30) -> None:
    """Wait until no node has a Ray process left (a dashboard helper outlives `ray stop` by a
    second or two), then let the machine quiet down."""
    left = {n.address: ray_processes(n, settle=timeout) for n in farm.nodes}
    assert not any(left.values()), f"Ray processes left after {timeout} s: {left}"
    time.sleep(SETTLE_PAUSE)


def stop_ray(farm) -> None:
    """`ray stop --force` on every node over SSH, concurrently (the backend's stop string)."""
    stop = commands.ray_stop("none", NAME, force=True)
    with ThreadPoolExecutor(len(farm.nodes)) as pool:
        list(pool.map(lambda n: farm.ssh(n, stop, timeout=120) if n.running else None,
                      farm.nodes))


def ssh_checked(farm, node, command: str):
    done = farm.ssh(node, command, timeout=180)
    assert done.returncode == 0, f"{node.address}: `{command}` failed: {done.stderr}"
    return done


def wait_until(ready, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready():
        assert time.monotonic() < deadline, f"{what}: not after {READY_TIMEOUT} s"
        time.sleep(POLL)


def alive_count(url: str) -> int:
    try:
        return len(dashboard.alive_by_ip(dashboard.list_nodes(url, timeout=2)))
    except Exception:  # noqa: BLE001 - not up yet
        return 0


@contextlib.contextmanager
def dashboard_forward(farm):
    """``ssh -N -L PORT:127.0.0.1:8265 root@head``: the head's dashboard on a local port."""
    port = free_port()
    forward = subprocess.Popen(
        [*farm.ssh_argv(farm.nodes[0])[:-1], "-N", "-o", "ExitOnForwardFailure=yes",
         "-L", f"127.0.0.1:{port}:127.0.0.1:8265", farm.ssh_argv(farm.nodes[0])[-1]],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield dashboard.url("127.0.0.1", port)
    finally:
        forward.terminate()
        forward.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Clock:
    """Named phases of one measured run, in seconds."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.start


# ---- (a) direct -------------------------------------------------------------------------------

def start_commands(farm) -> dict[str, str]:
    """Address -> the `ray start` string, checked against the one the backend builds."""
    head, *workers = farm.nodes
    wanted = {head.address: commands.ray_start_head(head.address),
              **{w.address: commands.ray_start_worker(w.address, head.address) for w in workers}}
    run = ssh_backend._Run(Cluster.model_validate(cluster(farm)), BackendContext(run_id="bench"))
    sent = {n.address: run._host_start(n) for n in ssh_backend.nodes_of(run.cfg)}
    assert sent == wanted
    return wanted


def create_direct(farm) -> dict:
    head, *workers = farm.nodes
    start = start_commands(farm)
    clock = Clock()
    with dashboard_forward(farm) as url:
        ssh_checked(farm, head, start[head.address])
        clock.lap("head: ray start over ssh")
        wait_until(lambda: dashboard.gcs_healthy(url, timeout=2), "GCS healthy")
        clock.lap("wait GCS healthy")
        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(lambda w: ssh_checked(farm, w, start[w.address]), workers))
        clock.lap("workers: ray start over ssh (concurrent)")
        wait_until(lambda: alive_count(url) == len(farm.nodes), "all nodes ALIVE")
        clock.lap("wait all ALIVE")
    stop_ray(farm)
    settle(farm)
    return {"seconds": clock.total, "phases": clock.phases}


# ---- (b) through the DAG, instrumented --------------------------------------------------------

class Spans:
    """Timing spans recorded by wrappers around the flow and backend code the tasks call."""

    def __init__(self):
        self.items: list[dict] = []
        self._lock = threading.Lock()

    def add(self, kind: str, label: str, started: float, seconds: float) -> None:
        with self._lock:
            self.items.append({"kind": kind, "label": label, "at": started, "seconds": seconds})

    def take(self) -> list[dict]:
        with self._lock:
            items, self.items = self.items, []
        return items

    def wrap(self, monkeypatch, owner, name: str, kind: str, label) -> None:
        original, spans = getattr(owner, name), self
        if inspect.iscoroutinefunction(original):
            @functools.wraps(original)
            async def wrapper(*args, **kwargs):
                at, t = time.time(), time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    spans.add(kind, label(*args, **kwargs), at, time.perf_counter() - t)
        else:
            @functools.wraps(original)
            def wrapper(*args, **kwargs):
                at, t = time.time(), time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    spans.add(kind, label(*args, **kwargs), at, time.perf_counter() - t)

        monkeypatch.setattr(owner, name, wrapper)


def _short(command: str) -> str:
    if command == probe_command():
        return "accelerator probe"
    words = command.split()
    if words[:1] == ["ray"] and len(words) > 1:
        return " ".join(words[:3] if words[1] in ("start", "stop") else words[:2])
    return command[:40]


def instrument(monkeypatch) -> Spans:
    from airfleet import flows
    from airfleet_airflow import clients

    spans = Spans()
    spans.wrap(monkeypatch, flows, "run_verb", "verb", lambda store, lease, verb, *a, **k: verb)
    spans.wrap(monkeypatch, clients, "clients_for", "clients", lambda *a, **k: "clients_for")
    for verb in ("apply", "detect_accelerators"):
        spans.wrap(monkeypatch, ssh_backend.SSHBackend, verb, "backend", lambda *a, v=verb, **k: v)
    run = ssh_backend._Run
    spans.wrap(monkeypatch, run, "_start", "apply",
               lambda self, remote, node, alive: f"{node.role} {node.address}: start")
    spans.wrap(monkeypatch, run, "_wait_head", "apply", lambda self: "wait GCS healthy")
    spans.wrap(monkeypatch, run, "_wait_alive", "apply", lambda self, nodes: "wait all ALIVE")
    spans.wrap(monkeypatch, ssh_remote.Remote, "_connect", "connect",
               lambda self, node, command: node)
    spans.wrap(monkeypatch, ssh_remote.Remote, "run", "ssh",
               lambda self, node, command, **k: f"{node}: {_short(command)}")
    return spans


def create_dag(dags, farm, spans: Spans) -> dict:
    spans.take()
    started, t = time.time(), time.perf_counter()
    dr = dags["airfleet_cluster_create"].test(run_conf={"cluster": cluster(farm)})
    seconds, ended = time.perf_counter() - t, time.time()
    recorded = spans.take()
    assert str(dr.state) == "success", str(dr.state)
    record = Store().require_cluster(NAME)
    assert record.phase is Phase.RUNNING, record.cluster.status.message
    assert alive(farm) == {n.address for n in farm.nodes}
    tasks = sorted(({"task_id": ti.task_id, "state": str(ti.state),
                     "start": ti.start_date.timestamp(), "end": ti.end_date.timestamp()}
                    for ti in dr.get_task_instances()), key=lambda x: x["start"])

    deleted = dags["airfleet_cluster_delete"].test(run_conf={"name": NAME})  # not timed
    assert str(deleted.state) == "success", str(deleted.state)
    spans.take()
    settle(farm)
    return {"seconds": seconds, **breakdown(started, ended, tasks, recorded)}


def breakdown(started: float, ended: float, tasks: list[dict], spans: list[dict]) -> dict:
    """Where the DAG run's wall time went: ``categories`` add up to it."""
    for ti in tasks:
        ti["seconds"] = ti["end"] - ti["start"]
        inside = [s for s in spans if ti["start"] - 0.05 <= s["at"] <= ti["end"]]
        ti["verb_seconds"] = sum(s["seconds"] for s in inside if s["kind"] == "verb")
        ti["backend_seconds"] = sum(s["seconds"] for s in inside if s["kind"] == "backend")
        ti["clients_seconds"] = sum(s["seconds"] for s in inside if s["kind"] == "clients")
        ti["ssh"] = [(s["label"], s["seconds"]) for s in inside if s["kind"] == "ssh"]
        if ti["task_id"] == "apply":
            ti["apply"] = apply_phases(inside)
    by_id = {ti["task_id"]: ti for ti in tasks}
    verb_tasks = [ti for ti in tasks if ti["verb_seconds"]]
    apply = by_id["apply"]
    categories = {
        "dag.test set-up before the first task": tasks[0]["start"] - started,
        "flow-only tasks (validate, lease, policy, register, phases)":
            sum(ti["seconds"] for ti in tasks if not ti["verb_seconds"]),
        "scheduling: gaps between tasks, after the last": sum(
            b["start"] - a["end"] for a, b in zip(tasks, tasks[1:], strict=False))
            + ended - tasks[-1]["end"],
        "Airflow around the verb tasks (task - verb)":
            sum(ti["seconds"] - ti["verb_seconds"] for ti in verb_tasks),
        "verb bookkeeping (lease renew, store, clients)":
            sum(ti["verb_seconds"] - ti["backend_seconds"] for ti in verb_tasks),
        "backend detect_accelerators (SSH probes)": by_id["detect_accelerators"]["backend_seconds"],
        "backend apply (SSH commands + waits)": apply["backend_seconds"],
    }
    return {"tasks": [{k: v for k, v in ti.items() if k not in ("start", "end")} for ti in tasks],
            "categories": categories,
            "apply_prestop_critical_path": apply["apply"]["prestop_critical_path"]}


def apply_phases(spans: list[dict]) -> dict:
    """The apply verb in timeline order: head start, GCS wait, worker starts, ALIVE wait."""
    timeline = []
    starts = [s for s in spans if s["kind"] == "apply" and s["label"].endswith(": start")]
    for role, name in (("head", "head: ray stop + ray start over ssh"),
                       ("worker", "workers: ray stop + ray start over ssh (concurrent)")):
        mine = [s for s in starts if s["label"].startswith(role)]
        if mine:
            first = min(s["at"] for s in mine)
            timeline.append((first, name, max(s["at"] + s["seconds"] for s in mine) - first))
    timeline += [(s["at"], s["label"], s["seconds"]) for s in spans
                 if s["label"] in ("wait GCS healthy", "wait all ALIVE")]
    phases = {name: seconds for _, name, seconds in sorted(timeline)}
    verb = [s for s in spans if s["kind"] == "backend" and s["label"] == "apply"]
    if verb:
        phases["other (probes, connections, reporting)"] = (verb[0]["seconds"]
                                                            - sum(phases.values()))
    # The `ray stop --force` the backend runs before each `ray start` (the direct side runs
    # none): the head's, then the slowest worker's, are on the critical path.
    head = spans_matching(spans, "ray stop --force", head=True)
    workers = spans_matching(spans, "ray stop --force", head=False)
    return {"phases": phases,
            "prestop_critical_path": sum(head) + max(workers, default=0.0),
            "connect": {s["label"]: s["seconds"] for s in spans if s["kind"] == "connect"}}


def spans_matching(spans: list[dict], command: str, *, head: bool) -> list[float]:
    heads = {s["label"].split()[1].rstrip(":") for s in spans
             if s["kind"] == "apply" and s["label"].startswith("head ")}
    return [s["seconds"] for s in spans if s["kind"] == "ssh" and s["label"].endswith(command)
            and (s["label"].split(":")[0] in heads) == head]


# ---- the benchmark ----------------------------------------------------------------------------

def machine() -> dict:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "ray": version("ray"), "airflow": version("apache-airflow"),
            "asyncssh": version("asyncssh"), "platform": platform.platform(),
            "machine": platform.machine(), "loadavg_1m_at_end": os.getloadavg()[0]}


def test_create_time(dags, fleet, monkeypatch):
    farm = fleet
    stop_ray(farm)
    settle(farm)
    load_at_start = os.getloadavg()[0]
    spans = instrument(monkeypatch)
    direct, dag = [], []
    for _ in range(RUNS):
        direct.append(create_direct(farm))
        dag.append(create_dag(dags, farm, spans))

    med_direct = statistics.median(r["seconds"] for r in direct)
    med_dag = statistics.median(r["seconds"] for r in dag)
    ratio = med_dag / med_direct
    figures = {"runs": RUNS, "order": ["direct", "dag"] * RUNS, "unit": "seconds",
               "nodes": len(farm.nodes), "container_runtime": "none",
               "direct": {"median": med_direct, "runs": direct},
               "dag": {"median": med_dag, "runs": dag},
               "ratio": ratio, "overhead_seconds": med_dag - med_direct,
               "attribution": attribution(direct, dag),
               "goal": {"ratio_below": GOAL_RATIO},
               "machine": {**machine(), "loadavg_1m_at_start": load_at_start}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    report(figures)


def attribution(direct: list[dict], dag: list[dict]) -> dict[str, float]:
    """Median of each category of the DAG runs; the backend's apply is set against the direct
    runs (same commands and waits), minus the `ray stop --force` the direct side does not run."""
    med = {name: statistics.median(r["categories"][name] for r in dag)
           for name in dag[0]["categories"]}
    apply = med.pop("backend apply (SSH commands + waits)")
    prestop = statistics.median(r["apply_prestop_critical_path"] for r in dag)
    ray_vs_direct = apply - prestop - statistics.median(r["seconds"] for r in direct)
    return {**med, "apply: `ray stop --force` before each start": prestop,
            "apply: rest vs direct (ray start variance, CPU contention)": ray_vs_direct}


def report(f: dict) -> None:
    m = f["machine"]
    print(f"\nCreate (head + 2 workers, container_runtime none), {f['runs']} runs each, "
          f"alternating; {m['cpu_count']} CPUs, Python {m['python']}, Ray {m['ray']}, "
          f"Airflow {m['airflow']}; load (1 min) {m['loadavg_1m_at_start']:.1f} at start, "
          f"{m['loadavg_1m_at_end']:.1f} at end")
    for side in ("direct", "dag"):
        runs = "  ".join(f"{r['seconds']:6.2f}" for r in f[side]["runs"])
        print(f"  {side:8s} runs: {runs}   median {f[side]['median']:6.2f} s")
    flag = "" if f["ratio"] < GOAL_RATIO else "  OVER GOAL"
    print(f"  ratio dag/direct: {f['ratio']:.2f} (goal < {GOAL_RATIO}){flag};"
          f" overhead {f['overhead_seconds']:+.2f} s")
    for i, (a, b) in enumerate(zip(f["direct"]["runs"], f["dag"]["runs"], strict=True), 1):
        print(f"\n  run {i}, direct ({a['seconds']:.2f} s):")
        for name, s in a["phases"].items():
            print(f"    {name:60s} {s:6.2f}")
        print(f"  run {i}, DAG ({b['seconds']:.2f} s), tasks:")
        for ti in b["tasks"]:
            extra = ""
            if ti["verb_seconds"]:
                extra = (f"  (verb {ti['verb_seconds']:.2f}: backend {ti['backend_seconds']:.2f},"
                         f" clients {ti['clients_seconds']:.2f})")
            print(f"    {ti['task_id']:60s} {ti['seconds']:6.2f}{extra}")
            for name, s in ti.get("apply", {}).get("phases", {}).items():
                print(f"      {name:58s} {s:6.2f}")
            for label, s in ti["ssh"]:
                print(f"        ssh {label:54s} {s:6.2f}")
        print(f"  run {i}, DAG, where the time went:")
        for name, s in b["categories"].items():
            print(f"    {name:60s} {s:6.2f}")
    print(f"\n  overhead attribution (medians): DAG {f['dag']['median']:.2f} s"
          f" - direct {f['direct']['median']:.2f} s = {f['overhead_seconds']:+.2f} s")
    for name, s in f["attribution"].items():
        print(f"    {name:60s} {s:+6.2f}")
    print(f"\n  written to {RESULTS.relative_to(ROOT)}")
