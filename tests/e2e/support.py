"""What the end-to-end tests share: driving a running Airflow over REST with the official
client (``apache-airflow-client``) and reading Airfleet's store beside it."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
# A scheduler this long without a heartbeat is dead or hung (Airflow calls it unhealthy after
# 30 s; a busy 2-core machine can delay a beat, never by minutes): no run will finish.
SCHEDULER_DEAD_AFTER = 120
# The logs (``airflow standalone`` output) of every Airflow this session started, registered
# by the fixtures that start them: a run that does not finish prints their tail, as CI keeps
# no other trace. Each tail is headed by its path (its Airflow's home).
STANDALONE_LOGS: list[Path] = []
CLUSTER = {"metadata": {"name": "e2e-a"},
           "spec": {"type": "ssh", "provider": "static",
                    "config": {"ssh": {"head": "10.0.0.1", "workers": ["10.0.0.2"],
                                       "credential": {"airflow_conn_id": "ssh_fleet"}}}}}
DAG_IDS = {"airfleet_cluster_create", "airfleet_cluster_update", "airfleet_cluster_delete",
           "airfleet_cluster_onboard", "airfleet_cluster_health_check",
           "airfleet_endpoint_deploy", "airfleet_endpoint_scale", "airfleet_endpoint_delete"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"airflow exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            health = requests.get(f"{base}/api/v2/monitor/health", timeout=2).json()
            if all(health[c]["status"] == "healthy"
                   for c in ("metadatabase", "scheduler", "triggerer", "dag_processor")):
                return
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(1)
    pytest.fail(f"airflow not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def token(base: str, user: str, password: str) -> str:
    r = requests.post(f"{base}/auth/token", json={"username": user, "password": password},
                      timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["access_token"]


def trigger(client, dag_id: str, conf: dict, attempts: int = 3):
    """Trigger a run as a REST client should on SQLite: retry Airflow's "Database error".

    Airflow's api-server commits its audit-log row from an async dependency, on the event loop,
    before the endpoint runs. When a task start (a sync execution-API request) holds SQLite's
    write lock and waits for that loop to commit it, the audit-log insert times out after 5 s
    and the request fails with 500 before anything was created, so a retry is safe. Only
    SQLite's single writer does this; PostgreSQL does not.
    """
    import airflow_client.client as af
    from airflow_client.client.exceptions import ServiceException

    for attempt in range(attempts):
        try:
            return af.DagRunApi(client).trigger_dag_run(
                dag_id, af.TriggerDAGRunPostBody(logical_date=None, conf=conf))
        except ServiceException as err:
            if '"Database error"' not in (err.body or "") or attempt == attempts - 1:
                raise


def wait_run(client, dag_id: str, run_id: str, timeout: float = 300) -> str:
    """The run's final state; a failed run prints its failed tasks' logs (for CI)."""
    import airflow_client.client as af

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = af.DagRunApi(client).get_dag_run(dag_id, run_id).state
        state = str(state.value if hasattr(state, "value") else state)
        if state == "failed":
            print_failed_tasks(client, dag_id, run_id)
        if state in ("success", "failed"):
            return state
        if (silent := scheduler_silent_for(client)) > SCHEDULER_DEAD_AFTER:
            reason = f"the scheduler has not heartbeaten for {silent:.0f} s"
            break
        time.sleep(2)
    else:
        reason = f"it did not finish in {timeout} s"
    print_failed_tasks(client, dag_id, run_id)
    print_airflow_state(client, dag_id, run_id)
    pytest.fail(f"{dag_id} {run_id}: {reason}")


def scheduler_silent_for(client) -> float:
    """Seconds since the scheduler's last heartbeat (0 when it never beat: still starting)."""
    import airflow_client.client as af

    beat = af.MonitorApi(client).get_health().scheduler.latest_scheduler_heartbeat
    if not beat:
        return 0.0
    return (datetime.now(UTC) - datetime.fromisoformat(beat)).total_seconds()


def print_airflow_state(client, dag_id: str, run_id: str, lines: int = 80) -> None:
    """Why a run may be stuck: its state, the components' health, and the scheduler's,
    triggerer's and standalone's last lines (a component that died says so there)."""
    import airflow_client.client as af

    print(f"run {run_id}: {af.DagRunApi(client).get_dag_run(dag_id, run_id).state}")
    print(f"health: {af.MonitorApi(client).get_health().to_dict()}")
    for log in STANDALONE_LOGS:
        if log.exists():
            tail = [line for line in log.read_text(errors="replace").splitlines()
                    if line.startswith(("scheduler", "triggerer", "standalone"))][-lines:]
            print(f"--- {log} (scheduler, triggerer, standalone lines)\n" + "\n".join(tail))


def print_failed_tasks(client, dag_id: str, run_id: str) -> None:
    import airflow_client.client as af

    for ti in af.TaskInstanceApi(client).get_task_instances(dag_id, run_id).task_instances:
        state = str(getattr(ti.state, "value", ti.state))
        print(f"task {ti.task_id}: {state}")
        if state == "failed" and ti.try_number:  # the others never ran: no log to show
            print(task_log(client, dag_id, run_id, ti.task_id, ti.try_number,
                           map_index=ti.map_index)[-4000:])


def task_log(client, dag_id: str, run_id: str, task_id: str, try_number: int = 1, *,
             map_index: int = -1) -> str:
    """The task's log (``map_index``: which part of a mapped task, -1 for one not mapped)."""
    import airflow_client.client as af

    content = af.TaskInstanceApi(client).get_log(dag_id, run_id, task_id, try_number,
                                                 full_content=True, map_index=map_index).content
    return json.dumps([c.to_dict() if hasattr(c, "to_dict") else c for c in content],
                      default=str)


def log_until(client, dag_id: str, run_id: str, task_id: str, text: str,
              timeout: float = 30, *, map_index: int = -1) -> str:
    """The task's log once it shows ``text`` (log shipping may trail the run's end)."""
    deadline = time.monotonic() + timeout
    while True:
        text_now = task_log(client, dag_id, run_id, task_id, map_index=map_index)
        if text in text_now or time.monotonic() > deadline:
            return text_now
        time.sleep(1)


def store_of(airflow):
    from airfleet.store import Store

    return Store(f"sqlite:///{airflow['home'] / 'airfleet.db'}")
