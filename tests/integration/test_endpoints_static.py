"""Endpoints on a static-nodes cluster as Ray Serve applications, end to end: real sshd hosts
(tests/fakes/nodes.py), real Ray 2.60 and Ray Serve as host processes, driven through the
endpoint DAGs with ``dag.test()``; Serve's config and status asked over the same SSH tunnel to
the head's loopback dashboard that the backend uses, requests sent to Serve's proxy on the
head's address the way clients send them.

One cluster (head + one worker) serves the whole module: Ray and Serve starts are most of the
time here."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from airfleet.backends.ssh import serve
from airfleet.backends.ssh.backend import head_dashboard
from airfleet.backends.ssh.remote import run_sync
from airfleet.endpoints import EndpointPhase
from airfleet.resources import Phase
from airfleet.store import Store
from tests.fakes.nodes import NodeFarm
from tests.fakes.static_fleet import CONN_ENV, ssh_connection, static_cluster, stop_ray

pytestmark = pytest.mark.integration

CLUSTER = "serve-a"
CACHE = "/tmp/models/hf"  # each node's own /tmp (its mount namespace)
FOREIGN = {"name": "someone-else", "route_prefix": "/someone-else",
           "import_path": serve.MOCK_IMPORT_PATH, "args": {"model": "other"},
           "deployments": [{"name": serve.MOCK_DEPLOYMENT, "num_replicas": 1,
                            "ray_actor_options": {"num_cpus": 0.1}}]}


@pytest.fixture(scope="module")
def farm():
    with NodeFarm(2, name_prefix="srv") as farm:
        yield farm


@pytest.fixture(scope="module")
def running(farm, airflow_db, tmp_path_factory):
    """Cluster ``serve-a`` created through its DAG and Running, with a model cache, in a
    store of the module's own; Ray stopped on every node afterwards."""
    from tests.conftest import dags_for_dag_test

    home = tmp_path_factory.mktemp("airfleet-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CONN_ENV, ssh_connection(farm))
        mp.setenv("AIRFLEET_DATABASE_URL", f"sqlite:///{home / 'airfleet.db'}")
        mp.setenv("AIRFLEET_KEYS_DIR", str(home / "keys"))
        mp.delenv("AIRFLEET_BACKENDS", raising=False)
        Store().migrate()
        spec = static_cluster(farm, 1, CLUSTER)
        spec["spec"]["model_caches"] = [{"name": "hf", "host_path": {"path": CACHE}}]
        try:
            dr = dags_for_dag_test()["airfleet_cluster_create"].test(
                run_conf={"cluster": spec})
            assert str(dr.state) == "success", Store().require_cluster(CLUSTER).cluster.status
            assert Store().require_cluster(CLUSTER).phase is Phase.RUNNING
            yield farm
        finally:
            stop_ray(farm)


def endpoint(name: str = "chat", **spec) -> dict:
    return {"endpoint": {"metadata": {"name": name}, "spec": {
        "cluster": CLUSTER, "engine": "mock", "replicas": 1, "version": "v1",
        "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct", "served_name": name, "cache": "hf"},
        "resources": {"cpu": "250m"}, "engine_args": {"token-latency-ms": 5}, **spec}}}


def states(dr) -> dict[str, str]:
    return {t.task_id: str(t.state) for t in dr.get_task_instances()}


def record(name: str, version: str = "v1"):
    return Store().get_endpoint(name, version)


def dashboard(call):
    """``call(dash)`` on the head's dashboard, through the SSH tunnel the backend uses."""
    from airfleet_airflow.clients import clients_for

    cluster = Store().require_cluster(CLUSTER).cluster

    async def go():
        async with head_dashboard(cluster, clients_for(cluster)) as dash:
            return await call(dash)

    return run_sync(go())


def applications() -> dict:
    return dashboard(lambda dash: dash.serve_applications())["applications"]


def replica_ids(app: dict) -> set[str]:
    return {r["replica_id"] for d in app["deployments"].values() for r in d["replicas"]}


CHAT = {"model": "chat", "messages": [{"role": "user", "content": "tell me about ray serve"}],
        "max_tokens": 8}


def stream_chat(url: str) -> list[str]:
    """The SSE ``data:`` payloads of one streamed chat completion."""
    with httpx.stream("POST", f"{url}/chat/completions", json={**CHAT, "stream": True},
                      timeout=30, trust_env=False) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line.removeprefix("data: ") for line in r.iter_lines()
                if line.startswith("data: ")]


