"""Airfleet on Airflow's own scale-out engine: `bin/airfleet-dev run --scale-out` (what `make
run-scale-out` runs) started for real, natively: api-server, scheduler, dag-processor and
triggerer, two Celery workers (Redis as broker), Airflow's and Airfleet's databases on the
local PostgreSQL.

Thirty clusters go through create, then update racing the scheduled-style health checks, then
delete, all triggered at once over REST. The recording backend of ``tests/fakes`` stands in
for the static-nodes backend (``AIRFLEET_BACKENDS``); its verbs take seconds (``delay``) so
that two runs driving one cluster at once would overlap visibly in its call log. What is shown:

- every run ends in the state it should, and every cluster in the phase it should;
- tasks really ran on both workers (the worker's name is in each task instance's hostname,
  ``[core] hostname_callable``), printed per worker;
- no cluster was driven by two runs at once: in each cluster's history the fencing token never
  goes down and each run wrote under one token of its own, and the backend's mutating calls for
  one cluster never overlap in time (health probes are read-only and take no lease by design);
- a worker killed with SIGKILL (its whole process group, as a container dies) mid-run: every
  affected cluster ends Running or Failed naming the run, no lease is left held, and the next
  run takes each lease and converges.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

import pytest
import requests

from tests.e2e.support import DAG_IDS, ROOT, free_port, print_failed_tasks, token, wait_healthy

pytestmark = [pytest.mark.scale_out, pytest.mark.timeout(2400)]

FAKE = "tests.fakes.recording_backend:RecordingBackend"
SUPERVISORCTL = str(Path(sys.executable).parent / "supervisorctl")  # beside supervisord
PG = "postgresql://postgres@127.0.0.1:5432"
REDIS = "redis://127.0.0.1:6379/11"  # a database of its own, flushed before and after
N = 30
WORKERS = ("worker-1", "worker-2")
MUTATING = {"provision", "apply", "detect_accelerators", "drain_node", "teardown"}
DELAY = {"provision": 1.0, "apply": 3.0, "teardown": 1.0}


def cluster(i: int, workers: int = 1) -> dict:
    return {"metadata": {"name": f"so-{i:02d}"},
            "spec": {"type": "ssh", "provider": "static",
                     "config": {"ssh": {"head": f"10.9.{i}.1",
                                        "workers": [f"10.9.{i}.{w + 2}" for w in range(workers)],
                                        "credential": {"airflow_conn_id": "ssh_fleet"}}}}}


def _flush_redis() -> None:
    import redis

    redis.Redis.from_url(REDIS).flushdb()


def _drop_databases(db: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(PG + "/postgres", autocommit=True) as admin:
        for name in (db, f"{db}_store"):
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("scale-out-home")
    port, db = free_port(), f"airfleet_so_test_{os.getpid()}"
    _drop_databases(db)
    _flush_redis()
    (home / "fake-state.json").write_text(json.dumps({"delay": DELAY}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AIRFLEET"))}
    env.update(AIRFLEET_AIRFLOW_HOME=str(home), AIRFLEET_PORT=str(port), AIRFLEET_PG_URL=PG,
               AIRFLEET_PG_DB=db, AIRFLEET_REDIS_URL=REDIS, AIRFLEET_WORKERS="2",
               # 2 x 4 task processes at once: what 2 cores carry beside the api-server, which
               # every task process talks to.
               AIRFLEET_WORKER_CONCURRENCY="4",
               AIRFLEET_BACKENDS=f"ssh={FAKE}",
               AIRFLEET_FAKE_BACKEND_LOG=str(home / "calls.jsonl"),
               AIRFLEET_FAKE_BACKEND_STATE=str(home / "fake-state.json"),
               # A killed worker's tasks are found without a heartbeat after 2 min (default 5).
               # Not much less: on a busy machine a live task's heartbeat can lag 30 s and more,
               # and the scheduler would kill it.
               AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT="120",
               # A task the killed worker had taken from the queue but not started stays
               # queued until this (default 600 s: CI saw the kill test take 693 s after the
               # kill); the scheduler then revokes and requeues it. A task merely waiting for a
               # slot is requeued too, not failed (Airflow fails it on the third time).
               AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT="180",
               # A lease its run could not release (its worker died) frees itself in 3 min.
               AIRFLEET_LEASE_SECONDS="180",
               PYTHONPATH=str(ROOT))
    log = open(home / "run.log", "w")
    proc = subprocess.Popen([str(ROOT / "bin" / "airfleet-dev"), "run", "--scale-out"], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, home / "run.log")
        _wait_workers_ready(home, proc)
        yield {"base": base, "home": home, "db": db,
               "conf": home / "scale-out" / "supervisord.conf"}
    finally:
        proc.send_signal(signal.SIGTERM)  # supervisord stops every component
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        leftover = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True)
        _drop_databases(db)
        _flush_redis()
        assert not leftover.stdout.strip(), f"processes left after stopping: {leftover.stdout}"


def _wait_workers_ready(home, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(f"{w}@" in _read(home / "scale-out" / f"worker-{w[-1]}.log") and " ready."
               in _read(home / "scale-out" / f"worker-{w[-1]}.log") for w in WORKERS):
            return
        assert proc.poll() is None, _read(home / "run.log")[-3000:]
        time.sleep(1)
    pytest.fail("Celery workers not ready:\n" + _read(home / "scale-out" / "worker-1.log")[-3000:])


def _read(path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def api(stack):
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token(stack['base'], 'admin', 'admin')}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        dags = session.get(f"{stack['base']}/api/v2/dags", params={"tags": "airfleet"},
                           timeout=10).json()["dags"]
        if {d["dag_id"] for d in dags} == DAG_IDS:
            break
        time.sleep(2)
    else:
        pytest.fail(f"DAGs not parsed: {[d['dag_id'] for d in dags]}")
    session.base = stack["base"]
    return session


@pytest.fixture(scope="module")
def store(stack):
    from airfleet.store import Store

    store = Store(f"{PG}/{stack['db']}_store")
    yield store
    store.dispose()


def get(api, path: str) -> dict:
    """GET over REST, again when the busy api-server (one process, which also serves every
    running task's execution API) is slow to answer: reads are safe to repeat."""
    for attempt in range(4):
        try:
            r = api.get(f"{api.base}{path}", timeout=60)
            if r.status_code < 500 or attempt == 3:
                r.raise_for_status()
                return r.json()
            print(f"[scale-out] GET {path}: {r.status_code} {r.text[:300]} (asking again)")
        except requests.Timeout:
            if attempt == 3:
                raise
        time.sleep(5)
    raise AssertionError("unreachable")


def trigger(api, dag_id: str, conf: dict) -> tuple[str, str]:
    r = api.post(f"{api.base}/api/v2/dags/{dag_id}/dagRuns",
                 json={"logical_date": None, "conf": conf}, timeout=120)
    assert r.status_code == 200, r.text
    return dag_id, r.json()["dag_run_id"]


def wait_all(api, runs: list[tuple[str, str]], timeout: float = 900) -> dict[tuple, str]:
    """Each run's final state, polling all of them together."""
    states, deadline = {}, time.monotonic() + timeout
    while len(states) < len(runs) and time.monotonic() < deadline:
        for dag_id, run_id in runs:
            if (dag_id, run_id) in states:
                continue
            state = get(api, f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in ("success", "failed"):
                states[(dag_id, run_id)] = state
        time.sleep(3)
    pending = [r for r in runs if r not in states]
    assert not pending, f"{len(pending)} runs did not end in {timeout} s: {pending[:5]}"
    return states


def task_instances(api, dag_id: str, run_id: str) -> list[dict]:
    return get(api, f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]


def check_outcomes(api, dag_id: str, run_id: str) -> dict[str, str]:
    """What every part of a health check (the mapped check_fleet) found, together."""
    outcomes = {}
    for part in sorted(ti["map_index"] for ti in task_instances(api, dag_id, run_id)
                       if ti["task_id"] == "check_fleet"):
        value = get(api, f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/check_fleet/"
                         f"xcomEntries/return_value?map_index={part}")["value"]
        outcomes.update(json.loads(value) if isinstance(value, str) else value)
    return outcomes


def worker_of(ti: dict) -> str | None:
    return next((w for w in WORKERS if (ti.get("hostname") or "").startswith(w + ".")), None)


def assert_all_succeeded(api, states: dict) -> None:
    failed = [run for run, state in states.items() if state != "success"]
    if failed:
        import airflow_client.client as af

        config = af.Configuration(host=api.base,
                                  access_token=api.headers["Authorization"].split()[1])
        with af.ApiClient(config) as client:
            for dag_id, run_id in failed[:3]:
                print_failed_tasks(client, dag_id, run_id)
    assert not failed, f"{len(failed)} runs failed: {failed[:5]}"


def backend_calls(stack) -> list[dict]:
    return [json.loads(line) for line in _read(stack["home"] / "calls.jsonl").splitlines()]


def assert_one_run_at_a_time(stack, store, names: list[str]) -> None:
    """Fencing tokens never go down in any history, each run wrote under one token and a
    later run under a higher one; no two runs' mutating backend calls for one cluster overlap."""
    for name in names:
        tokens = [(e.run_id, e.token) for e in store.events(name) if e.token is not None]
        assert tokens, f"{name}: no fenced history"
        assert all(a[1] <= b[1] for a, b in pairwise(tokens)), f"{name}: token went down {tokens}"
        by_run = defaultdict(set)
        for run_id, tok in tokens:
            by_run[run_id].add(tok)
        assert all(len(t) == 1 for t in by_run.values()), f"{name}: a run with two tokens {by_run}"
        run_tokens = [next(iter(t)) for t in by_run.values()]
        assert len(set(run_tokens)) == len(run_tokens), f"{name}: two runs shared a token"
    calls = defaultdict(list)
    for call in backend_calls(stack):
        if call["verb"] in MUTATING:
            calls[call["cluster"]].append(call)
    for name, seen in calls.items():
        seen.sort(key=lambda c: c["start"])
        for a, b in pairwise(seen):
            assert a["run_id"] == b["run_id"] or a["end"] <= b["start"], (
                f"{name}: {a['verb']} of {a['run_id']} overlapped {b['verb']} of {b['run_id']}")


def print_worker_counts(api, runs: list[tuple[str, str]], what: str) -> Counter:
    per_worker, spread = Counter(), 0
    for dag_id, run_id in runs:
        workers = Counter(worker_of(ti) for ti in task_instances(api, dag_id, run_id)
                          if ti["state"] in ("success", "failed", "skipped") and ti["hostname"])
        per_worker.update(workers)
        spread += sum(1 for w in WORKERS if workers[w]) == len(WORKERS)
    print(f"[scale-out] {what}: tasks per worker {dict(per_worker)}; "
          f"{spread}/{len(runs)} runs had tasks on both workers")
    assert all(per_worker[w] for w in WORKERS), f"{what}: a worker ran nothing: {per_worker}"
    assert spread, f"{what}: no run had its tasks on both workers"
    return per_worker


def test_thirty_creates_updates_racing_health_checks_and_deletes(stack, api, store):
    names = [f"so-{i:02d}" for i in range(N)]

    creates = [trigger(api, "airfleet_cluster_create", {"cluster": cluster(i)}) for i in range(N)]
    states = wait_all(api, creates)
    assert_all_succeeded(api, states)
    assert {store.require_cluster(n).phase.value for n in names} == {"Running"}
    print_worker_counts(api, creates, "30 creates")

    # Updates (one more worker each) racing health checks of the whole fleet.
    runs = []
    for i in range(N):
        runs.append(trigger(api, "airfleet_cluster_update", {"cluster": cluster(i, workers=2)}))
        runs.append(trigger(api, "airfleet_cluster_health_check", {}))
    assert_all_succeeded(api, wait_all(api, runs, timeout=1200))
    for name in names:
        record = store.require_cluster(name)
        assert record.phase.value == "Running" and len(record.cluster.status.nodes) == 3, (
            name, record.phase, record.cluster.status.message)
    outcomes = Counter(outcome.split(":")[0] for r in runs
                       if r[0] == "airfleet_cluster_health_check"
                       for outcome in check_outcomes(api, *r).values())
    print(f"[scale-out] 30 updates racing 30 health checks: all Running with 3 nodes; "
          f"probe outcomes {dict(outcomes)}")
    assert outcomes["Running"] and outcomes["skipped"], "the checks never met an update"
    print_worker_counts(api, [r for r in runs if r[0] == "airfleet_cluster_update"],
                        "30 updates")
    print_worker_counts(api, [r for r in runs if r[0] == "airfleet_cluster_health_check"],
                        "30 health checks (the fleet in parts, check_fleet mapped)")

    deletes = [trigger(api, "airfleet_cluster_delete", {"name": n}) for n in names]
    assert_all_succeeded(api, wait_all(api, deletes))
    assert all(store.get_cluster(n) is None for n in names)
    print_worker_counts(api, deletes, "30 deletes")

    assert_one_run_at_a_time(stack, store, names)
    assert not [lease for lease in store.leases() if lease.held], "a lease is still held"
    tokens = {n: max(e.token for e in store.events(n) if e.token) for n in names}
    print(f"[scale-out] fencing tokens strictly increasing per cluster over create, update, "
          f"delete (last tokens: {sorted(Counter(tokens.values()).items())}); "
          f"no overlapping backend calls for one cluster")


def test_a_worker_killed_mid_run_leaves_no_lease_held_and_no_cluster_stuck(stack, api, store):
    names = [f"so-{100 + i}" for i in range(6)]
    creates = [trigger(api, "airfleet_cluster_create", {"cluster": cluster(100 + i)})
               for i in range(len(names))]
    assert_all_succeeded(api, wait_all(api, creates))

    # Updates whose apply takes long enough to be caught running on worker-1.
    (stack["home"] / "fake-state.json").write_text(json.dumps({"delay": {**DELAY, "apply": 40}}))
    updates = [trigger(api, "airfleet_cluster_update", {"cluster": cluster(100 + i, 2)})
               for i in range(len(names))]
    victims = _wait_running_on(api, updates, "worker-1")
    pid = int(subprocess.run([SUPERVISORCTL, "-c", str(stack["conf"]), "pid", "worker:worker-1"],
                             capture_output=True, text=True, check=True).stdout)
    os.killpg(pid, signal.SIGKILL)  # the worker and every task process it runs, as a container
    killed_at = time.time()
    print(f"[scale-out] SIGKILL to worker-1 (pid {pid}) while it ran {victims}")
    # A task the dead worker had taken from the queue but not started comes back only after
    # the scheduler's [scheduler] task_queued_timeout (180 s in this stack): runs may take
    # that long to end, and longer on a loaded machine.
    states = wait_all(api, updates, timeout=1200)
    (stack["home"] / "fake-state.json").write_text(json.dumps({"delay": DELAY}))

    # What each run left is read from the history: by the time the slowest run has ended, the
    # scheduled health check (every 5 min) may have found a Failed cluster healthy again and
    # moved it back to Running, as it should.
    ttl, outcome = 180.0, {}
    for (_, run_id), state in states.items():
        name = next(n for n in names if _run_touches(store, n, run_id))
        record = store.require_cluster(name)
        assert record.phase.value in ("Running", "Failed"), (name, record.phase)
        moves = [e for e in store.events(name) if e.to_phase and e.run_id
                 and e.run_id.endswith(run_id)]
        left = moves[-1] if moves else None
        outcome[name] = (state, left.to_phase if left else None, record.phase.value)
        if state == "failed":
            assert left and left.to_phase == "Failed" and run_id in left.message, (name, left)
        else:
            assert left and left.to_phase == "Running", (name, left)
    failed = sorted(n for n, (_, left, _) in outcome.items() if left == "Failed")
    print(f"[scale-out] after the kill (run state, phase the run left, phase now): {outcome}")
    assert failed, "no run was caught by the kill"
    # Every run has ended, so nobody renews any more: a lease a dead task could not release
    # expires within one TTL, and none is held past it.
    ended_at = time.time()
    held = [store.get_lease(n) for n in names if store.get_lease(n).held]
    print(f"[scale-out] {time.time() - killed_at:.0f} s after the kill every run has ended; "
          f"leases still held: {[(lease.name, lease.holder) for lease in held]}")
    for lease in held:
        assert lease.expires_at.timestamp() <= ended_at + ttl + 1, lease
    _wait(lambda: not any(store.get_lease(n).held for n in names), ttl + 30, "leases free")

    # The next run takes each lease (a higher token) and converges.
    before = {n: store.get_lease(n).token for n in names}
    reruns = [trigger(api, "airfleet_cluster_update", {"cluster": cluster(100 + i, 2)})
              for i in range(len(names))]
    assert_all_succeeded(api, wait_all(api, reruns))
    for name in names:
        assert store.require_cluster(name).phase.value == "Running"
        assert store.get_lease(name).token > before[name]
    assert_one_run_at_a_time(stack, store, names)
    status = subprocess.run([SUPERVISORCTL, "-c", str(stack["conf"]), "status"],
                            capture_output=True, text=True).stdout
    assert "worker:worker-1" in status and "RUNNING" in status.split("worker:worker-1")[1][:40]
    print(f"[scale-out] {len(failed)} clusters Failed naming their run, then converged on the "
          f"next run; supervisord restarted worker-1")


def _run_touches(store, name: str, run_id: str) -> bool:
    return any(e.run_id and e.run_id.endswith(run_id) for e in store.events(name))


def _wait_running_on(api, runs, worker: str, timeout: float = 300) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [f"{dag_id}/{run_id}:{ti['task_id']}" for dag_id, run_id in runs
                   for ti in task_instances(api, dag_id, run_id)
                   if ti["state"] == "running" and worker_of(ti) == worker
                   and ti["task_id"] == "apply"]
        if running:
            return running
        time.sleep(1)
    pytest.fail(f"no apply task ran on {worker} within {timeout} s")


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(2)
