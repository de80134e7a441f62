"""The plugin API inside Airflow's real api-server app (``create_app``: Airflow's auth manager,
its token endpoint, our plugin loaded from plugins/), over HTTP in-process with Starlette's
TestClient. The end-to-end suite repeats the auth checks against a running api-server."""

from __future__ import annotations

import json

import pytest

from airfleet import crypto
from airfleet.endpoints import EndpointPhase, EndpointRequest, EndpointStatus
from airfleet.resources import ClusterRequest, ClusterStatus, Phase
from airfleet.store import Store

pytestmark = pytest.mark.integration

USERS = {"admin": "ADMIN", "op": "OP", "runner": "USER", "viewer": "VIEWER"}
API = "/airfleet/api/v1"
CANARY = "canary-secret-7f3a9c"


def _cluster(name: str, labels: dict | None = None, workers: int = 1) -> ClusterRequest:
    return ClusterRequest.model_validate({
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"type": "ssh", "provider": "static",
                 "config": {"ssh": {"head": "10.0.0.1",
                                    "workers": [f"10.0.0.{i + 2}" for i in range(workers)],
                                    "credential": {"airflow_conn_id": "ssh_fleet"}}}}})


@pytest.fixture(scope="module")
def app_client(airflow_db, tmp_path_factory):
    """Airflow's api-server app, built once for the module (``create_app`` costs ~2 s)."""
    from airflow.api_fastapi.app import create_app, purge_cached_app
    from fastapi.testclient import TestClient

    passwords = tmp_path_factory.mktemp("plugin-api") / "passwords.json"
    passwords.write_text(json.dumps({u: f"{u}-pw" for u in USERS}))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS",
                   ",".join(f"{u}:{r}" for u, r in USERS.items()))
        env.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(passwords))
        purge_cached_app()
        with TestClient(create_app()) as client:
            yield client
        purge_cached_app()


@pytest.fixture
def api(app_client, airfleet_home):
    """The app over a fresh store and vault of this test's own (the plugin reads the store's
    URL from the environment when first asked)."""
    from airfleet_airflow import api as plugin_api

    plugin_api._store.cache_clear()
    store = Store()
    store.migrate()
    crypto.init_keys()
    app_client.store = store
    yield app_client
    plugin_api._store.cache_clear()


def _auth(client, user: str) -> dict[str, str]:
    r = client.post("/auth/token", json={"username": user, "password": f"{user}-pw"})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def _running(store: Store, name: str, **kw) -> None:
    store.register_cluster(_cluster(name, **kw), run_id="airfleet_cluster_create/manual__1",
                           token=None)
    record = store.require_cluster(name)
    store.set_status(name, ClusterStatus(
        phase=Phase.RUNNING, message="all 2 nodes ALIVE",
        accelerators={"count": 2, "models": {"NVIDIA L4": 2}},
        last_run_id="airfleet_cluster_create/manual__1"),
        reason="Created", run_id="airfleet_cluster_create/manual__1",
        expected_version=record.version)


ENDPOINTS = [("get", f"{API}/clusters"), ("get", f"{API}/clusters/llm-a"),
             ("get", f"{API}/clusters/llm-a/events"), ("get", f"{API}/endpoints"),
             ("get", f"{API}/endpoints/chat"), ("get", f"{API}/endpoints/chat/events"),
             ("get", f"{API}/policies/bindings"),
             ("put", f"{API}/policies/bindings"), ("get", f"{API}/policies/audit"),
             ("post", f"{API}/credentials"), ("get", f"{API}/keys/public")]


@pytest.mark.parametrize("method,path", ENDPOINTS)
def test_without_a_token_every_endpoint_answers_401(api, method, path):
    r = getattr(api, method)(path, **({"json": {}} if method != "get" else {}))
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": "Not authenticated"}


def test_a_forged_token_is_refused(api):
    r = api.get(f"{API}/clusters", headers={"Authorization": "Bearer not.a.jwt"})
    assert r.status_code in (401, 403) and "cluster" not in r.text


