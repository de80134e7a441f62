"""The README's first cluster, run as written: every block marked ``<!-- runnable -->`` goes, in
order, to one bash (as a person's terminal: the blocks share variables and functions), against
an Airflow started by ``bin/airfleet-dev run`` (what ``make run`` runs) on a free port and a
private home, with the real static-nodes backend.

The nodes are real: three sshd hosts of tests/fakes/nodes.py at the README's addresses
(10.0.0.2-4, so 10.0.0.0/24 must be free on the machine), running real Ray 2.60 through the
``docker`` shim of tests/fakes/docker_shim.py (no Docker engine can run here). What the test
substitutes, the blocks read from the environment with defaults: ``AIRFLEET_PORT`` (the
Airflow), ``AIRFLEET_AIRFLOW_HOME`` (its home, for ``airflow connections add``) and ``HOME``
(whose ``.ssh/id_ed25519`` is the nodes' key). Each block must exit 0 and print what its
``# → ...`` comments promise; each run it triggers must succeed and leave the cluster as the
README says (checked through the Airfleet API and on the nodes themselves).
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.e2e.support import DAG_IDS, ROOT, STANDALONE_LOGS, free_port, token, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

README = ROOT / "README.md"
RUNNABLE = re.compile(r"^<!-- runnable -->\n```(?:sh|bash)\n(.*?)^```", re.M | re.S)
PROMISE = re.compile(r"#\s*→\s*(.+?)\s*$", re.M)
BLOCK_TIMEOUT = 300
# `make run` gives SQLite a 30 s busy timeout: a read queued behind a task's write lock may
# wait that long before the api-server answers (CI saw a 10 s read time out).
API_TIMEOUT = 45
CLUSTER = "llm-a"


def runnable_blocks(text: str) -> list[str]:
    """The README's runnable command blocks, in order."""
    return RUNNABLE.findall(text)


