"""Endpoints as Ray Serve applications (airfleet.backends.ssh.serve), with no cluster: the
application of each engine, the whole config built from what runs (other applications kept
as Serve recorded them), checked against Ray's own ``ServeDeploySchema``; the package's URI
against Ray's own ``get_uri_for_directory``; and the readiness verdict on GET answers shaped
as Ray 2.60 answers them."""

from __future__ import annotations

import copy
import io
import zipfile
from pathlib import Path
from typing import Any

import airfleet_mock_engine
import pytest

from airfleet.backends import NotSupported
from airfleet.backends.ssh import serve
from airfleet.endpoints import EndpointVersion, example_endpoint
from airfleet.resources import Cluster

HEAD = "10.0.0.1"
URL = f"http://{HEAD}:8000/chat/v1/v1"
PKG = "gcs://_ray_pkg_0123456789abcdef.zip"


def cluster(runtime: str = "none") -> Cluster:
    return Cluster.model_validate({
        "metadata": {"name": "llm-a"},
        "spec": {"type": "ssh", "provider": "static",
                 "model_caches": [{"name": "hf", "host_path": {"path": "/data/models"}},
                                  {"name": "big", "host_path": {"path": "/big"},
                                   "mount_path": "/mnt/big"}],
                 "config": {"ssh": {"head": HEAD, "workers": ["10.0.0.2"],
                                    "credential": {"airflow_conn_id": "ssh_fleet"},
                                    "container_runtime": runtime}}},
        "status": {"phase": "Running"}})


def endpoint(**spec: Any) -> EndpointVersion:
    data = example_endpoint()
    data["metadata"]["name"] = "chat"
    data["spec"].update(spec)
    return EndpointVersion.model_validate(data)


MOCK_APP = {
    "name": "chat-v1", "route_prefix": "/chat/v1",
    "runtime_env": {"env_vars": {"AIRFLEET_CLUSTER": "llm-a", "AIRFLEET_ENDPOINT": "chat",
                                 "AIRFLEET_VERSION": "v1", "HF_HOME": "/data/models"},
                    "py_modules": [PKG]},
    "import_path": "airfleet_mock_engine.serve:app_builder",
    "args": {"model": "Qwen/Qwen2.5-0.5B-Instruct", "served_model_name": "chat",
             "max_model_len": 2048, "token_latency_ms": 20},
    "deployments": [{"name": "MockEngine", "num_replicas": 2,
                     "ray_actor_options": {"num_gpus": 0, "num_cpus": 0.5,
                                           "memory": 2 * 2**30}}]}


def mock() -> EndpointVersion:
    return endpoint(replicas=2, max_model_len=2048,
                    model={"name": "Qwen/Qwen2.5-0.5B-Instruct", "served_name": "chat",
                           "cache": "hf"},
                    resources={"cpu": "500m", "memory": "2Gi"},
                    engine_args={"token-latency-ms": 20, "max-num-seqs": None})


# ---- one application ----------------------------------------------------------------------

def test_mock_application():
    assert serve.application(cluster(), mock(), py_modules=[PKG]) == MOCK_APP


def test_the_mock_engine_takes_the_args_it_is_given():
    from airfleet_mock_engine.serve import DEPLOYMENT_NAME, config_kwargs

    assert DEPLOYMENT_NAME == serve.MOCK_DEPLOYMENT
    assert config_kwargs(MOCK_APP["args"]) == {
        "model": "Qwen/Qwen2.5-0.5B-Instruct", "served_model_names": ("chat",),
        "max_model_len": 2048, "token_latency_ms": 20.0}
    with pytest.raises(ValueError, match="args.no_such_flag: unknown"):
        config_kwargs(serve.application(cluster(), endpoint(
            engine_args={"no-such-flag": 1}))["args"])


def test_the_cache_is_its_mount_path_inside_ray_containers_and_none_without_one():
    app = serve.application(cluster("docker"), endpoint(model={"name": "m", "cache": "big"}))
    assert app["runtime_env"]["env_vars"]["HF_HOME"] == "/mnt/big"
    app = serve.application(cluster(), endpoint(model={"name": "m"}))
    assert "HF_HOME" not in app["runtime_env"]["env_vars"]  # the nodes' own HF_HOME applies
    assert "py_modules" not in app["runtime_env"]