def test_a_viewer_reads_the_fleet_with_filters(api):
    _running(api.store, "llm-a", labels={"team": "search"}, workers=2)
    _running(api.store, "llm-b", labels={"team": "ads"})
    viewer = _auth(api, "viewer")

    fleet = api.get(f"{API}/clusters", headers=viewer).json()
    assert fleet["total"] == 2
    a = next(c for c in fleet["clusters"] if c["name"] == "llm-a")
    assert a["phase"] == "Running" and a["nodes"] == {"ready": 0, "desired": 3}
    assert a["gpus"] == {"count": 2, "models": {"NVIDIA L4": 2}}
    assert a["last_run"] == {"dag_id": "airfleet_cluster_create", "run_id": "manual__1",
                             "url": "/dags/airfleet_cluster_create/runs/manual__1"}

    def names(**params):
        r = api.get(f"{API}/clusters", headers=viewer, params=params)
        assert r.status_code == 200, r.text
        return [c["name"] for c in r.json()["clusters"]]

    assert names(label="team=ads") == ["llm-b"]
    assert names(phase="Running", type="ssh", provider="static") == ["llm-a", "llm-b"]
    assert names(phase="Failed") == []
    assert names(name="-a") == ["llm-a"]


def test_a_cluster_page_has_spec_status_and_history(api):
    _running(api.store, "llm-a")
    viewer = _auth(api, "viewer")
    detail = api.get(f"{API}/clusters/llm-a", headers=viewer).json()
    assert detail["spec"]["config"]["ssh"]["credential"]["airflow_conn_id"] == "ssh_fleet"
    assert detail["status"]["accelerators"]["count"] == 2
    assert {"nodes", "conditions", "phase"} <= set(detail["status"])
    events = api.get(f"{API}/clusters/llm-a/events", headers=viewer).json()["events"]
    assert [(e["from_phase"], e["to_phase"]) for e in events] == [(None, "Pending"),
                                                                 ("Pending", "Running")]
    assert events[0]["run"]["dag_id"] == "airfleet_cluster_create"


def _deleted(store: Store, name: str, left: list[str]) -> None:
    record = store.require_cluster(name)
    status = record.cluster.status.model_copy(update={
        "phase": Phase.DELETED, "left_behind": left,
        "message": "deleted by force; left behind: " + "; ".join(left) if left else
        "every component removed"})
    store.set_status(name, status, reason="DeletedByForce" if left else "Deleted",
                     run_id="airfleet_cluster_delete/manual__2", expected_version=record.version)


def test_a_cluster_deleted_by_force_stays_in_the_fleet_with_what_it_left(api):
    _running(api.store, "llm-a")
    _running(api.store, "llm-b")
    _deleted(api.store, "llm-a", ["10.0.0.2: container airfleet-ray-worker"])
    _deleted(api.store, "llm-b", [])  # clean: gone from the fleet
    viewer = _auth(api, "viewer")

    fleet = api.get(f"{API}/clusters", headers=viewer).json()
    assert [(c["name"], c["phase"]) for c in fleet["clusters"]] == [("llm-a", "Deleted")]
    assert fleet["clusters"][0]["left_behind"] == ["10.0.0.2: container airfleet-ray-worker"]
    page = api.get(f"{API}/clusters/llm-a", headers=viewer).json()
    assert page["status"]["message"].startswith("deleted by force; left behind: 10.0.0.2")
    assert api.get(f"{API}/clusters/llm-b", headers=viewer).status_code == 404
    # The name used again: the new cluster is what the fleet shows.
    _running(api.store, "llm-a")
    fleet = api.get(f"{API}/clusters", headers=viewer).json()
    assert [(c["name"], c["phase"], c["left_behind"]) for c in fleet["clusters"]] == [
        ("llm-a", "Running", [])]


@pytest.mark.parametrize("params,field", [({"phase": "Sleeping"}, "phase"),
                                          ({"type": "slurm"}, "type"),
                                          ({"provider": "gcp"}, "provider"),
                                          ({"label": "team"}, "label")])
def test_a_malformed_filter_is_400_naming_it(api, params, field):
    r = api.get(f"{API}/clusters", headers=_auth(api, "viewer"), params=params)
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith(f"{field}: ")