class Load:
    """A client sending chat completions one after another while the block runs: how many
    were answered, by which engines, and every error (status or exception)."""

    def __init__(self, url: str) -> None:
        self.url, self.ok, self.errors, self.engines = url, 0, [], set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send, daemon=True)

    def _send(self) -> None:
        with httpx.Client(timeout=30, trust_env=False) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(f"{self.url}/chat/completions", json=CHAT)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                if r.status_code == 200 and r.json()["choices"][0]["message"]["content"]:
                    self.ok += 1
                    self.engines.add(r.headers["x-airfleet-engine"])
                else:
                    self.errors.append(f"{r.status_code}: {r.text[:200]}")

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_deploy_stream_scale_under_load_and_delete(dags, running):
    farm = running
    head = farm.nodes[0]
    # An application that is not Airfleet's: every change below must keep it as it is.
    dashboard(lambda dash: dash.put_serve_applications({"applications": [FOREIGN]}))

    started = time.monotonic()
    dr = dags["airfleet_endpoint_deploy"].test(run_conf=endpoint())
    assert str(dr.state) == "success", (states(dr), record("chat").endpoint.status.message)
    deployed = time.monotonic() - started
    status = record("chat").endpoint.status
    assert record("chat").phase is EndpointPhase.RUNNING
    assert (status.ready_replicas, status.replicas) == (1, 1)
    url = f"http://{head.address}:8000/chat/v1/v1"
    assert status.url == url
    assert status.message == f"1/1 replicas ready; model chat at {url}"

    apps = applications()
    assert apps["someone-else"]["status"] == "RUNNING"
    assert apps["someone-else"]["deployed_app_config"] == FOREIGN
    config = apps["chat-v1"]["deployed_app_config"]
    assert config["route_prefix"] == "/chat/v1"
    assert config["deployments"] == [{"name": "MockEngine", "num_replicas": 1,
                                      "ray_actor_options": {"num_gpus": 0, "num_cpus": 0.25}}]
    env = config["runtime_env"]["env_vars"]
    assert env == {"AIRFLEET_CLUSTER": CLUSTER, "AIRFLEET_ENDPOINT": "chat",
                   "AIRFLEET_VERSION": "v1", "HF_HOME": CACHE}
    # The engine's package reached the nodes from the cluster's GCS, not from this machine.
    package = serve.mock_engine_package()
    assert config["runtime_env"]["py_modules"] == [package.uri]
    assert dashboard(lambda dash: dash.package_exists(package.http_path)) is True
    unpacked = package.uri.removeprefix("gcs://").removesuffix(".zip")
    node = next(n for n in farm.nodes
                if n.address == apps["chat-v1"]["deployments"]["MockEngine"]["replicas"][0][
                    "node_ip"])
    listing = node.run("ls /tmp/ray/session_latest/runtime_resources/py_modules_files/",
                       check=False).stdout
    assert unpacked in listing, listing

    # Streamed through Serve's proxy on the head: a chunk per token, then [DONE].
    events = stream_chat(url)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    words = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert len([w for w in words if w]) >= 4, events
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    # The same spec again: nothing is redeployed.
    dr = dags["airfleet_endpoint_deploy"].test(run_conf=endpoint())
    assert str(dr.state) == "success"
    again = applications()["chat-v1"]
    assert again["last_deployed_time_s"] == apps["chat-v1"]["last_deployed_time_s"]
    assert replica_ids(again) == replica_ids(apps["chat-v1"])

    # 1 -> 3 -> 1 while a client sends requests without a pause: none fails.
    with Load(url) as load:
        time.sleep(1)
        dr = dags["airfleet_endpoint_scale"].test(
            run_conf={"name": "chat", "replicas": 3, "version": None})
        assert str(dr.state) == "success", (states(dr), record("chat").endpoint.status)
        status = record("chat").endpoint.status
        assert (status.ready_replicas, status.replicas) == (3, 3)
        assert len(replica_ids(applications()["chat-v1"])) == 3
        seen_at_three = load.ok
        time.sleep(2)
        dr = dags["airfleet_endpoint_scale"].test(
            run_conf={"name": "chat", "replicas": 1, "version": None})
        assert str(dr.state) == "success", (states(dr), record("chat").endpoint.status)
        status = record("chat").endpoint.status
        assert (status.ready_replicas, status.replicas) == (1, 1)
        time.sleep(1)
    assert load.errors == [], load.errors[:5]
    assert load.ok > seen_at_three > 0
    assert len(load.engines) >= 2, load.engines  # the added replicas answered too
    assert len(replica_ids(applications()["chat-v1"])) == 1
    history = [e.to_phase for e in Store().endpoint_events("chat") if e.to_phase]
    assert history.count("Running") >= 3

    # Delete: our application is gone from Serve, the other one still runs.
    dr = dags["airfleet_endpoint_delete"].test(run_conf={"name": "chat", "version": None})
    assert str(dr.state) == "success", states(dr)
    apps = applications()
    assert "chat-v1" not in apps
    assert [name for name, app in apps.items()
            if (app.get("deployed_app_config") or {}).get("runtime_env", {}).get(
                "env_vars", {}).get("AIRFLEET_CLUSTER")] == []
    assert apps["someone-else"]["status"] == "RUNNING"
    assert record("chat") is None
    [gone] = [r for r in Store().list_endpoints(include_deleted=True) if r.name == "chat"]
    assert gone.phase is EndpointPhase.DELETED
    assert httpx.post(f"{url}/chat/completions", json=CHAT, timeout=10,
                      trust_env=False).status_code == 404
    # Deleting again is done already.
    assert str(dags["airfleet_endpoint_delete"].test(
        run_conf={"name": "chat", "version": None}).state) == "success"
    assert deployed < 120  # measured 8-10 s here, Serve's own start included


def test_an_application_serve_cannot_start_fails_with_serves_message(dags, running):
    dr = dags["airfleet_endpoint_deploy"].test(
        run_conf=endpoint("broken", engine_args={"no-such-flag": 1}))
    assert str(dr.state) == "failed"
    assert states(dr)["wait_ready"] == "failed"
    failed = record("broken")
    assert failed.phase is EndpointPhase.FAILED
    message = failed.endpoint.status.message
    assert message.startswith("Serve application broken-v1 DEPLOY_FAILED: Deploying app "
                              "'broken-v1' failed with exception:"), message
    assert "ValueError: args.no_such_flag: unknown; the mock engine takes" in message
    assert "Traceback" not in message
    assert applications()["broken-v1"]["status"] == "DEPLOY_FAILED"

    dr = dags["airfleet_endpoint_delete"].test(run_conf={"name": "broken", "version": None})
    assert str(dr.state) == "success", states(dr)
    assert "broken-v1" not in applications()