def test_vllm_is_ray_serve_llms_openai_app_with_gpus_as_tensor_parallelism():
    e = endpoint(engine="vllm", replicas=3, resources={"gpu": 2, "cpu": "8"},
                 model={"name": "Qwen/Qwen2.5-7B-Instruct", "revision": "a1b2",
                        "served_name": "qwen", "cache": "hf"}, max_model_len=8192,
                 engine_args={"gpu-memory-utilization": 0.9, "enforce-eager": True,
                              "disable-log-requests": False})
    app = serve.application(cluster(), e)
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    assert app["route_prefix"] == "/chat/v1" and "deployments" not in app
    assert app["args"] == {"llm_configs": [{
        "model_loading_config": {"model_id": "qwen", "model_source": "Qwen/Qwen2.5-7B-Instruct"},
        "engine_kwargs": {"tensor_parallel_size": 2, "revision": "a1b2", "max_model_len": 8192,
                          "download_dir": "/data/models", "gpu_memory_utilization": 0.9,
                          "enforce_eager": True},
        "deployment_config": {"num_replicas": 3, "ray_actor_options": {"num_cpus": 8.0}}}]}


def test_sglang_is_refused_naming_the_engine():
    with pytest.raises(NotSupported, match="engine sglang cannot run on static nodes"):
        serve.application(cluster(), endpoint(engine="sglang", resources={"gpu": 1}))
    # ... and in validate already, naming the field, before anything changes.
    from airfleet.backends.ssh.backend import SSHBackend
    from airfleet.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="^endpoint.spec.engine: engine sglang cannot"):
        SSHBackend().validate_endpoint(cluster(), endpoint(engine="sglang",
                                                            resources={"gpu": 1}).spec)
    SSHBackend().validate_endpoint(cluster(), endpoint(engine="mock").spec)


@pytest.mark.parametrize("text, value", [("500m", 0.5), ("4", 4.0), ("1.5", 1.5),
                                         ("2Gi", 2 * 2**30), ("1G", 1e9)])
def test_quantity(text, value):
    assert serve.quantity(text) == value


# ---- the whole config ---------------------------------------------------------------------

FOREIGN = {"name": "someone-else", "route_prefix": "/else", "import_path": "app:main",
           "runtime_env": {"env_vars": {"MODE": "x"}}}


def running_serve(*apps: tuple[dict[str, Any], str]) -> dict[str, Any]:
    """A GET /api/serve/applications/ answer of a running Serve with these (config, status)."""
    return {"proxy_location": "EveryNode",
            "http_options": {"host": "0.0.0.0", "port": 8000, "root_path": "",
                             "request_timeout_s": None, "keep_alive_timeout_s": 90},
            "grpc_options": {"port": 9000, "grpc_servicer_functions": []},
            "proxies": {"n1": {"node_ip": HEAD, "status": "HEALTHY"}},
            "target_capacity": None,
            "applications": {c["name"]: {"name": c["name"], "status": status, "message": "",
                                         "deployed_app_config": c, "deployments": {}}
                             for c, status in apps}}


NO_SERVE = {"controller_info": {}, "proxies": {}, "applications": {}, "target_capacity": None}


def test_a_first_deploy_starts_serve_on_every_interface_port_8000():
    body = serve.deploy_config(NO_SERVE, put=[MOCK_APP])
    assert body == {"proxy_location": "EveryNode",
                    "http_options": {"host": "0.0.0.0", "port": 8000},
                    "applications": [MOCK_APP]}


def test_other_applications_are_kept_as_serve_recorded_them_and_ours_replaced_in_place():
    old = {**MOCK_APP, "deployments": [{**MOCK_APP["deployments"][0], "num_replicas": 1}]}
    other_version = {**MOCK_APP, "name": "chat-v2", "route_prefix": "/chat/v2"}
    dying = {**FOREIGN, "name": "dying", "route_prefix": "/dying"}
    current = running_serve((FOREIGN, "RUNNING"), (old, "RUNNING"),
                            (other_version, "DEPLOY_FAILED"), (dying, "DELETING"))
    body = serve.deploy_config(current, put=[MOCK_APP])
    assert body["applications"] == [FOREIGN, MOCK_APP, other_version]  # dying stays deleted
    assert body["http_options"] == current["http_options"]  # a running Serve keeps its own
    assert body["grpc_options"] == current["grpc_options"]
    assert serve.deploy_config(current, remove=["chat-v1"])["applications"] == \
        [FOREIGN, other_version]
    assert serve.deploy_config(current, remove=["chat-v1", "chat-v2", "someone-else"])[
        "applications"] == []


