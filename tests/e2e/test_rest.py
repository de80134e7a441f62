"""End to end: Airflow started as README's run command starts it, driven over REST with the
official client (``apache-airflow-client``).

The recording backend of ``tests/fakes`` stands in for the static-nodes backend (registered
through ``AIRFLEET_BACKENDS``), so these tests show the flow machinery inside a real
scheduler, executor and api-server. The Kubernetes backend is the real one, against the fake
API server of ``tests/fakes``, with its readiness wait moved to the real triggerer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
FAKE = "tests.fakes.recording_backend:RecordingBackend"
CLUSTER = {"metadata": {"name": "e2e-a"},
           "spec": {"type": "ssh", "provider": "static",
                    "config": {"ssh": {"head": "10.0.0.1", "workers": ["10.0.0.2"],
                                       "credential": {"airflow_conn_id": "ssh_fleet"}}}}}
DAG_IDS = {"airfleet_cluster_create", "airfleet_cluster_update", "airfleet_cluster_delete",
           "airfleet_cluster_onboard", "airfleet_cluster_health_check"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def kube_api():
    from tests.fakes.kube_apiserver import FakeKubeAPIServer

    # Long enough that the Deployments are still rolling out when wait_ready first looks
    # (a task start alone takes about 4 s), so the wait must move to the triggerer.
    with FakeKubeAPIServer(ready_delay=15.0) as server:
        server.add_node("gpu-1", labels={"nvidia.com/gpu.product": "NVIDIA-L4",
                                         "feature.node.kubernetes.io/pci-10de.present": "true"},
                        allocatable={"nvidia.com/gpu": "1"})
        yield server


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, kube_api):
    """`bin/airfleet-dev run` (what `make run` runs) on a free port and a private home."""
    home = tmp_path_factory.mktemp("e2e-airflow-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AIRFLEET"))}
    env.update(AIRFLEET_AIRFLOW_HOME=str(home), AIRFLEET_PORT=str(port),
               AIRFLEET_BACKENDS=f"ssh={FAKE}",
               AIRFLEET_FAKE_BACKEND_LOG=str(home / "calls.jsonl"),
               # Every readiness wait moves to the triggerer at once.
               AIRFLEET_READY_INLINE_SECONDS="0",
               AIRFLOW_CONN_K8S_FAKE=json.dumps({"conn_type": "kubernetes", "extra": {
                   "kube_config": json.dumps(kube_api.kubeconfig())}}),
               PYTHONPATH=str(ROOT))
    log = open(home / "standalone.log", "w")
    proc = subprocess.Popen([str(ROOT / "bin" / "airfleet-dev"), "run"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, home / "standalone.log")
        yield {"base": base, "home": home, "port": port}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:  # the standalone's children (scheduler workers, ...) go with the group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


def _wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
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


def _token(base: str, user: str, password: str) -> str:
    r = requests.post(f"{base}/auth/token", json={"username": user, "password": password},
                      timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["access_token"]


@pytest.fixture(scope="module")
def client(airflow):
    import airflow_client.client as af

    config = af.Configuration(host=airflow["base"],
                              access_token=_token(airflow["base"], "admin", "admin"))
    with af.ApiClient(config) as api:
        yield api


@pytest.fixture(scope="module")
def dags_parsed(client):
    """The five DAGs, once the dag-processor has parsed them."""
    import airflow_client.client as af

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        dags = af.DAGApi(client).get_dags(tags=["airfleet"]).dags
        if {d.dag_id for d in dags} == DAG_IDS:
            return dags
        time.sleep(2)
    pytest.fail(f"DAGs not parsed: {[d.dag_id for d in dags]}")


def _trigger(client, dag_id: str, conf: dict, attempts: int = 3):
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


def _wait_run(client, dag_id: str, run_id: str, timeout: float = 300) -> str:
    """The run's final state; a failed run prints its failed tasks' logs (for CI)."""
    import airflow_client.client as af

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = af.DagRunApi(client).get_dag_run(dag_id, run_id).state
        state = str(state.value if hasattr(state, "value") else state)
        if state == "failed":
            _print_failed_tasks(client, dag_id, run_id)
        if state in ("success", "failed"):
            return state
        time.sleep(2)
    _print_failed_tasks(client, dag_id, run_id)
    pytest.fail(f"{dag_id} {run_id} did not finish in {timeout} s")


def _print_failed_tasks(client, dag_id: str, run_id: str) -> None:
    import airflow_client.client as af

    for ti in af.TaskInstanceApi(client).get_task_instances(dag_id, run_id).task_instances:
        state = str(getattr(ti.state, "value", ti.state))
        print(f"task {ti.task_id}: {state}")
        if state not in ("success", "skipped", "None"):
            print(_log(client, dag_id, run_id, ti.task_id, ti.try_number or 1)[-4000:])


def _log(client, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
    import airflow_client.client as af

    content = af.TaskInstanceApi(client).get_log(dag_id, run_id, task_id, try_number,
                                                 full_content=True).content
    return json.dumps([c.to_dict() if hasattr(c, "to_dict") else c for c in content],
                      default=str)


def _log_until(client, dag_id: str, run_id: str, task_id: str, text: str,
               timeout: float = 30) -> str:
    """The task's log once it shows ``text`` (log shipping may trail the run's end)."""
    deadline = time.monotonic() + timeout
    while True:
        log = _log(client, dag_id, run_id, task_id)
        if text in log or time.monotonic() > deadline:
            return log
        time.sleep(1)


def _store(airflow):
    from airfleet.store import Store

    return Store(f"sqlite:///{airflow['home'] / 'airfleet.db'}")


def test_airflow_is_healthy_with_the_five_dags_active_and_no_import_errors(client, dags_parsed):
    import airflow_client.client as af

    assert {d.dag_id: d.is_paused for d in dags_parsed} == {d: False for d in DAG_IDS}
    assert af.ImportErrorApi(client).get_import_errors().total_entries == 0


def test_bad_conf_gets_400_naming_the_field_and_changes_nothing(client, dags_parsed, airflow):
    from airflow_client.client.exceptions import ApiException

    bad = json.loads(json.dumps(CLUSTER))
    bad["spec"]["config"]["ssh"]["port"] = 70000
    with pytest.raises(ApiException) as err:
        _trigger(client, "airfleet_cluster_create", {"cluster": bad})
    assert err.value.status == 400
    assert "param cluster" in err.value.body and "['spec']['config']['ssh']['port']" in err.value.body

    missing = json.loads(json.dumps(CLUSTER))
    del missing["metadata"]["name"]
    with pytest.raises(ApiException) as err:
        _trigger(client, "airfleet_cluster_create", {"cluster": missing})
    assert err.value.status == 400 and "'name' is a required property" in err.value.body

    store = _store(airflow)
    store.migrate()
    assert store.list_clusters(include_deleted=True) == []
    assert store.get_lease("e2e-a") is None


def test_a_viewer_cannot_trigger(airflow, dags_parsed):
    token = _token(airflow["base"], "viewer", "viewer")
    r = requests.post(f"{airflow['base']}/api/v2/dags/airfleet_cluster_create/dagRuns",
                      headers={"Authorization": f"Bearer {token}"},
                      json={"logical_date": None, "conf": {"cluster": CLUSTER}}, timeout=10)
    assert r.status_code == 403, r.text


def test_create_then_delete_over_rest(client, dags_parsed, airflow):
    run = _trigger(client, "airfleet_cluster_create", {"cluster": CLUSTER})
    assert _wait_run(client, "airfleet_cluster_create", run.dag_run_id) == "success"
    assert "lease on cluster e2e-a taken" in _log(client, "airfleet_cluster_create",
                                                  run.dag_run_id, "acquire_lease")
    record = _store(airflow).require_cluster("e2e-a")
    assert record.phase.value == "Running" and len(record.cluster.status.nodes) == 2

    run = _trigger(client, "airfleet_cluster_delete", {"name": "e2e-a"})
    assert _wait_run(client, "airfleet_cluster_delete", run.dag_run_id) == "success"
    store = _store(airflow)
    assert store.get_cluster("e2e-a") is None
    phases = [(e.from_phase, e.to_phase) for e in store.events("e2e-a") if e.to_phase]
    assert phases == [(None, "Pending"), ("Pending", "Provisioning"), ("Provisioning", "Running"),
                      ("Running", "Deleting"), ("Deleting", "Deleted")]
    calls = [json.loads(line)["verb"]
             for line in (airflow["home"] / "calls.jsonl").read_text().splitlines()]
    assert calls == ["provision", "detect_accelerators", "apply", "teardown"]


def test_a_kubernetes_cluster_over_rest_waits_in_the_triggerer(client, dags_parsed, airflow,
                                                                kube_api):
    from airfleet.backends.kubernetes import manifests as m

    cluster = {"metadata": {"name": "e2e-k8s"},
               "spec": {"type": "kubernetes", "provider": "existing",
                        "config": {"kubernetes": {"credential": {"airflow_conn_id": "k8s_fake"}}}}}
    run = _trigger(client, "airfleet_cluster_create", {"cluster": cluster})
    assert _wait_run(client, "airfleet_cluster_create", run.dag_run_id) == "success"
    waited = _log_until(client, "airfleet_cluster_create", run.dag_run_id, "wait_ready",
                        "readiness wait ended")
    # It deferred, and resumed when the trigger fired.
    assert "waiting up to" in waited and "readiness wait ended" in waited, waited
    record = _store(airflow).require_cluster("e2e-k8s")
    assert record.phase.value == "Running"
    assert record.cluster.status.accelerators["models"] == {"NVIDIA-L4": 1}
    ns = m.namespace_of("e2e-k8s")
    assert kube_api.get("Deployment", m.ROUTER, ns) is not None

    run = _trigger(client, "airfleet_cluster_delete", {"name": "e2e-k8s"})
    assert _wait_run(client, "airfleet_cluster_delete", run.dag_run_id) == "success"
    assert kube_api.get("Namespace", ns) is None
    assert _store(airflow).get_cluster("e2e-k8s") is None