class Shell:
    """One bash fed block after block; ``set -eo pipefail``, so a failing command ends it."""

    def __init__(self, env: dict[str, str], cwd: Path, scratch: Path):
        self.scratch = scratch
        self.proc = subprocess.Popen(["bash", "--norc", "--noprofile"], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._send("set -eo pipefail\n")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _send(self, text: str) -> None:
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def run(self, block: str, timeout: float) -> tuple[bool, str]:
        """Source the block (stdin closed, so no command eats the next ones); its output."""
        path = self.scratch / f"block-{uuid.uuid4().hex[:8]}.sh"
        path.write_text(block)
        marker = f"__block_done_{uuid.uuid4().hex}__"
        self._send(f"source {shlex.quote(str(path))} </dev/null\necho {marker}\n")
        out, deadline = [], time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False, "".join(out) + f"\n[still running after {timeout} s]"
            if line is None:
                return False, "".join(out) + f"\n[bash exited {self.proc.wait()}]"
            if line.strip() == marker:
                return True, "".join(out)
            out.append(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def farm():
    """head 10.0.0.2, workers 10.0.0.3 and 10.0.0.4, each with the docker shim."""
    from tests.fakes import docker_shim
    from tests.fakes.nodes import NodeFarm, _used_subnets

    if 0 in _used_subnets("10.0"):
        pytest.fail("10.0.0.0/24 is in use on this machine: the README's nodes cannot live "
                    "there (free it, or run these tests on a machine where it is free)")
    with NodeFarm(3, name_prefix="readme", network="10.0", subnet_index=0) as farm:
        for node in farm.nodes:
            docker_shim.install(node.bin_dir)
        yield farm


@pytest.fixture(scope="module")
def readme_airflow(tmp_path_factory):
    """``bin/airfleet-dev run`` with the real backends, its DAGs parsed."""
    home = tmp_path_factory.mktemp("readme-airflow-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AIRFLEET"))}
    env.update(AIRFLEET_AIRFLOW_HOME=str(home), AIRFLEET_PORT=str(port))
    STANDALONE_LOGS.append(home / "standalone.log")
    log = open(home / "standalone.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(ROOT / "bin" / "airfleet-dev"), "run"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, home / "standalone.log")
        headers = {"Authorization": f"Bearer {token(base, 'admin', 'admin')}"}
        _wait_dags(base, headers)
        yield {"base": base, "home": home, "port": port, "headers": headers}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:  # the standalone's children go with the group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


def _wait_dags(base: str, headers: dict, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dags = requests.get(f"{base}/api/v2/dags", params={"tags": "airfleet"}, headers=headers,
                            timeout=API_TIMEOUT).json().get("dags", [])
        if {d["dag_id"] for d in dags} == DAG_IDS:
            return
        time.sleep(2)
    pytest.fail(f"DAGs not parsed after {timeout} s")


@pytest.fixture
def shell(farm, readme_airflow, tmp_path):
    """A terminal as the README's reader has one: HOME holds the nodes' key."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    shutil.copy(farm.private_key_path, home / ".ssh" / "id_ed25519")
    (home / ".ssh" / "id_ed25519").chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AIRFLEET"))}
    env.update(HOME=str(home), AIRFLEET_PORT=str(readme_airflow["port"]),
               AIRFLEET_AIRFLOW_HOME=str(readme_airflow["home"]))
    sh = Shell(env, ROOT, tmp_path)
    yield sh
    sh.close()


def test_the_readme_runs_as_written(shell, readme_airflow, farm):
    blocks = runnable_blocks(README.read_text())
    assert len(blocks) >= 5, "the README lost its runnable blocks"
    seen = _runs(readme_airflow)
    for i, block in enumerate(blocks, 1):
        started = time.monotonic()
        ok, output = shell.run(block, BLOCK_TIMEOUT)
        new = {run: dag for run, dag in _runs(readme_airflow).items() if run not in seen}
        seen.update(new)
        where = f"README runnable block {i}:\n{block}\n--- its output ---\n{output}"
        if not ok:
            _print_failed_runs(readme_airflow, new)
            pytest.fail(where)
        for promise in PROMISE.findall(block):  # "…" stands for what varies (a duration)
            pattern = ".*?".join(map(re.escape, promise.split("…")))
            assert re.search(pattern, output), f"promised {promise!r}; {where}"
        for run, dag in new.items():
            assert _state(readme_airflow, dag, run) == "success", f"{dag} {run}; {where}"
            if dag in CHECKS:
                CHECKS[dag](readme_airflow, farm)
        print(f"block {i} ({time.monotonic() - started:.0f} s):\n{output}")


def _runs(server) -> dict[str, str]:
    """run id -> DAG id of every manual run of Airfleet's flows so far."""
    runs = {}
    for dag in DAG_IDS:
        r = requests.get(f"{server['base']}/api/v2/dags/{dag}/dagRuns",
                         params={"run_type": "manual", "limit": 100},
                         headers=server["headers"], timeout=API_TIMEOUT)
        runs.update({d["dag_run_id"]: dag for d in r.json()["dag_runs"]})
    return runs


def _state(server, dag: str, run: str) -> str:
    r = requests.get(f"{server['base']}/api/v2/dags/{dag}/dagRuns/{run}",
                     headers=server["headers"], timeout=API_TIMEOUT)
    return r.json()["state"]


def _print_failed_runs(server, runs: dict[str, str]) -> None:
    import airflow_client.client as af

    from tests.e2e.support import print_failed_tasks

    config = af.Configuration(host=server["base"],
                              access_token=server["headers"]["Authorization"].split()[1])
    with af.ApiClient(config) as client:
        for run, dag in runs.items():
            print(f"--- {dag} {run}")
            print_failed_tasks(client, dag, run)


def _cluster(server) -> requests.Response:
    return requests.get(f"{server['base']}/airfleet/api/v1/clusters/{CLUSTER}",
                        headers=server["headers"], timeout=API_TIMEOUT)


def _expect_running(server, farm, workers: int) -> None:
    """Running with the head and ``workers`` workers, each a Ray node on its host."""
    detail = _cluster(server).json()
    assert detail["phase"] == "Running", detail
    nodes = {n["address"]: (n["role"], n["phase"]) for n in detail["status"]["nodes"]}
    head, *rest = farm.nodes
    want = {head.address: ("head", "Running"),
            **{n.address: ("worker", "Running") for n in rest[:workers]}}
    assert nodes == want, detail["status"]["nodes"]
    for node in farm.nodes:
        has_ray = any("raylet" in p for p in node.processes())
        assert has_ray == (node.address in want), f"{node.address}: {node.processes()}"


def _after_delete(server, farm) -> None:
    from tests.fakes.static_fleet import ray_processes

    assert _cluster(server).status_code == 404
    for node in farm.nodes:
        assert ray_processes(node) == [], node.address


# What each flow's run must leave behind, as the README says.
CHECKS = {
    "airfleet_cluster_create": lambda server, farm: _expect_running(server, farm, workers=1),
    "airfleet_cluster_update": lambda server, farm: _expect_running(server, farm, workers=2),
    "airfleet_cluster_health_check": lambda server, farm: _expect_running(server, farm, workers=2),
    "airfleet_cluster_delete": _after_delete,
}


def test_the_form_shows_the_example_and_rest_still_needs_a_cluster(readme_airflow):
    """The create form's ``cluster`` help carries examples/llm-a.json (the UI renders
    ``description_md`` when the Param has no ``description``); with no default behind it, a
    REST trigger that omits ``cluster`` is still a 400 and creates no run."""
    import json

    base, headers = readme_airflow["base"], readme_airflow["headers"]
    for dag in ("airfleet_cluster_create", "airfleet_cluster_update", "airfleet_cluster_onboard"):
        params = requests.get(f"{base}/api/v2/dags/{dag}/details", headers=headers,
                              timeout=API_TIMEOUT).json()["params"]
        cluster = params["cluster"]
        assert cluster["value"] is None and cluster["description"] is None, cluster
        md = cluster["schema"]["description_md"]
        shown = json.loads(md.split("```json\n", 1)[1].split("\n```", 1)[0])
        assert shown == json.loads((ROOT / "examples" / "llm-a.json").read_text())

    before = _runs(readme_airflow)
    r = requests.post(f"{base}/api/v2/dags/airfleet_cluster_create/dagRuns", headers=headers,
                      json={"logical_date": None, "conf": {}}, timeout=API_TIMEOUT)
    assert r.status_code == 400, r.text
    assert "cluster" in r.text
    assert _runs(readme_airflow) == before


def test_an_endpoint_on_static_nodes_with_the_official_client(readme_airflow, farm):
    """The README's nodes with real Ray, driven with apache-airflow-client as a program would:
    a cluster, a mock endpoint on it (a Ray Serve application) scaled 1 -> 2 and asked over
    the OpenAI API, then both deleted; the Airfleet API tells each step."""
    import json

    import airflow_client.client as af
    import httpx

    from tests.e2e.support import trigger, wait_run

    base, headers = readme_airflow["base"], readme_airflow["headers"]
    requests.post(f"{base}/api/v2/connections", headers=headers, timeout=API_TIMEOUT, json={
        "connection_id": "ssh_fleet", "conn_type": "ssh", "login": "root",
        "extra": json.dumps({"key_file": str(farm.private_key_path)})})  # 409: there already
    cluster = json.loads((ROOT / "examples" / "llm-a.json").read_text())
    cluster["spec"]["config"]["ssh"]["known_hosts"] = farm.known_hosts_text()
    endpoint = json.loads((ROOT / "examples" / "endpoints" / "chat.json").read_text())
    config = af.Configuration(host=base, access_token=headers["Authorization"].split()[1])

    def plugin(path: str) -> dict:
        return requests.get(f"{base}/airfleet/api/v1/{path}", headers=headers,
                            timeout=API_TIMEOUT).json()

    with af.ApiClient(config) as client:
        def step(dag_id: str, conf: dict) -> None:
            run = trigger(client, dag_id, conf)
            assert wait_run(client, dag_id, run.dag_run_id) == "success", (dag_id, conf)

        step("airfleet_cluster_create", {"cluster": cluster})
        try:
            step("airfleet_endpoint_deploy", {"endpoint": endpoint})
            step("airfleet_endpoint_scale", {"name": "chat", "replicas": 2})
            [v1] = plugin("endpoints/chat")["versions"]
            assert (v1["phase"], v1["ready_replicas"], v1["replicas"]) == ("Running", 2, 2), v1
            assert v1["url"] == "http://10.0.0.2:8000/chat/v1/v1", v1
            answer = httpx.post(f"{v1['url']}/chat/completions", trust_env=False, timeout=30,
                                json={"model": "chat", "max_tokens": 2, "messages": [
                                    {"role": "user", "content": "two replicas"}]}).json()
            assert answer["choices"][0]["message"]["content"] == "two replicas", answer
            step("airfleet_endpoint_delete", {"name": "chat", "version": None})
            assert plugin("clusters/llm-a")["endpoint_count"] == 0
            step("airfleet_cluster_delete", {"name": "llm-a", "force": False})
        finally:  # the nodes are the module's: leave them without Ray whatever happened
            if plugin("clusters/llm-a").get("phase") not in (None, "Deleted"):
                step("airfleet_cluster_delete", {"name": "llm-a", "force": True})
