"""Airfleet's REST API and fleet view, mounted under ``/airfleet`` on Airflow's api-server.

Behind Airflow's own authentication: the token ``POST /auth/token`` gives (``Authorization:
Bearer``), or the UI's session cookie. Rights come from Airflow's auth manager, so Airflow's
roles decide:

- read (clusters, endpoints, history, bindings, the audit trail, the public key): whoever may
  read DAGs;
- upload a sealed credential: whoever may trigger DAG runs (it is what a flow's conf needs);
- change policy bindings: whoever may edit Airflow's configuration (Op and Admin in the simple
  auth manager).

No token -> 401, a token without the right -> 403. A secret never leaves: specs show credential
references only, and the vault answers with ids. Bad input gets a 4xx JSON error naming it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Literal

import fastapi_offline
from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import (
    ConfigurationDetails,
    DagAccessEntity,
)
from airflow.api_fastapi.core_api.security import get_user
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from airfleet import fleet
from airfleet.errors import AirfleetError, InvalidRequest, NotFound, VaultError

MAX_BODY_BYTES = 1 << 20  # a sealed kubeconfig is a few KiB; refuse what cannot be one
STATIC = Path(__file__).parent / "static"
# Swagger UI's own files, served from here: FastAPI's default docs page loads them from a CDN,
# which leaves it blank wherever the browser has no internet.
SWAGGER_ASSETS = Path(fastapi_offline.__file__).parent / "static"
DOCS = "/api/v1/docs"

app = FastAPI(
    title="Airfleet API", version="1", docs_url=None, redoc_url=None,
    openapi_url="/api/v1/openapi.json",
    description="The fleet of inference clusters Airfleet manages: inventory, the endpoints "
                "they serve, history, governance bindings and sealed credentials. Authenticate "
                "as for Airflow's REST API (`POST /auth/token`, then `Authorization: Bearer "
                "<token>`).")


# ---- authentication and rights (Airflow's auth manager decides) ---------------------------

def _may(method: str, what: Literal["dags", "runs", "configuration"]):
    async def check(user: Annotated[BaseUser, Depends(get_user)]):
        manager = get_auth_manager()
        if what == "configuration":
            allowed = manager.is_authorized_configuration(
                method=method, user=user, details=ConfigurationDetails(section="airfleet"))
        else:
            allowed = manager.is_authorized_dag(
                method=method, user=user,
                access_entity=DagAccessEntity.RUN if what == "runs" else None)
        if not allowed:
            raise HTTPException(403, f"user {user.get_name()} may not {method} Airfleet {what}")
        return user

    return check


Reader = Depends(_may("GET", "dags"))
Runner = Depends(_may("POST", "runs"))
Admin = Depends(_may("PUT", "configuration"))


# ---- errors: 4xx JSON naming the problem ----------------------------------------------------

@app.exception_handler(AirfleetError)
async def _airfleet_error(_request: Request, exc: AirfleetError) -> JSONResponse:
    status = 404 if isinstance(exc, NotFound) else 400
    return JSONResponse({"detail": str(exc)}, status_code=status)


@app.middleware("http")
async def _limit_body(request: Request, call_next):
    length = request.headers.get("content-length")
    if length and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"},
                            status_code=413)
    return await call_next(request)


@functools.cache
def _store():
    from airfleet.store import Store

    return Store()


def _record(name: str):
    """The live cluster of that name, else one deleted by force that left things behind."""
    store = _store()
    record = store.get_cluster(name) or next(
        (r for r in fleet.visible(store.list_clusters(include_deleted=True)) if r.name == name),
        None)
    if record is None:
        raise NotFound(f"cluster {name!r} is not registered (GET /airfleet/api/v1/clusters "
                       "lists the fleet)")
    return record


# ---- clusters -----------------------------------------------------------------------------

@app.get("/api/v1/clusters", dependencies=[Reader], summary="The fleet, filtered")
def list_clusters(phase: str | None = None, type: str | None = None,  # noqa: A002
                  provider: str | None = None, name: str | None = None,
                  label: Annotated[list[str] | None, Query(
                      description="KEY=VALUE; repeat for several")] = None) -> dict[str, Any]:
    filters = fleet.parse_filters(phase=phase, type=type, provider=provider, label=label,
                                  name=name)
    store = _store()
    leases = {lease.name: lease for lease in store.leases()}
    served = fleet.endpoint_counts(store.list_endpoints())
    rows = [fleet.summary(r, leases.get(r.name), served.get(r.name, 0))
            for r in fleet.visible(store.list_clusters(include_deleted=True))
            if fleet.matches(r, filters)]
    return {"clusters": rows, "total": len(rows)}


@app.get("/api/v1/clusters/{name}", dependencies=[Reader],
         summary="A cluster: spec, status, nodes, accelerators, conditions, endpoints")
def get_cluster(name: str) -> dict[str, Any]:
    record, store = _record(name), _store()
    return fleet.detail(record, store.get_lease(name), store.list_endpoints(cluster=name))


@app.get("/api/v1/clusters/{name}/events", dependencies=[Reader],
         summary="A cluster's history, oldest first")
def cluster_events(name: str, limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
                   ) -> dict[str, Any]:
    _record(name)
    events = _store().events(name)[-limit:]
    return {"events": [fleet.event(e) for e in events], "total": len(events)}


# ---- endpoints ------------------------------------------------------------------------------

def _endpoint_versions(name: str):
    """The live versions of endpoint ``name``, oldest first; none: 404 naming it."""
    versions = _store().endpoint_versions(name)
    if not versions:
        raise NotFound(f"endpoint {name!r} is not deployed (GET /airfleet/api/v1/endpoints "
                       "lists the endpoints)")
    return versions


@app.get("/api/v1/endpoints", dependencies=[Reader],
         summary="The endpoints the fleet serves, filtered")
def list_endpoints(cluster: str | None = None, phase: str | None = None,
                   name: str | None = None) -> dict[str, Any]:
    """``cluster``: exactly; ``name``: a substring; ``phase``: any one of its versions."""
    filters = fleet.parse_endpoint_filters(cluster=cluster, phase=phase, name=name)
    rows = fleet.endpoint_items(_store().list_endpoints(), filters)
    return {"endpoints": rows, "total": len(rows)}


@app.get("/api/v1/endpoints/{name}", dependencies=[Reader],
         summary="An endpoint: every version's spec, status and traffic weight")
def get_endpoint(name: str) -> dict[str, Any]:
    return fleet.endpoint_detail(_endpoint_versions(name))


@app.get("/api/v1/endpoints/{name}/events", dependencies=[Reader],
         summary="An endpoint's history (every version), oldest first")
def endpoint_events(name: str, limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
                    ) -> dict[str, Any]:
    events = _store().endpoint_events(name)
    if not events:  # a deleted endpoint keeps its history; one never deployed has none
        _endpoint_versions(name)
    events = events[-limit:]
    return {"events": [fleet.event(e) for e in events], "total": len(events)}


# ---- governance -----------------------------------------------------------------------------

class BindingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str = Field(description="a module name in the policies folder")
    version: str | None = Field(None, description="pin a source version (12 hex)")
    mode: Literal["subprocess", "local", "http", "gx"] = Field(
        "subprocess", description="gx: a Great Expectations suite judging check_stability, "
        "given as params.suite")
    timeout_seconds: float = 10.0
    memory_mb: int = 512
    url: str | None = None
    fail_open: bool = False
    params: dict[str, Any] = Field(default_factory=dict)


class BindingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cluster: str | None = Field(None, description="bind for this cluster only; none: global")
    bindings: dict[str, list[BindingIn]] = Field(
        description="action -> its policies, in order (an empty list unbinds the action); "
                    "actions not given keep theirs")


@app.get("/api/v1/policies/bindings", dependencies=[Reader], summary="Policy bindings")
def get_bindings(cluster: str | None = None) -> dict[str, Any]:
    bound = _store().bindings(cluster, every_scope=cluster is None)
    return {"bindings": [b.to_dict() for b in bound]}


@app.put("/api/v1/policies/bindings", summary="Set policy bindings (admins)")
def put_bindings(body: BindingsIn, user: Annotated[BaseUser, Admin]) -> dict[str, Any]:
    from airfleet import policy

    store = _store()
    if body.cluster is not None:
        _record(body.cluster)
    changes = {action: [policy.check_binding(policy.Binding(
        action=action, cluster=body.cluster, **b.model_dump())) for b in bound]
        for action, bound in body.bindings.items()}
    unknown = sorted(set(changes) - set(policy.ACTIONS))
    if unknown:
        raise InvalidRequest(f"bindings: unknown action {unknown[0]!r}; actions are "
                             f"{', '.join(policy.ACTIONS)}")
    store.set_bindings(changes, cluster=body.cluster, actor=f"api:{user.get_name()}")
    return get_bindings(body.cluster)


@app.get("/api/v1/policies/audit", dependencies=[Reader], summary="Governance audit trail")
def policy_audit(cluster: str | None = None,
                 limit: Annotated[int, Query(ge=1, le=10000)] = 100) -> dict[str, Any]:
    return {"audit": _store().policy_audit(cluster, limit=limit)}


# ---- credentials ----------------------------------------------------------------------------

class SealedIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sealed: str = Field(description="an envelope from `airfleet seal` (afv1.<key id>....)")
    description: str = Field("", max_length=200)


@app.post("/api/v1/credentials", dependencies=[Runner], status_code=201,
          summary="Store a sealed credential; returns its vault id")
def upload_credential(body: SealedIn) -> dict[str, str]:
    from airfleet.vault import Vault

    try:
        vault_id = Vault.default().put_sealed(body.sealed.strip(), body.description)
    except VaultError as exc:
        raise InvalidRequest(f"sealed: {exc}") from None
    return {"vault_id": vault_id, "reference": f'{{"vault_id": "{vault_id}"}}'}


@app.get("/api/v1/keys/public", dependencies=[Reader],
         summary="The vault's public key: seal with it on any machine")
def public_key() -> dict[str, str]:
    from airfleet import config, crypto

    directory = config.keys_dir()
    key = crypto.load_public_key(directory)
    return {"key_id": crypto.key_id(key),
            "public_key_pem": (directory / crypto.PUBLIC_KEY_FILE).read_text()}


# ---- the fleet view (static page; its data comes from the API above) ------------------------

@app.get("/", include_in_schema=False)
def _root() -> RedirectResponse:
    return RedirectResponse("ui/")


@app.get("/ui/", include_in_schema=False)
def fleet_view() -> FileResponse:
    return FileResponse(STATIC / "fleet.html", media_type="text/html")


app.mount(f"{DOCS}/assets", StaticFiles(directory=SWAGGER_ASSETS), name="docs-assets")


@app.get(DOCS, include_in_schema=False)
def api_docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")  # "/airfleet" where Airflow mounts this app
    return get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
        swagger_js_url=f"{root}{DOCS}/assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS}/assets/swagger-ui.css",
        swagger_favicon_url=f"{root}{DOCS}/assets/favicon.png")