def test_an_unknown_cluster_is_404(api):
    viewer = _auth(api, "viewer")
    for path in (f"{API}/clusters/nope", f"{API}/clusters/nope/events"):
        r = api.get(path, headers=viewer)
        assert r.status_code == 404 and "'nope' is not registered" in r.json()["detail"]
    r = api.get(f"{API}/clusters/llm-a/events", headers=viewer, params={"limit": 0})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "limit"]


# ---- endpoints ----------------------------------------------------------------------------

DEPLOY = "airfleet_endpoint_deploy/manual__{}"


def _deploy(store: Store, name: str, version: str, cluster: str, run: str, *,
            model: str = "Qwen/Qwen2.5-0.5B-Instruct", replicas: int = 1, weight: int = 100,
            shift: dict[str, int] | None = None, **status) -> None:
    """What a deploy flow writes, under the cluster's lease: the version's spec, the weights
    it shifts from the others, Deploying, then ``status`` (a phase and what was seen)."""
    lease = store.acquire_lease(cluster, run)
    store.put_endpoint(EndpointRequest.model_validate({
        "metadata": {"name": name, "labels": {"team": "search"}},
        "spec": {"cluster": cluster, "engine": "mock", "replicas": replicas,
                 "model": {"name": model, "served_name": name},
                 "version": version, "traffic_weight": weight}}),
        run_id=run, token=lease.token)
    for other, to in (shift or {}).items():
        store.set_endpoint_spec(name, other, {"traffic_weight": to}, reason="TrafficShifted",
                                message=f"weight -> {to}", run_id=run, token=lease.token)
    store.set_endpoint_status(name, version, EndpointStatus(phase=EndpointPhase.DEPLOYING,
                                                            replicas=replicas),
                              reason="Deploying", run_id=run, token=lease.token)
    if status.get("phase", EndpointPhase.DEPLOYING) is not EndpointPhase.DEPLOYING:
        store.set_endpoint_status(name, version, EndpointStatus(replicas=replicas, **status),
                                  reason="Deployed", run_id=run, token=lease.token)
    assert store.release_lease(cluster, run, lease.token)


@pytest.fixture
def served(api):
    """llm-a serves chat: v1 Running 2/2 at 90 %, a canary v2 (another model) Deploying at
    10 %; llm-b serves embed, Failed; llm-c serves nothing."""
    for name in ("llm-a", "llm-b", "llm-c"):
        _running(api.store, name)
    _deploy(api.store, "chat", "v1", "llm-a", DEPLOY.format(3), replicas=2,
            phase=EndpointPhase.RUNNING, ready_replicas=2, url="http://10.0.0.1:8000/v1",
            message="2 of 2 replicas ready")
    _deploy(api.store, "chat", "v2", "llm-a", DEPLOY.format(4), weight=10, shift={"v1": 90},
            model="Qwen/Qwen2.5-1.5B-Instruct")
    _deploy(api.store, "embed", "v1", "llm-b", DEPLOY.format(5), phase=EndpointPhase.FAILED,
            message="engine exited with 1")
    return api


def _run(n: int) -> dict[str, str]:
    return {"dag_id": "airfleet_endpoint_deploy", "run_id": f"manual__{n}",
            "url": f"/dags/airfleet_endpoint_deploy/runs/manual__{n}"}


CHAT = {
    "name": "chat", "labels": {"team": "search"}, "cluster": "llm-a",
    "model": {"name": "Qwen/Qwen2.5-1.5B-Instruct", "served_name": "chat"}, "engine": "mock",
}


