"""Benchmark: creating a Ray cluster (head + 2 workers) through the create DAG, against the
same ``ray start`` commands run by hand over SSH (goal: the DAG adds under 50 %). Prints the
figures and writes them to ``tests/benchmarks/results/create_time.json``; it asserts nothing
about time.

Three real sshd nodes (tests/fakes/nodes.py), Ray as host processes (``container_runtime:
none``). Each side runs ``RUNS`` times, alternating with the direct side so drift hits both
alike:

- direct: what a careful operator does by hand with the commands the backend sends
  (``commands.ray_start_head`` / ``ray_start_worker``): plain ``ssh`` to start the head, poll
  ``/api/gcs_healthz`` until it answers "success", start both workers concurrently, poll
  ``/api/v0/nodes`` until 3 nodes are ALIVE. The dashboard answers on the head's loopback
  only, so the polls go through ``ssh -N -L`` (the forward README shows), opened with the
  clock running. Polls every 0.1 s, so this is the floor.
- dag.test: ``dag.test()`` of ``airfleet_cluster_create`` until the run ends (cluster
  Running, lease released). Tasks run in this process, one after another.
- scheduler: a running Airflow (``airflow standalone``: api-server, scheduler with the
  LocalExecutor, dag-processor, triggerer; SQLite; the settings of ``bin/airfleet-dev run``):
  from the REST trigger until the run's ``end_date``. Each task is a fresh task process, as in
  a deployment. Measured after the dag.test rounds, alternating with direct runs taken while
  that Airflow idles beside them (its ratio is against those).

Not timed: tearing down (``ray stop --force`` on each node for direct, the delete DAG for the
DAG sides) and waiting until no Ray process is left on any node.

Each DAG run is broken down from its task instances (queued, start and end; over REST for the
scheduler) and from timing spans recorded inside the tasks (``create_spans``: in this process
for dag.test; in every Airflow process through ``spans_site/sitecustomize.py`` for the
scheduler): scheduling gaps (trigger -> first task, between tasks), queued -> started, the
task process outside ``execute`` (start-up, DAG parse, finish), ``execute`` around our code,
our flow code (validate, lease, policies, store), verb bookkeeping, and the backend's own
work (in this process also split into SSH commands and waits on the dashboard).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from airfleet.accelerators import probe_command
from airfleet.backends import BackendContext
from airfleet.backends.ssh import backend as ssh_backend
from airfleet.backends.ssh import commands, dashboard
from airfleet.backends.ssh import remote as ssh_remote
from airfleet.resources import Cluster, Phase
from airfleet.store import Store
from tests.benchmarks import create_spans
from tests.e2e.support import token, wait_healthy
from tests.fakes.nodes import NodeFarm
from tests.fakes.static_fleet import CONN_ENV, alive, ray_processes, static_cluster

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "benchmarks" / "results" / "create_time.json"
RUNS = 2
GOAL_RATIO = 1.5
NAME = "bench"
POLL = 0.1  # direct: dashboard polling interval (the backend polls every 1 s)
# The scheduler side: how often the run's state is asked over REST. At 0.1 s the benchmark's
# own requests cost the api-server 3.4 s of CPU in a quick run's 4 scheduled runs (15.3 s in
# all, 11.9 s at 1 s), on the 2 cores the creates it times need.
REST_POLL = 1.0
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


# ---- spans (both DAG sides) -------------------------------------------------------------------

class Spans:
    """Timing spans recorded by wrappers around the flow and backend code the tasks call."""

    def __init__(self):
        self.items: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, span: dict) -> None:
        with self._lock:
            self.items.append(span)

    def add(self, kind: str, label: str, started: float, seconds: float) -> None:
        self({"kind": kind, "label": label, "at": started, "seconds": seconds})

    def take(self) -> list[dict]:
        with self._lock:
            items, self.items = self.items, []
        return items

    def wrap(self, monkeypatch, owner, name: str, kind: str, label) -> None:
        monkeypatch.setattr(owner, name, getattr(owner, name))  # restored after the test
        create_spans.wrap(owner, name, kind, label, self)


def _short(command: str) -> str:
    if command == probe_command():
        return "accelerator probe"
    words = command.split()
    if words[:1] == ["ray"] and len(words) > 1:
        return " ".join(words[:3] if words[1] in ("start", "stop") else words[:2])
    return command[:40]


def instrument(monkeypatch) -> Spans:
    """In this process (``dag.test``): the spans a running Airflow records too (task execute,
    flow steps, clients, verbs, backend verbs), and the apply's own phases and SSH commands."""
    spans = Spans()
    original = create_spans.wrap

    def undoable(owner, name, kind, label, sink):
        monkeypatch.setattr(owner, name, getattr(owner, name))
        return original(owner, name, kind, label, sink)

    monkeypatch.setattr(create_spans, "wrap", undoable)
    create_spans.patch_loaded(spans)
    monkeypatch.setattr(create_spans, "wrap", original)
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