def test_the_config_is_what_rays_serve_deploy_schema_accepts():
    schema = pytest.importorskip("ray.serve.schema")
    current = running_serve((FOREIGN, "RUNNING"))
    for body in (serve.deploy_config(NO_SERVE, put=[MOCK_APP]),
                 serve.deploy_config(current, put=[MOCK_APP]),
                 serve.deploy_config(current, put=[serve.application(
                     cluster(), endpoint(engine="vllm", resources={"gpu": 1}))]),
                 serve.deploy_config(current, remove=["someone-else"])):
        parsed = schema.ServeDeploySchema.model_validate(body)
        assert [a.name for a in parsed.applications] == [a["name"] for a in body["applications"]]


def test_an_imperative_application_or_a_loopback_proxy_is_refused():
    current = running_serve((FOREIGN, "RUNNING"))
    current["applications"]["someone-else"]["deployed_app_config"] = None
    with pytest.raises(serve.ServeConflict, match="someone-else was deployed with Serve's "
                       "imperative API"):
        serve.deploy_config(current, put=[MOCK_APP])
    current = running_serve()
    current["http_options"]["host"] = "127.0.0.1"
    with pytest.raises(serve.ServeConflict, match="HTTP proxy on 127.0.0.1"):
        serve.deploy_config(current, put=[MOCK_APP])


def test_an_application_of_our_name_that_is_not_ours_is_left_alone():
    e = mock()
    serve.refuse_foreign(None, "llm-a", e)
    serve.refuse_foreign({"deployed_app_config": MOCK_APP}, "llm-a", e)
    for foreign in ({**FOREIGN, "name": "chat-v1"}, MOCK_APP):
        with pytest.raises(serve.ServeConflict, match="exists and is not endpoint chat's"):
            serve.refuse_foreign({"deployed_app_config": foreign},
                                 "llm-b" if foreign is MOCK_APP else "llm-a", e)


# ---- the mock engine's package ------------------------------------------------------------

def test_the_package_is_named_as_rays_sdks_name_it():
    packaging = pytest.importorskip("ray._private.runtime_env.packaging")
    root = Path(airfleet_mock_engine.__file__).parent
    package = serve.mock_engine_package()
    assert package.uri == packaging.get_uri_for_directory(
        str(root), include_gitignore=False, excludes=["__pycache__", "*.pyc"])
    assert package.http_path == "/api/packages/gcs/" + package.uri.removeprefix("gcs://")
    names = zipfile.ZipFile(io.BytesIO(package.data)).namelist()
    assert "airfleet_mock_engine/serve.py" in names  # under its own name: py_modules
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert serve.mock_engine_package() == package  # same sources, same bytes