def test_the_endpoint_list_shows_each_versions_phase_replicas_weight_and_run(served):
    r = served.get(f"{API}/endpoints", headers=_auth(served, "viewer"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == 2 and [e["name"] for e in body["endpoints"]] == ["chat", "embed"]
    chat = body["endpoints"][0]
    assert {k: chat[k] for k in CHAT} == CHAT
    fields = ("version", "model", "phase", "ready_replicas", "replicas", "traffic_weight", "url",
              "message", "last_run_id", "last_run")
    assert [{k: v[k] for k in fields} for v in chat["versions"]] == [
        {"version": "v1", "model": "Qwen/Qwen2.5-0.5B-Instruct", "phase": "Running",
         "ready_replicas": 2, "replicas": 2, "traffic_weight": 90,
         "url": "http://10.0.0.1:8000/v1", "message": "2 of 2 replicas ready",
         "last_run_id": DEPLOY.format(3), "last_run": _run(3)},
        {"version": "v2", "model": "Qwen/Qwen2.5-1.5B-Instruct", "phase": "Deploying",
         "ready_replicas": 0, "replicas": 1, "traffic_weight": 10, "url": None, "message": "",
         "last_run_id": DEPLOY.format(4), "last_run": _run(4)}]
    embed = body["endpoints"][1]
    assert (embed["cluster"], [(v["phase"], v["message"]) for v in embed["versions"]]) == \
        ("llm-b", [("Failed", "engine exited with 1")])


def test_the_endpoint_list_filters_by_cluster_phase_and_name(served):
    viewer = _auth(served, "viewer")

    def names(**params):
        r = served.get(f"{API}/endpoints", headers=viewer, params=params)
        assert r.status_code == 200, r.text
        assert r.json()["total"] == len(r.json()["endpoints"])
        return [e["name"] for e in r.json()["endpoints"]]

    assert names(cluster="llm-b") == ["embed"]
    assert names(cluster="llm-c") == [] and names(cluster="nope") == []
    assert names(phase="Failed") == ["embed"]
    assert names(phase="Deploying") == ["chat"]  # any one of its versions
    assert names(phase="Running", cluster="llm-a") == ["chat"]
    assert names(phase="Pending") == []
    assert names(name="emb") == ["embed"] and names(name="") == ["chat", "embed"]


def test_a_malformed_endpoint_filter_is_400_naming_it(served):
    r = served.get(f"{API}/endpoints", headers=_auth(served, "viewer"),
                   params={"phase": "Sleeping"})
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == ("phase: 'Sleeping' is not one of Pending, Deploying, Running, "
                                  "Failed, Deleted")


def test_an_endpoint_page_has_every_versions_spec_status_and_weight(served):
    r = served.get(f"{API}/endpoints/chat", headers=_auth(served, "viewer"))
    assert r.status_code == 200, r.text
    chat = r.json()
    assert {k: chat[k] for k in CHAT} == CHAT
    assert chat["weights"] == {"v1": 90, "v2": 10}
    v1, v2 = chat["versions"]
    assert (v1["version"], v1["spec"]["replicas"], v1["spec"]["traffic_weight"]) == ("v1", 2, 90)
    assert v1["spec"]["model"]["name"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert v1["generation"] == 2  # the canary's weight shift changed its spec
    assert v1["status"]["phase"] == "Running" and v1["status"]["ready_replicas"] == 2
    assert v1["status"]["url"] == "http://10.0.0.1:8000/v1"
    assert (v2["spec"]["model"]["name"], v2["status"]["phase"], v2["generation"]) == (
        "Qwen/Qwen2.5-1.5B-Instruct", "Deploying", 1)


def test_an_endpoints_history_names_each_version_and_its_run(served):
    r = served.get(f"{API}/endpoints/chat/events", headers=_auth(served, "viewer"))
    assert r.status_code == 200, r.text
    events = r.json()["events"]
    assert r.json()["total"] == len(events)
    assert [(e["version"], e["reason"], e["from_phase"], e["to_phase"]) for e in events] == [
        ("v1", "Registered", None, "Pending"), ("v1", "Deploying", "Pending", "Deploying"),
        ("v1", "Deployed", "Deploying", "Running"), ("v2", "Registered", None, "Pending"),
        ("v1", "TrafficShifted", None, None), ("v2", "Deploying", "Pending", "Deploying")]
    assert [e["run"] for e in events[-3:]] == [_run(4)] * 3
    assert all(e["cluster"] == "llm-a" for e in events)
    last = served.get(f"{API}/endpoints/chat/events", headers=_auth(served, "viewer"),
                      params={"limit": 1}).json()["events"]
    assert [e["reason"] for e in last] == ["Deploying"]


def test_a_deleted_endpoint_leaves_the_list_and_keeps_its_history(served):
    served.store.set_endpoint_status("embed", "v1", EndpointStatus(phase=EndpointPhase.DELETED),
                                     reason="Deleted", run_id="airfleet_endpoint_delete/m__6")
    viewer = _auth(served, "viewer")
    assert [e["name"] for e in served.get(f"{API}/endpoints", headers=viewer).json()[
        "endpoints"]] == ["chat"]
    r = served.get(f"{API}/endpoints/embed", headers=viewer)
    assert r.status_code == 404 and r.json()["detail"].startswith("endpoint 'embed' is not")
    events = served.get(f"{API}/endpoints/embed/events", headers=viewer).json()["events"]
    assert (events[-1]["to_phase"], events[-1]["run"]["dag_id"]) == (
        "Deleted", "airfleet_endpoint_delete")
    assert served.get(f"{API}/clusters/llm-b", headers=viewer).json()["endpoints"] == []


def test_an_unknown_endpoint_is_404_naming_it(served):
    viewer = _auth(served, "viewer")
    for path in (f"{API}/endpoints/nope", f"{API}/endpoints/nope/events"):
        r = served.get(path, headers=viewer)
        assert r.status_code == 404, r.text
        assert r.json()["detail"] == ("endpoint 'nope' is not deployed (GET "
                                      "/airfleet/api/v1/endpoints lists the endpoints)")


def test_a_cluster_shows_the_endpoints_it_serves(served):
    viewer = _auth(served, "viewer")
    listed = served.get(f"{API}/endpoints", headers=viewer).json()["endpoints"]
    fleet = served.get(f"{API}/clusters", headers=viewer).json()["clusters"]
    # chat has two versions: one endpoint.
    assert {c["name"]: c["endpoint_count"] for c in fleet} == {"llm-a": 1, "llm-b": 1,
                                                                "llm-c": 0}
    a = served.get(f"{API}/clusters/llm-a", headers=viewer).json()
    assert a["endpoint_count"] == 1 and a["endpoints"] == [listed[0]]
    assert a["endpoints"][0]["versions"][1]["last_run"] == _run(4)
    assert [e["name"] for e in served.get(f"{API}/clusters/llm-b",
                                          headers=viewer).json()["endpoints"]] == ["embed"]
    c = served.get(f"{API}/clusters/llm-c", headers=viewer).json()
    assert (c["endpoint_count"], c["endpoints"]) == (0, [])


def test_bindings_are_read_by_viewers_and_written_by_admins_only(api):
    _running(api.store, "llm-a")
    body = {"bindings": {"add_node": [{"policy": "max_nodes", "params": {"max_nodes": 8}}]}}
    for user in ("viewer", "runner"):
        r = api.put(f"{API}/policies/bindings", headers=_auth(api, user), json=body)
        assert r.status_code == 403, r.text
    assert api.store.bindings() == []

    r = api.put(f"{API}/policies/bindings", headers=_auth(api, "admin"), json=body)
    assert r.status_code == 200, r.text
    assert [(b["action"], b["policy"], b["params"]) for b in r.json()["bindings"]] == [
        ("add_node", "max_nodes", {"max_nodes": 8})]
    r = api.put(f"{API}/policies/bindings", headers=_auth(api, "op"),
                json={"cluster": "llm-a", "bindings": {"remove_node": [
                    {"policy": "min_workers", "params": {"min_workers": 1}}]}})
    assert r.status_code == 200, r.text

    seen = api.get(f"{API}/policies/bindings", headers=_auth(api, "viewer")).json()["bindings"]
    assert {(b["cluster"], b["action"]) for b in seen} == {(None, "add_node"),
                                                         ("llm-a", "remove_node")}
    audit = api.get(f"{API}/policies/audit", headers=_auth(api, "viewer")).json()["audit"]
    assert {(a["kind"], a["actor"]) for a in audit} == {("bind", "api:admin"), ("bind", "api:op")}


@pytest.mark.parametrize("body,fragment", [
    ({"bindings": {"add_node": [{"policy": "no_such_policy"}]}}, "no policy 'no_such_policy'"),
    ({"bindings": {"fly": [{"policy": "max_nodes"}]}}, "unknown action 'fly'"),
    ({"cluster": "nope", "bindings": {}}, "'nope' is not registered"),
    ({"bindings": {"add_node": [{"policy": "max_nodes", "mode": "http"}]}}, "mode http needs"),
    ({"bindings": {"check_stability": [{"policy": "gx_nodes", "mode": "gx", "params": {
        "suite": {"name": "nodes", "expectations": [{"type": "expect_column_max_to_be_between",
                                                     "kwargs": {"column": "gpus"}}]}}}]}},
     "names column 'gpus', which the node table lacks"),
    ({"bindings": {"add_node": [{"policy": "gx_nodes", "mode": "gx", "params": {
        "suite": {"name": "nodes", "expectations": []}}}]}}, "judges check_stability only"),
])
def test_a_bad_binding_is_4xx_naming_it_and_binds_nothing(api, body, fragment):
    r = api.put(f"{API}/policies/bindings", headers=_auth(api, "admin"), json=body)
    assert r.status_code in (400, 404), r.text
    assert fragment in r.json()["detail"]
    assert api.store.bindings(every_scope=True) == []


def test_a_sealed_credential_upload_returns_a_vault_id_and_never_the_secret(api):
    sealed = crypto.seal(crypto.load_public_key(), CANARY.encode())
    for user in ("viewer",):
        r = api.post(f"{API}/credentials", headers=_auth(api, user), json={"sealed": sealed})
        assert r.status_code == 403
    r = api.post(f"{API}/credentials", headers=_auth(api, "runner"),
                 json={"sealed": sealed, "description": "kubeconfig of llm-a"})
    assert r.status_code == 201, r.text
    vault_id = r.json()["vault_id"]
    assert vault_id.startswith("vlt_") and CANARY not in r.text
    # the same envelope again lands under the same id: no duplicate
    again = api.post(f"{API}/credentials", headers=_auth(api, "runner"), json={"sealed": sealed})
    assert again.json()["vault_id"] == vault_id
    assert api.store.secret_ids() == [vault_id]
    assert CANARY not in api.store.get_secret(vault_id).envelope

    key = api.get(f"{API}/keys/public", headers=_auth(api, "viewer")).json()
    assert key["public_key_pem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert key["key_id"] == crypto.envelope_key_id(sealed)


@pytest.mark.parametrize("body,status,fragment", [
    ({"sealed": "not an envelope"}, 400, "sealed: "),
    ({"sealed": "afv1.deadbeef.AAAA.BBBB.CCCC"}, 400, "sealed: "),
    ({"envelope": "x"}, 422, "sealed"),
])
def test_a_bad_upload_is_4xx_and_stores_nothing(api, body, status, fragment):
    r = api.post(f"{API}/credentials", headers=_auth(api, "runner"), json=body)
    assert r.status_code == status, r.text
    assert fragment in json.dumps(r.json()["detail"])
    assert api.store.secret_ids() == []


def test_an_oversized_upload_is_413(api):
    r = api.post(f"{API}/credentials", headers=_auth(api, "runner"),
                 json={"sealed": "x" * (2 << 20)})
    assert r.status_code == 413 and "over" in r.json()["detail"]
    assert api.store.secret_ids() == []


def test_the_api_is_openapi_documented_and_the_view_is_served(api):
    spec = api.get("/airfleet/api/v1/openapi.json").json()
    assert {f"{API}/clusters", f"{API}/clusters/{{name}}", f"{API}/credentials",
            f"{API}/endpoints", f"{API}/endpoints/{{name}}",
            f"{API}/endpoints/{{name}}/events"} <= {f"/airfleet{p}" for p in spec["paths"]}
    page = api.get("/airfleet/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_the_api_docs_page_loads_nothing_from_outside_airflow(api):
    # Swagger UI's script and styles are served by the plugin itself: the page renders where
    # the browser has no internet (FastAPI's default page takes them from a CDN).
    import re

    page = api.get(f"{API}/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", page.text)
    assert refs and "://" not in page.text.replace("http://www.w3.org", "")
    assert {r for r in refs if not r.startswith(f"{API}/")} == set(), refs
    for ref in refs:
        asset = api.get(ref)
        assert asset.status_code == 200 and len(asset.content) > 100, ref
    assert api.get(f"{API}/openapi.json").json()["info"]["title"] == "Airfleet API"