# ---- (b) dag.test(), in this process ------------------------------------------------------

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
    tasks = [{"task_id": ti.task_id, "state": str(ti.state),
              "start": ti.start_date.timestamp(), "end": ti.end_date.timestamp()}
             for ti in dr.get_task_instances() if ti.start_date and ti.end_date]

    deleted = dags["airfleet_cluster_delete"].test(run_conf={"name": NAME})  # not timed
    assert str(deleted.state) == "success", str(deleted.state)
    spans.take()
    settle(farm)
    return {"seconds": seconds, **breakdown(started, ended, tasks, recorded, "dag.test")}


# ---- (c) through a running Airflow: REST, scheduler, executor, task processes ---------------

def run_settings(home: Path, port: int) -> dict[str, str]:
    """The Airflow settings ``bin/airfleet-dev run`` starts with (``bin/airfleet-dev env``), for
    this Airflow home and port: the benchmark measures what a user runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AIRFLEET"))}
    env.update(AIRFLEET_AIRFLOW_HOME=str(home), AIRFLEET_PORT=str(port))
    out = subprocess.run([str(ROOT / "bin" / "airfleet-dev"), "env"], env=env, check=True,
                         capture_output=True, text=True).stdout
    pairs = (line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    return {k: v for k, v in pairs if k.startswith("AIRFLOW")}


@contextlib.contextmanager
def running_airflow(tmp_path):
    """``airflow standalone`` (api-server, scheduler, dag-processor, triggerer; LocalExecutor,
    SQLite) with the settings ``bin/airfleet-dev run`` uses, on Airfleet's dags/ and plugins/,
    the store and SSH connection of this test, and the spans of ``create_spans`` recorded by
    every process into a file."""
    home = tmp_path / "airflow-home"
    home.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    (home / "passwords.json").write_text('{"admin": "admin"}\n')
    spans = home / "spans.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(run_settings(home, port))
    env.update({
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        CONN_ENV: os.environ[CONN_ENV],
        create_spans.SPANS_ENV: str(spans),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "benchmarks" / "spans_site"),
                                      str(ROOT)]),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    airflow_bin = str(Path(sys.executable).parent / "airflow")
    subprocess.run([airflow_bin, "db", "migrate"], env=env, check=True, capture_output=True)
    log = open(home / "standalone.log", "w")
    proc = subprocess.Popen([airflow_bin, "standalone"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(base, proc, home / "standalone.log")
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token(base, 'admin', 'admin')}"
        deadline = time.monotonic() + 120
        while session.get(f"{base}/api/v2/dags/{CREATE}", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the create DAG was not parsed in 120 s"
            time.sleep(1)
        yield {"base": base, "session": session, "spans": spans, "home": home}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


CREATE, DELETE = "airfleet_cluster_create", "airfleet_cluster_delete"


def rest_run(af: dict, dag_id: str, conf: dict, timeout: float = 300) -> tuple[float, dict]:
    """Trigger over REST and poll (every ``REST_POLL`` s) until the run ends: (trigger time,
    run). The run's times are the ones Airflow recorded, so the polling sets no figure's
    precision; it only loads the api-server beside the create, as a client's would."""
    base, session = af["base"], af["session"]
    at = time.time()
    for attempt in range(3):  # SQLite's single writer may refuse the audit-log row (support.py)
        r = session.post(f"{base}/api/v2/dags/{dag_id}/dagRuns",
                         json={"logical_date": None, "conf": conf}, timeout=30)
        if r.status_code == 200 or "Database error" not in r.text or attempt == 2:
            break
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    deadline = time.monotonic() + timeout
    while True:
        run = session.get(f"{base}/api/v2/dags/{dag_id}/dagRuns/{run_id}", timeout=30).json()
        if run["state"] in ("success", "failed"):
            return at, run
        assert time.monotonic() < deadline, f"{dag_id} {run_id} not done in {timeout} s"
        time.sleep(REST_POLL)


