"""One running Airflow for every end-to-end test: `bin/airfleet-dev run` (what `make run`
runs) on a free port and a private home, started once per session (about 30 s).

The recording backend of ``tests/fakes`` stands in for the static-nodes backend (registered
through ``AIRFLEET_BACKENDS``), so these tests show the flow machinery inside a real
scheduler, executor, triggerer and api-server. The Kubernetes backend is the real one, against
the fake API server of ``tests/fakes``. ``tests/e2e/dags`` is a second DAG bundle beside
Airfleet's own: DAGs that only the tests need (a downstream DAG scheduled on a cluster asset).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.e2e.support import DAG_IDS, ROOT, STANDALONE_LOGS, free_port, token, wait_healthy

FAKE = "tests.fakes.recording_backend:RecordingBackend"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def kube_api():
    from tests.fakes.kube_apiserver import FakeKubeAPIServer

    # Long enough that the Deployments are still rolling out when wait_ready first looks
    # (a task start alone takes about 4 s), so the wait must move to the triggerer.
    with FakeKubeAPIServer(ready_delay=15.0) as server:
        server.add_node("gpu-1", labels={"nvidia.com/gpu.product": "NVIDIA-L4",
                                         "feature.node.kubernetes.io/pci-10de.present": "true"},
                        allocatable={"nvidia.com/gpu": "1"})
        yield server


@pytest.fixture(scope="session")
def airflow(tmp_path_factory, kube_api):
    home = tmp_path_factory.mktemp("e2e-airflow-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AIRFLEET"))}
    # Two approvers beside README's admin and viewer (role user: may answer a HITL task),
    # each with their name as password (bin/airfleet-dev keeps a passwords file it finds).
    users = {"admin": "admin", "viewer": "viewer", "alice": "user", "bob": "user"}
    (home / "passwords.json").write_text(json.dumps({user: user for user in users}))
    env.update(AIRFLEET_AIRFLOW_HOME=str(home), AIRFLEET_PORT=str(port),
               AIRFLEET_USERS=",".join(f"{user}:{role}" for user, role in users.items()),
               AIRFLEET_BACKENDS=f"ssh={FAKE}",
               AIRFLEET_FAKE_BACKEND_LOG=str(home / "calls.jsonl"),
               AIRFLEET_FAKE_BACKEND_STATE=str(home / "fake-state.json"),
               # Every readiness wait moves to the triggerer at once.
               AIRFLEET_READY_INLINE_SECONDS="0",
               AIRFLOW_CONN_K8S_FAKE=json.dumps({"conn_type": "kubernetes", "extra": {
                   "kube_config": json.dumps(kube_api.kubeconfig())}}),
               AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST=json.dumps([
                   {"name": "dags-folder", "classpath":
                    "airflow.dag_processing.bundles.local.LocalDagBundle", "kwargs": {}},
                   {"name": "e2e-tests", "classpath":
                    "airflow.dag_processing.bundles.local.LocalDagBundle",
                    "kwargs": {"path": str(ROOT / "tests" / "e2e" / "dags")}}]),
               PYTHONPATH=str(ROOT))
    STANDALONE_LOGS.append(home / "standalone.log")
    log = open(home / "standalone.log", "w")
    proc = subprocess.Popen([str(ROOT / "bin" / "airfleet-dev"), "run"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, home / "standalone.log")
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


@pytest.fixture(scope="session")
def client(airflow):
    import airflow_client.client as af

    config = af.Configuration(host=airflow["base"],
                              access_token=token(airflow["base"], "admin", "admin"))
    with af.ApiClient(config) as api:
        yield api


@pytest.fixture(scope="session")
def dags_parsed(client):
    """Airfleet's DAGs, once the dag-processor has parsed them."""
    import airflow_client.client as af

    deadline = time.monotonic() + 300  # parsing 8 files can take minutes on a busy machine
    while time.monotonic() < deadline:
        dags = af.DAGApi(client).get_dags(tags=["airfleet"]).dags
        if {d.dag_id for d in dags} == DAG_IDS:
            return dags
        time.sleep(2)
    pytest.fail(f"DAGs not parsed: {[d.dag_id for d in dags]}")
