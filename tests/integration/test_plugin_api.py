"""The plugin API inside Airflow's real api-server app (``create_app``: Airflow's auth manager,
its token endpoint, our plugin loaded from plugins/), over HTTP in-process with Starlette's
TestClient. The end-to-end suite repeats the auth checks against a running api-server."""

from __future__ import annotations

import json

import pytest

from airfleet import crypto
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
             ("get", f"{API}/clusters/llm-a/events"), ("get", f"{API}/policies/bindings"),
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
    assert {f"{API}/clusters", f"{API}/clusters/{{name}}", f"{API}/credentials"} <= {
        f"/airfleet{p}" for p in spec["paths"]}
    page = api.get("/airfleet/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