def _ts(value: str | None) -> float | None:
    from datetime import datetime

    return datetime.fromisoformat(value).timestamp() if value else None


def create_scheduled(af: dict, farm) -> dict:
    spans_seen = len(create_spans.read(af["spans"]))
    at, run = rest_run(af, CREATE, {"cluster": cluster(farm)})
    seen_done = time.time()
    assert run["state"] == "success", run
    record = Store().require_cluster(NAME)
    assert record.phase is Phase.RUNNING, record.cluster.status.message
    assert alive(farm) == {n.address for n in farm.nodes}
    session, base = af["session"], af["base"]
    tis = session.get(f"{base}/api/v2/dags/{CREATE}/dagRuns/{run['dag_run_id']}/taskInstances",
                      timeout=30).json()["task_instances"]
    tasks = [{"task_id": ti["task_id"], "state": ti["state"],
              "queued": _ts(ti.get("queued_when")), "start": _ts(ti["start_date"]),
              "end": _ts(ti["end_date"])}
             for ti in tis if ti["start_date"] and ti["end_date"]]
    recorded = create_spans.read(af["spans"])[spans_seen:]
    ended = _ts(run["end_date"])
    running_at = max(t["end"] for t in tasks if t["task_id"] == "wait_ready")

    deleted = rest_run(af, DELETE, {"name": NAME})[1]  # not timed
    assert deleted["state"] == "success", deleted
    settle(farm)
    figures = breakdown(at, ended, tasks, recorded, "REST trigger")
    return {"seconds": ended - at, "seconds_until_running": running_at - at,
            "seconds_until_seen_done": seen_done - at,
            "run": {"queued_at": _ts(run.get("queued_at")) - at,
                    "start_date": _ts(run["start_date"]) - at}, **figures}


# ---- the breakdown (both DAG sides) -------------------------------------------------------------

def breakdown(started: float, ended: float, tasks: list[dict], spans: list[dict],
              origin: str) -> dict:
    """Where a DAG run's wall time went, from its task instances and the spans recorded
    inside them: ``categories`` add up to the run's time (tasks run one after another)."""
    tasks = sorted(tasks, key=lambda x: x["start"])
    for ti in tasks:
        ti["seconds"] = ti["end"] - ti["start"]
        inside = [s for s in spans if ti["start"] - 0.05 <= s["at"] <= ti["end"] + 0.05]
        of = {kind: [s for s in inside if s["kind"] == kind]
              for kind in ("execute", "flow", "clients", "verb", "backend")}
        execute = [s for s in of["execute"] if s["label"] == ti["task_id"]]
        ti["execute_seconds"] = sum(s["seconds"] for s in execute)
        ours = [(s["at"], s["at"] + s["seconds"])
                for kind in ("flow", "clients", "verb") for s in of[kind]]
        ti["our_code_seconds"] = create_spans.union_seconds(ours)
        ti["verb_seconds"] = sum(s["seconds"] for s in of["verb"])
        ti["backend"] = {}
        for s in of["backend"]:
            ti["backend"][s["label"]] = ti["backend"].get(s["label"], 0.0) + s["seconds"]
        ti["backend_seconds"] = sum(ti["backend"].values())
        ti["flow_steps"] = {}
        for s in of["flow"]:
            ti["flow_steps"][s["label"]] = ti["flow_steps"].get(s["label"], 0.0) + s["seconds"]
        ti["ssh"] = [(s["label"], s["seconds"]) for s in inside if s["kind"] == "ssh"]
        if ti.get("queued"):
            ti["queued_to_start"] = ti["start"] - ti["queued"]
        if "apply" in ti["backend"] and any(s["kind"] == "apply" for s in inside):
            ti["apply"] = apply_phases(inside)
    cursor, gaps, queued_to_start = started, 0.0, 0.0
    for ti in tasks:
        before = ti.get("queued") or ti["start"]  # a skipped task was never queued
        gaps += max(0.0, min(before, ti["start"]) - cursor)
        queued_to_start += ti.get("queued_to_start", 0.0)
        ti["gap_before"] = max(0.0, min(before, ti["start"]) - cursor)
        cursor = max(cursor, ti["end"])
    backend = {}
    for ti in tasks:
        for verb, seconds in ti["backend"].items():
            backend[verb] = backend.get(verb, 0.0) + seconds
    total = ended - started
    categories = {
        f"{origin} -> first task, and between tasks (scheduling)": gaps,
        "task queued -> started (executor)": queued_to_start,
        "in the task, outside execute (task start-up, finish)":
            sum(ti["seconds"] - ti["execute_seconds"] for ti in tasks),
        "in execute, around our code (operator, imports, XCom)":
            sum(ti["execute_seconds"] - ti["our_code_seconds"] for ti in tasks),
        "our flow code (validate, lease, policies, store, release)":
            sum(ti["our_code_seconds"] - ti["verb_seconds"] for ti in tasks),
        "verb bookkeeping (lease renew, store, clients)":
            sum(ti["verb_seconds"] - ti["backend_seconds"] for ti in tasks),
        **{f"backend {verb}": seconds for verb, seconds in backend.items()},
        "after the last task, until the run ends": ended - cursor,
    }
    categories["unaccounted (overlap, clock)"] = total - sum(categories.values())
    apply_task = next((ti for ti in tasks if "apply" in ti), None)
    return {"tasks": [{k: v for k, v in ti.items() if k not in ("start", "end", "queued")}
                      for ti in tasks],
            "tasks_run": len([ti for ti in tasks if ti["state"] == "success"]),
            "categories": categories,
            "apply_prestop_critical_path":
                apply_task["apply"]["prestop_critical_path"] if apply_task else None}


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