def test_a_changed_source_is_a_new_package(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("A = 1\n")
    first = serve.directory_package(tmp_path / "pkg")
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert serve.directory_package(tmp_path / "pkg") == first
    (tmp_path / "pkg" / "a.py").write_text("A = 2\n")
    assert serve.directory_package(tmp_path / "pkg").uri != first.uri


# ---- readiness ----------------------------------------------------------------------------

def replica(state: str = "RUNNING", node: str = HEAD) -> dict[str, Any]:
    return {"replica_id": f"r{id(object())}", "state": state, "node_ip": node}


def status(app_status: str = "RUNNING", replicas: list[dict] | None = None, target: int = 2,
           deployment: str = "HEALTHY", message: str = "", config=MOCK_APP) -> dict[str, Any]:
    current = running_serve((config, app_status))
    app = current["applications"][config["name"]]
    app["message"] = message
    app["deployments"] = {"MockEngine": {
        "name": "MockEngine", "status": deployment, "message": "",
        "target_num_replicas": target,
        "replicas": [replica(), replica()] if replicas is None else replicas}}
    return current


def look(current: dict[str, Any], e: EndpointVersion | None = None):
    return serve.observe(current, cluster(), e or mock(), MOCK_APP)


def test_ready_when_every_replica_runs_and_the_heads_proxy_is_healthy():
    seen = look(status())
    assert seen.healthy and not seen.failed
    assert (seen.ready_replicas, seen.replicas, seen.url) == (2, 2, URL)
    assert seen.message == f"2/2 replicas ready; model chat at {URL}"


def test_not_ready_while_replicas_start_stop_or_the_proxy_starts():
    seen = look(status("DEPLOYING", [replica(), replica("STARTING")], deployment="UPDATING"))
    assert not seen.healthy and not seen.failed and seen.ready_replicas == 1
    assert seen.message == ("Serve application chat-v1: application DEPLOYING; deployment "
                            "MockEngine UPDATING, 1/2 replicas RUNNING")
    seen = look(status(replicas=[replica(), replica(), replica("STOPPING")]))
    assert not seen.healthy and "2/2 replicas RUNNING (3 live)" in seen.message
    current = status()
    current["proxies"]["n1"]["status"] = "STARTING"
    assert look(current).message == "Serve application chat-v1: the head's HTTP proxy is STARTING"
    current["proxies"] = {}
    assert "the head's HTTP proxy is not started" in look(current).message


def test_an_older_spec_or_a_missing_application_is_not_ready():
    older = {**MOCK_APP, "deployments": [{**MOCK_APP["deployments"][0], "num_replicas": 1}]}
    seen = look(status(config=older, target=1, replicas=[replica()]))
    assert not seen.healthy and not seen.failed
    assert seen.message == ("Serve application chat-v1 is RUNNING on an older spec; the latest "
                            "is not deployed yet")
    seen = look(running_serve())
    assert (seen.healthy, seen.failed, seen.message, seen.url) == (
        False, False, "Serve application chat-v1 is not deployed", URL)
    seen = look(running_serve((MOCK_APP, "DELETING")))
    assert seen.message == "Serve application chat-v1 is not deployed"


TRACEBACK = ("Deploying app 'chat-v1' failed with exception:\nTraceback (most recent call "
             "last):\n  File \"/x/serve.py\", line 110, in app_builder\n    return x\n"
             "\x1b[36mray::build_serve_application()\x1b[39m (pid=1)\n"
             "ValueError: args.nope: unknown; the mock engine takes model\n")


def test_deploy_failed_and_unhealthy_fail_with_serves_message_in_short():
    seen = look(status("DEPLOY_FAILED", replicas=[], message=TRACEBACK))
    assert seen.failed and not seen.healthy
    assert seen.message == ("Serve application chat-v1 DEPLOY_FAILED: Deploying app 'chat-v1' "
                            "failed with exception: ValueError: args.nope: unknown; the mock "
                            "engine takes model")
    current = status("UNHEALTHY", deployment="UNHEALTHY", message="The deployment failed.")
    current["applications"]["chat-v1"]["deployments"]["MockEngine"]["message"] = \
        "replica r1 failed its health check"
    seen = look(current)
    assert seen.failed and seen.message == (
        "Serve application chat-v1 UNHEALTHY: The deployment failed.; deployment MockEngine "
        "UNHEALTHY: replica r1 failed its health check")


def test_an_application_that_is_not_ours_fails_and_a_split_weight_is_said_not_applied():
    foreign = copy.deepcopy(MOCK_APP)
    del foreign["runtime_env"]["env_vars"]["AIRFLEET_ENDPOINT"]
    seen = look(status(config=foreign))
    assert seen.failed and seen.message == "Serve application chat-v1 is not endpoint chat's"
    canary = mock().model_copy(update={"spec": mock().spec.model_copy(
        update={"traffic_weight": 10})})
    seen = look(status(), canary)
    assert seen.healthy and seen.message.endswith(
        "; traffic_weight 10 not applied: on static nodes each version has its own URL")


def test_the_url_follows_the_port_serve_runs_on():
    current = status()
    current["http_options"]["port"] = 8123
    assert look(current).url == f"http://{HEAD}:8123/chat/v1/v1"