def test_create_time(dags, fleet, monkeypatch, tmp_path):
    farm = fleet
    stop_ray(farm)
    settle(farm)
    load_at_start = os.getloadavg()[0]
    spans = instrument(monkeypatch)
    direct, dag = [], []
    for _ in range(RUNS):  # (a) vs (b), with no Airflow running beside them
        direct.append(create_direct(farm))
        dag.append(create_dag(dags, farm, spans))
    direct_beside, scheduled = [], []
    with running_airflow(tmp_path) as af:  # (a) vs (c), the stack idling beside (a)
        for _ in range(RUNS):
            direct_beside.append(create_direct(farm))
            scheduled.append(create_scheduled(af, farm))

    med = {name: statistics.median(r["seconds"] for r in runs) for name, runs in
           (("direct", direct), ("dag", dag), ("direct_beside_airflow", direct_beside),
            ("scheduler", scheduled))}
    figures = {
        "runs": RUNS, "unit": "seconds", "nodes": len(farm.nodes), "container_runtime": "none",
        "order": ["direct", "dag"] * RUNS + ["direct_beside_airflow", "scheduler"] * RUNS,
        "create_tasks": [t.task_id for t in dags[CREATE].tasks],
        "direct": {"median": med["direct"], "runs": direct},
        "dag": {"median": med["dag"], "runs": dag},
        "direct_beside_airflow": {"median": med["direct_beside_airflow"], "runs": direct_beside},
        "scheduler": {"median": med["scheduler"], "runs": scheduled,
                      "median_until_running": statistics.median(
                          r["seconds_until_running"] for r in scheduled)},
        "ratio": med["dag"] / med["direct"],
        "overhead_seconds": med["dag"] - med["direct"],
        "ratio_scheduler": med["scheduler"] / med["direct_beside_airflow"],
        "overhead_seconds_scheduler": med["scheduler"] - med["direct_beside_airflow"],
        "attribution": attribution(direct, dag),
        "attribution_scheduler": attribution(direct_beside, scheduled),
        "goal": {"ratio_below": GOAL_RATIO},
        "machine": {**machine(), "loadavg_1m_at_start": load_at_start}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    report(figures)


def attribution(direct: list[dict], dag: list[dict]) -> dict[str, float]:
    """Median of each category of the DAG runs; the backend's detect + apply are set against
    the direct runs (same commands and waits; when measured in this process, minus the
    `ray stop --force` the direct side does not run)."""
    med = {name: statistics.median(r["categories"].get(name, 0.0) for r in dag)
           for name in dag[0]["categories"]}
    backend = med.pop("backend apply", 0.0) + med.pop("backend detect_accelerators", 0.0)
    direct_med = statistics.median(r["seconds"] for r in direct)
    prestops = [r["apply_prestop_critical_path"] for r in dag
                if r["apply_prestop_critical_path"]]  # none: the backend ran no `ray stop`
    if prestops:
        prestop = statistics.median(prestops)
        return {**med, "backend detect + apply: `ray stop --force` before each start": prestop,
                "backend detect + apply: the rest vs direct": backend - prestop - direct_med}
    return {**med, "backend detect + apply vs direct (incl. `ray stop --force`)":
            backend - direct_med}


def report(f: dict) -> None:
    m = f["machine"]
    print(f"\nCreate (head + 2 workers, container_runtime none), {f['runs']} runs each, "
          f"alternating; {m['cpu_count']} CPUs, Python {m['python']}, Ray {m['ray']}, "
          f"Airflow {m['airflow']}; load (1 min) {m['loadavg_1m_at_start']:.1f} at start, "
          f"{m['loadavg_1m_at_end']:.1f} at end")
    print(f"  create DAG tasks: {', '.join(f['create_tasks'])}")
    for side in ("direct", "dag", "direct_beside_airflow", "scheduler"):
        runs = "  ".join(f"{r['seconds']:6.2f}" for r in f[side]["runs"])
        print(f"  {side:22s} runs: {runs}   median {f[side]['median']:6.2f} s")
    for key, label, base in (("ratio", "dag.test/direct", ""),
                             ("ratio_scheduler", "scheduler/direct", "_scheduler")):
        flag = "" if f[key] < GOAL_RATIO else "  OVER GOAL"
        print(f"  ratio {label}: {f[key]:.2f} (goal < {GOAL_RATIO}){flag};"
              f" overhead {f['overhead_seconds' + base]:+.2f} s")
    print(f"  scheduler: median until the cluster is Running (wait_ready ended): "
          f"{f['scheduler']['median_until_running']:.2f} s")
    pairs = [("direct", "dag"), ("direct_beside_airflow", "scheduler")]
    for a_side, b_side in pairs:
        for i, (a, b) in enumerate(zip(f[a_side]["runs"], f[b_side]["runs"], strict=True), 1):
            print(f"\n  run {i}, {a_side} ({a['seconds']:.2f} s):")
            for name, s in a["phases"].items():
                print(f"    {name:60s} {s:6.2f}")
            print(f"  run {i}, {b_side} ({b['seconds']:.2f} s), tasks "
                  "(gap before, queued->start, task, execute, our code, backend):")
            for ti in b["tasks"]:
                print(f"    {ti['task_id']:22s} {ti['state']:8s} gap {ti['gap_before']:5.2f}"
                      f"  queued {ti.get('queued_to_start', 0.0):5.2f}"
                      f"  task {ti['seconds']:6.2f}  execute {ti['execute_seconds']:6.2f}"
                      f"  ours {ti['our_code_seconds']:6.2f}"
                      f"  backend {ti['backend_seconds']:6.2f}")
                steps = ", ".join(f"{k} {v:.2f}" for k, v in ti["flow_steps"].items())
                if steps:
                    print(f"      flow steps: {steps}")
                for name, s in ti.get("apply", {}).get("phases", {}).items():
                    print(f"      {name:58s} {s:6.2f}")
                for label, s in ti["ssh"]:
                    print(f"        ssh {label:54s} {s:6.2f}")
            print(f"  run {i}, {b_side}, where the time went:")
            for name, s in b["categories"].items():
                print(f"    {name:60s} {s:6.2f}")
    for key, a_side, b_side in (("attribution", "direct", "dag"),
                                ("attribution_scheduler", "direct_beside_airflow",
                                 "scheduler")):
        print(f"\n  overhead attribution (medians): {b_side} {f[b_side]['median']:.2f} s"
              f" - {a_side} {f[a_side]['median']:.2f} s"
              f" = {f[b_side]['median'] - f[a_side]['median']:+.2f} s")
        for name, s in f[key].items():
            print(f"    {name:60s} {s:+6.2f}")
    print(f"\n  written to {RESULTS.relative_to(ROOT)}")
