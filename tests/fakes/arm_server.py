"""A fake Azure Resource Manager (ARM) server for AKS, for tests, speaking the real wire protocol.

No Azure is reachable from these machines. `FakeARMServer` is a Starlette app served by uvicorn
in a background thread on 127.0.0.1 over https (a test CA made by `trustme`: azure-core refuses
to send a bearer token over plain http). The real `azure-mgmt-containerservice` client, sync and
`aio`, talks to it with a real `azure.identity` `ClientSecretCredential` that gets its token from
the fake's own Entra ID (AAD) token endpoint on the same port::

    with FakeARMServer(operation_polls=1) as arm:
        client = arm.client(SUBSCRIPTION)      # or ContainerServiceClient(arm.credential(),
        poller = client.managed_clusters.begin_create_or_update("rg", "c1", {...})
        poller.result().properties.provisioning_state   # "Succeeded"
        # ... base_url=arm.url, connection_verify=arm.ca_file, polling_interval=0)

What it mirrors (AKS api-version 2026-08-01 as the SDK sends it; any well-formed api-version is
accepted, a missing one is refused as ARM does):

- AAD: ``GET /{tenant}/v2.0/.well-known/openid-configuration`` and
  ``POST /{tenant}/oauth2/v2.0/token`` (client credentials; the client id and secret are
  `client_id` / `client_secret`). Tokens are JWT-shaped (unsigned) with ``aud`` from the scope.
  Every ARM request needs ``Authorization: Bearer <token issued here>`` for the ARM audience:
  401 with ``WWW-Authenticate`` and an ARM error body otherwise (``AuthenticationFailed``,
  ``InvalidAuthenticationToken``, ``ExpiredAuthenticationToken``,
  ``InvalidAuthenticationTokenAudience``).
- Resource groups: PUT/GET/HEAD/DELETE (DELETE is an LRO with a ``Location`` header only, as
  ARM's, and takes the group's clusters with it). They exist implicitly when a cluster is put
  into them, unless `require_resource_groups` is set (then 404 ``ResourceGroupNotFound``).
- Managed clusters: PUT (201 create / 200 update), GET, PATCH (tags), DELETE (202, 204 when
  missing), list by resource group and by subscription, ``stop``/``start``, and
  ``listClusterAdminCredential`` / ``listClusterUserCredential`` /
  ``listClusterMonitoringUserCredential``. Agent pools: PUT/GET/DELETE/list under a cluster; the
  cluster's ``agentPoolProfiles`` and its agent pools are one state (profiles put with the
  cluster become pools; pools added later show in the profiles; pools missing from a cluster
  PUT are kept, as AKS does). An update PUT (cluster or pool) keeps the properties it does not
  send; server-set fields (id, name, type, provisioningState, powerState, fqdn,
  nodeResourceGroup, currentKubernetesVersion, ...) are never taken from the body; dnsPrefix,
  location and a pool's vmSize cannot change (400).
- Long-running operations: the accepting response carries ``Azure-AsyncOperation`` (and
  ``Location`` for DELETE/POST) on the fake, and ``Retry-After: 0``. The operation answers
  ``{"status": "InProgress"}`` `operation_polls` times, then ``Succeeded`` (or ``Failed`` /
  ``Canceled`` with ``error: {code, message}``, see `fail_next_operation`). A GET of the target
  resource counts as a poll too, so code that waits on ``provisioningState`` progresses without
  polling the operation URL. While an operation runs, the resource shows
  ``Creating``/``Updating``/``Scaling``/``Deleting``/``Stopping``/``Starting``, and a second
  write to the same cluster (or its pools) is refused with 409 ``OperationNotAllowed``, as AKS
  does; a DELETE of the cluster is always accepted and cancels what runs. ``Retry-After: 0``
  does not make azure-core poll at once (it reads 0 as "no header" and waits
  ``polling_interval``, 30 s by default): build clients with ``polling_interval=0``.
- Errors are ARM bodies ``{"error": {"code", "message"}}`` with ARM's codes: ResourceNotFound,
  ResourceGroupNotFound, InvalidSubscriptionId, MissingApiVersionParameter,
  InvalidApiVersionParameter, InvalidRequestContent, LocationRequired, InvalidParameter,
  PropertyChangeNotAllowed, OperationNotAllowed, InvalidResourceType. AKS validation is a subset
  (names, autoscaler counts, a System pool required), with approximate messages.

Python state methods (`clusters`, `agent_pools`) return copies and bypass auth and faults.
Not covered: paging (lists come in one page), etags / If-Match, PATCH of agent pools, upgrade
profiles, maintenance configurations, managed namespaces, machines, run-command, addons,
identities beyond echoing what was sent, any other resource provider.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import trustme
import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DEFAULT_KUBERNETES_VERSION = "1.33.3"
DEFAULT_VM_SIZE = "Standard_DS2_v2"
NODE_IMAGE_VERSION = "AKSUbuntu-2204gen2containerd-202511.07.0"
ARM_AUDIENCES = ("https://management.azure.com", "https://management.core.windows.net")
PROVIDER = "Microsoft.ContainerService"
CLUSTER_TYPE = "Microsoft.ContainerService/ManagedClusters"
POOL_TYPE = "Microsoft.ContainerService/managedClusters/agentPools"

_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?")
_CLUSTER_NAME = re.compile(r"[a-zA-Z0-9]([-_a-zA-Z0-9]{0,61}[a-zA-Z0-9])?")
_POOL_NAME = re.compile(r"[a-z][a-z0-9]{0,11}")
_SERVER_SET_POOL = ("provisioningState", "powerState", "currentOrchestratorVersion",
                    "nodeImageVersion")
_SERVER_SET_CLUSTER = ("provisioningState", "powerState", "fqdn", "azurePortalFQDN",
                       "nodeResourceGroup", "maxAgentPools", "currentKubernetesVersion",
                       "dnsPrefix")
_METHODS = ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE"]
_FAULT_CODES = {400: "BadRequest", 404: "NotFound", 409: "Conflict", 429: "TooManyRequests",
                500: "InternalServerError", 502: "BadGateway", 503: "ServiceUnavailable",
                504: "GatewayTimeout"}
_QUOTA_MESSAGE = (
    "Operation could not be completed as it results in exceeding approved Total Regional Cores "
    "quota. Additional details - Deployment Model: Resource Manager, Location: westeurope, "
    "Current Limit: 10, Current Usage: 8, Additional Required: 6, (Minimum) New Limit Required: 14.")

# Path patterns (ARM matches paths case-insensitively).
_SUB = r"/subscriptions/(?P<sub>[^/]+)"
_RG = _SUB + r"/resourcegroups/(?P<rg>[^/]+)"
_MCS = _RG + r"/providers/microsoft\.containerservice/managedclusters"
_MC = _MCS + r"/(?P<name>[^/]+)"


class ARMError(Exception):
    """An ARM error answer: HTTP status, ARM error code and message (and extra headers)."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


@dataclass
class _Fault:
    remaining: int
    status: int
    method: str | None
    path: re.Pattern | None


@dataclass
class _OperationFailure:
    status: str
    code: str
    message: str
    match: re.Pattern | None


@dataclass
class _Operation:
    id: str
    subscription: str
    location: str
    target: str  # lower-cased resource id the operation works on
    cluster: str | None  # lower-cased cluster id it locks (None for resource groups)
    polls_left: int
    on_success: Callable[[], None]
    on_failure: Callable[[str], None]
    result: Callable[[], dict | None] = lambda: None  # body of the Location result (None: 204)
    failure: _OperationFailure | None = None
    status: str = "InProgress"
    start_time: str = field(default_factory=lambda: _now())
    end_time: str | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _listen() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _location(value: Any) -> str:
    """ARM normalises locations: "West Europe" -> "westeurope"."""
    return str(value).replace(" ", "").lower()


class FakeARMServer:
    """A fake ARM endpoint (and AAD token endpoint) for AKS over https on 127.0.0.1.

    :param operation_polls: how many polls (of the operation URL, or GETs of the resource) a
        long-running operation answers InProgress before it ends; 0 ends it at the first poll.
    :param tenant_id: the only tenant the fake AAD knows.
    """

    def __init__(self, *, operation_polls: int = 1,
                 tenant_id: str = "00000000-0000-0000-0000-0000000000aa"):
        self.operation_polls = operation_polls
        self._default_polls = operation_polls
        self.tenant_id = tenant_id
        self.client_id = str(uuid.uuid4())
        self.client_secret = f"fake-secret-{uuid.uuid4().hex}"
        self.token_lifetime = 3599  # seconds, as AAD's expires_in
        self.require_resource_groups = False
        self.requests: list[tuple[str, str, int]] = []
        self.url = ""
        self.ca_file = ""
        self._lock = threading.RLock()
        self._groups: dict[tuple[str, str], dict] = {}  # (sub, rg lower) -> resource group
        self._clusters: dict[str, dict] = {}  # lower id -> cluster JSON (no agentPoolProfiles)
        self._pools: dict[str, dict[str, dict]] = {}  # lower cluster id -> lower name -> pool
        self._secrets: dict[str, str] = {}  # lower cluster id -> kubeconfig token
        self._kubeconfigs: dict[str, str] = {}  # cluster name or lower id -> kubeconfig YAML
        self._operations: dict[str, _Operation] = {}
        self._faults: list[_Fault] = []
        self._operation_failures: list[_OperationFailure] = []
        self._tokens: dict[str, tuple[float, str]] = {}  # token -> (expiry, audience)
        self._server: uvicorn.Server | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._tls_dir = Path()
        self._ca: trustme.CA | None = None
        self._routes: list[tuple[re.Pattern, dict[str, Callable]]] = [
            (re.compile(p, re.I), handlers) for p, handlers in [
                (_MC, {"GET": self._get_cluster, "PUT": self._put_cluster,
                       "PATCH": self._patch_cluster, "DELETE": self._delete_cluster}),
                (_MCS, {"GET": self._list_clusters}),
                (_SUB + r"/providers/microsoft\.containerservice/managedclusters",
                 {"GET": self._list_clusters}),
                (_MC + r"/agentpools/(?P<pool>[^/]+)",
                 {"GET": self._get_pool, "PUT": self._put_pool, "DELETE": self._delete_pool}),
                (_MC + r"/agentpools", {"GET": self._list_pools}),
                (_MC + r"/(?P<role>listclusteradmincredential|listclusterusercredential|"
                 r"listclustermonitoringusercredential)", {"POST": self._credentials}),
                (_MC + r"/(?P<action>stop|start)", {"POST": self._power}),
                (_SUB + r"/providers/microsoft\.containerservice/locations/[^/]+/"
                 r"(?P<kind>operations|operationresults)/(?P<op>[^/]+)",
                 {"GET": self._operation}),
                (_SUB + r"/(?P<kind>operationresults)/(?P<op>[^/]+)", {"GET": self._operation}),
                (_RG, {"GET": self._get_group, "HEAD": self._get_group, "PUT": self._put_group,
                       "DELETE": self._delete_group}),
            ]]
        self._app = Starlette(routes=[Route("/{path:path}", self._endpoint, methods=_METHODS)])

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeARMServer:
        """Serve https on a free port of 127.0.0.1 (certificate from a `trustme` CA, whose
        PEM is at `ca_file`), in a background thread."""
        if self._thread:
            return self
        self._tls_dir = Path(tempfile.mkdtemp(prefix="fake-arm-"))
        self._ca = trustme.CA()
        self._ca.cert_pem.write_to_path(str(self._tls_dir / "ca.pem"))
        cert = self._ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(self._tls_dir / "server.pem"))
        self.ca_file = str(self._tls_dir / "ca.pem")
        self._sock = sock = _listen()
        self.url = f"https://127.0.0.1:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(
            self._app, log_config=None, log_level="warning", access_log=False, lifespan="off",
            ws="none", http="h11", timeout_graceful_shutdown=2,
            ssl_certfile=str(self._tls_dir / "server.pem")))
        server = self._server

        async def serve() -> None:
            await server.serve(sockets=[sock])

        self._thread = threading.Thread(target=asyncio.run, args=(serve(),),
                                        name="fake-arm-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the fake ARM server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if not self._thread:
            return
        if self._server:  # a client may leave a connection open (after a failed LRO): no wait
            self._server.should_exit = self._server.force_exit = True
        self._thread.join(10)
        if self._sock:
            self._sock.close()
        shutil.rmtree(self._tls_dir, ignore_errors=True)
        self._thread, self._server, self._sock = None, None, None

    def __enter__(self) -> FakeARMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """No resources, operations, faults, kubeconfig overrides or recorded requests;
        `operation_polls` back to the constructor's value. Issued tokens stay valid."""
        with self._lock:
            for store in (self._groups, self._clusters, self._pools, self._secrets,
                          self._kubeconfigs, self._operations):
                store.clear()
            self._faults.clear()
            self._operation_failures.clear()
            self.requests.clear()
            self.operation_polls = self._default_polls
            self.require_resource_groups = False

    # --- clients ------------------------------------------------------------------------------

    def credential(self, *, aio: bool = False) -> Any:
        """A real `azure.identity` ``ClientSecretCredential`` (``.aio`` one with ``aio=True``)
        whose authority is this server: it discovers the tenant and gets its tokens here."""
        options = {"authority": self.url, "disable_instance_discovery": True,
                   "connection_verify": self.ca_file}
        if aio:
            from azure.identity.aio import ClientSecretCredential as AsyncCredential

            return AsyncCredential(self.tenant_id, self.client_id, self.client_secret, **options)
        from azure.identity import ClientSecretCredential

        return ClientSecretCredential(self.tenant_id, self.client_id, self.client_secret, **options)

    def client(self, subscription_id: str, *, aio: bool = False, **kwargs: Any) -> Any:
        """The real ``ContainerServiceClient`` (``azure.mgmt.containerservice.aio`` with
        ``aio=True``) configured for this server: base_url, a credential of its own (closed with
        the client), the CA, ``polling_interval=0`` and a small retry back-off. ``kwargs``
        override or add client options (``retry_total``, ``api_version``, ...)."""
        options = {"base_url": self.url, "connection_verify": self.ca_file,
                   "polling_interval": 0, "retry_backoff_factor": 0.01, **kwargs}
        return _owning_client(aio)(self.credential(aio=aio), subscription_id, **options)

    def issue_token(self, audience: str = "https://management.azure.com/") -> str:
        """A bearer token valid here, as the token endpoint would issue it (for raw HTTP)."""
        return self._issue_token(audience)["access_token"]

    # --- state (bypassing the API) ------------------------------------------------------------

    def clusters(self) -> dict[str, dict]:
        """Resource id -> managed cluster JSON as a GET would show it (copies)."""
        with self._lock:
            return {c["id"]: self._render_cluster(key) for key, c in self._clusters.items()}

    def agent_pools(self, cluster_id: str) -> dict[str, dict]:
        """Pool name -> agent pool JSON of the cluster with that resource id (copies)."""
        with self._lock:
            pools = self._pools.get(cluster_id.lower(), {})
            return {p["name"]: copy.deepcopy(p) for p in pools.values()}

    def kubeconfig_for(self, cluster: str, kubeconfig: str | dict) -> None:
        """Hand out this kubeconfig (YAML text or dict) for every credential of the cluster
        with that name (in any resource group) or resource id, e.g. one pointing at a fake
        Kubernetes API server."""
        text = kubeconfig if isinstance(kubeconfig, str) else yaml.safe_dump(kubeconfig)
        with self._lock:
            self._kubeconfigs[cluster.lower() if cluster.startswith("/") else cluster] = text

    def fail_next_operation(self, *, status_code: str = "Failed", code: str = "QuotaExceeded",
                            message: str = _QUOTA_MESSAGE, match: str | None = None) -> None:
        """The next long-running operation (optionally only one whose target resource id
        matches the regex ``match``) ends with ``status_code`` ("Failed" or "Canceled") and that
        ARM error; its resource is left with that provisioningState, as Azure does."""
        with self._lock:
            self._operation_failures.append(_OperationFailure(
                status_code, code, message, re.compile(match, re.I) if match else None))

    def fail_next(self, count: int, *, status: int = 500, method: str | None = None,
                  path: str | None = None) -> None:
        """The next ``count`` ARM requests (optionally only with that method / whose path
        matches the regex ``path``) are answered ``status`` with an ARM error body; 429 and
        503 carry ``Retry-After: 0``. Token requests are never faulted."""
        with self._lock:
            self._faults.append(_Fault(count, status, method.upper() if method else None,
                                       re.compile(path, re.I) if path else None))

    # --- HTTP plumbing ------------------------------------------------------------------------

    async def _endpoint(self, request: Request) -> Response:
        path = request.url.path
        target = path + (f"?{request.url.query}" if request.url.query else "")
        body = await request.body()
        with self._lock:
            response = self._dispatch(request, path, body)
            self.requests.append((request.method, target, response.status_code))
        return response

    def _dispatch(self, request: Request, path: str, body: bytes) -> Response:
        aad = re.fullmatch(r"/(?P<tenant>[^/]+)/(?P<rest>v2\.0/\.well-known/openid-configuration"
                           r"|oauth2/v2\.0/token)", path)
        if aad:
            return self._aad(request, aad["tenant"], aad["rest"], body)
        headers = {"x-ms-request-id": str(uuid.uuid4()),
                   "x-ms-correlation-request-id": request.headers.get(
                       "x-ms-correlation-request-id", str(uuid.uuid4()))}
        try:
            self._authenticate(request)
            self._inject_fault(request.method, path)
            for pattern, handlers in self._routes:
                match = pattern.fullmatch(path)
                if not match:
                    continue
                handler = handlers.get(request.method)
                if handler is None:
                    raise ARMError(405, "MethodNotAllowed",
                                   f"The requested method '{request.method}' is not allowed.")
                params = match.groupdict()
                self._check_request(request, params)
                status, payload, extra = handler(request, params, body)
                if request.method == "HEAD" or payload is None:
                    return Response(status_code=status, headers={**headers, **extra})
                return JSONResponse(payload, status_code=status, headers={**headers, **extra})
            raise ARMError(404, "InvalidResourceType",
                           f"The resource type could not be found for path '{path}'.")
        except (TypeError, ValueError, KeyError, AttributeError) as err:  # a body of odd shape
            return JSONResponse({"error": {"code": "InvalidRequestContent", "message":
                                           "The request content was invalid and could not be "
                                           f"deserialized: {err!r}."}},
                                status_code=400, headers=headers)
        except ARMError as err:
            return JSONResponse({"error": {"code": err.code, "message": err.message}},
                                status_code=err.status, headers={**headers, **err.headers})

    def _check_request(self, request: Request, params: dict[str, str]) -> None:
        api_version = request.query_params.get("api-version")
        if not api_version:
            raise ARMError(400, "MissingApiVersionParameter",
                           "The api-version query parameter (?api-version=) is required for "
                           "all requests.")
        if not _API_VERSION.fullmatch(api_version):
            raise ARMError(400, "InvalidApiVersionParameter",
                           f"The api-version '{api_version}' is invalid. The supported "
                           "versions are of the form 'yyyy-mm-dd' or 'yyyy-mm-dd-preview'.")
        if not _GUID.fullmatch(params["sub"]):
            raise ARMError(400, "InvalidSubscriptionId",
                           f"The provided subscription identifier '{params['sub']}' is "
                           "malformed or invalid.")

    def _authenticate(self, request: Request) -> None:
        def refuse(code: str, message: str, description: str) -> ARMError:
            challenge = (f'Bearer authorization_uri="{self.url}/{self.tenant_id}", '
                         f'error="invalid_token", error_description="{description}"')
            return ARMError(401, code, message, {"WWW-Authenticate": challenge})

        header = request.headers.get("authorization", "")
        if not header:
            raise refuse("AuthenticationFailed",
                         "Authentication failed. The 'Authorization' header is missing.",
                         "The authentication failed because of missing 'Authorization' header.")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token not in self._tokens:
            raise refuse("InvalidAuthenticationToken",
                         "The access token is invalid.", "The access token is invalid.")
        expiry, audience = self._tokens[token]
        if time.time() >= expiry:
            raise refuse("ExpiredAuthenticationToken",
                         "The access token expiry UTC time is earlier than current UTC time.",
                         "The access token has expired.")
        if audience.rstrip("/") not in (*ARM_AUDIENCES, self.url):
            raise refuse("InvalidAuthenticationTokenAudience",
                         "The access token has been obtained for wrong audience or resource "
                         f"'{audience}'.", "The access token audience is invalid.")

    def _inject_fault(self, method: str, path: str) -> None:
        for fault in self._faults:
            if fault.remaining <= 0 or (fault.method and fault.method != method):
                continue
            if fault.path and not fault.path.search(path):
                continue
            fault.remaining -= 1
            self._faults = [f for f in self._faults if f.remaining > 0]
            code = _FAULT_CODES.get(fault.status, "InternalServerError")
            headers = {"Retry-After": "0"} if fault.status in (429, 503) else {}
            raise ARMError(fault.status, code,
                           f"Injected fault: {code}. Diagnostic information: timestamp "
                           f"'{_now()}', tracking id '{uuid.uuid4()}'.", headers)

    # --- AAD ----------------------------------------------------------------------------------

    def _aad(self, request: Request, tenant: str, rest: str, body: bytes) -> Response:
        if tenant.lower() != self.tenant_id.lower():
            return JSONResponse({"error": "invalid_tenant", "error_description":
                                 f"AADSTS90002: Tenant '{tenant}' not found."}, status_code=400)
        base = f"{self.url}/{self.tenant_id}"
        if rest.startswith("v2.0") and request.method == "GET":
            return JSONResponse({
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "issuer": f"{base}/v2.0", "jwks_uri": f"{base}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": ["client_secret_post",
                                                          "private_key_jwt"],
                "response_types_supported": ["code", "id_token", "code id_token"],
                "tenant_region_scope": "EU", "cloud_instance_name": "microsoftonline.com"})
        if not rest.startswith("oauth2") or request.method != "POST":
            return JSONResponse({"error": "invalid_request"}, status_code=405)
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}

        def fail(status: int, error: str, description: str) -> Response:
            return JSONResponse({"error": error, "error_description": description},
                                status_code=status)

        if form.get("grant_type") != "client_credentials":
            return fail(400, "unsupported_grant_type",
                        "AADSTS70003: The app requested an unsupported grant type.")
        if form.get("client_id") != self.client_id:
            return fail(400, "unauthorized_client",
                        f"AADSTS700016: Application with identifier '{form.get('client_id')}' "
                        "was not found in the directory.")
        if form.get("client_secret") != self.client_secret:
            return fail(401, "invalid_client",
                        "AADSTS7000215: Invalid client secret provided.")
        scopes = form.get("scope", "").split()
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            return fail(400, "invalid_scope",
                        f"AADSTS1002012: The provided value for scope {form.get('scope')} is "
                        "not valid. Client credential flows must have a scope value with "
                        "/.default suffixed to the resource identifier.")
        with self._lock:
            return JSONResponse(self._issue_token(scopes[0].removesuffix(".default")))

    def _issue_token(self, audience: str) -> dict:
        now = int(time.time())
        claims = {"aud": audience, "iss": f"https://sts.windows.net/{self.tenant_id}/",
                  "iat": now, "nbf": now, "exp": now + self.token_lifetime,
                  "appid": self.client_id, "tid": self.tenant_id, "oid": str(uuid.uuid4()),
                  "jti": uuid.uuid4().hex}
        token = ".".join((_b64url(json.dumps({"typ": "JWT", "alg": "RS256"}).encode()),
                          _b64url(json.dumps(claims).encode()), _b64url(uuid.uuid4().bytes)))
        with self._lock:
            self._tokens[token] = (now + self.token_lifetime, audience)
        return {"token_type": "Bearer", "expires_in": self.token_lifetime,
                "ext_expires_in": self.token_lifetime, "access_token": token}

    # --- long-running operations --------------------------------------------------------------

    def _start_operation(self, request: Request, *, subscription: str, location: str,
                         target_id: str, cluster: str | None,
                         on_success: Callable[[], None], on_failure: Callable[[str], None],
                         result: Callable[[], dict | None] = lambda: None,
                         location_only: bool = False, with_location: bool = False,
                         ) -> dict[str, str]:
        """Register an operation on ``target_id``; returns the headers that announce it."""
        failure = next((f for f in self._operation_failures
                        if not f.match or f.match.search(target_id)), None)
        if failure:
            self._operation_failures.remove(failure)
        op = _Operation(str(uuid.uuid4()), subscription, location, target_id.lower(), cluster,
                        self.operation_polls, on_success, on_failure, result, failure)
        self._operations[op.id] = op
        api_version = request.query_params.get("api-version", "")
        if location_only:
            return {"Location": f"{self.url}/subscriptions/{subscription}/operationresults/"
                                f"{op.id}?api-version={api_version}", "Retry-After": "0"}
        base = (f"{self.url}/subscriptions/{subscription}/providers/{PROVIDER}/locations/"
                f"{location}")
        headers = {"Azure-AsyncOperation": f"{base}/operations/{op.id}?api-version={api_version}",
                   "Retry-After": "0"}
        if with_location:
            headers["Location"] = f"{base}/operationresults/{op.id}?api-version={api_version}"
        return headers

    def _observe(self, op: _Operation) -> None:
        """One poll of an operation: it runs `operation_polls` polls, then ends."""
        if op.status != "InProgress":
            return
        if op.polls_left > 0:
            op.polls_left -= 1
            return
        op.end_time = _now()
        if op.failure:
            op.status = op.failure.status
            op.on_failure(op.failure.status)
        else:
            op.status = "Succeeded"
            op.on_success()

    def _observe_target(self, target: str) -> None:
        for op in list(self._operations.values()):
            if op.target == target.lower() and op.status == "InProgress":
                self._observe(op)

    def _busy(self, cluster_key: str) -> None:
        """409 while an operation runs on the cluster or one of its pools, as AKS answers."""
        for op in self._operations.values():
            if op.cluster == cluster_key and op.status == "InProgress":
                raise ARMError(409, "OperationNotAllowed",
                               "Operation is not allowed because there's an in progress "
                               f"operation on resource '{op.target}'. Please wait for it to "
                               "finish before starting a new operation.")

    def _cancel(self, cluster_key: str) -> None:
        for op in self._operations.values():
            if op.cluster == cluster_key and op.status == "InProgress":
                op.status, op.end_time = "Canceled", _now()
                op.failure = _OperationFailure(
                    "Canceled", "OperationPreempted",
                    "Operation was preempted by a delete of the managed cluster.", None)

    def _operation(self, request: Request, params: dict, body: bytes) -> tuple:
        op = self._operations.get(params["op"])
        if op is None or op.subscription.lower() != params["sub"].lower():
            raise ARMError(404, "NotFound", f"Operation '{params['op']}' was not found.")
        self._observe(op)
        if params["kind"].lower() == "operationresults":  # the Location protocol
            if op.status == "InProgress":
                return 202, None, {"Location": str(request.url), "Retry-After": "0"}
            if op.failure:
                raise ARMError(400, op.failure.code, op.failure.message)
            result = op.result()
            return (204, None, {}) if result is None else (200, result, {})
        status = {"id": f"/subscriptions/{op.subscription}/providers/{PROVIDER}/locations/"
                        f"{op.location}/operations/{op.id}",
                  "name": op.id, "status": op.status, "startTime": op.start_time}
        if op.end_time:
            status["endTime"] = op.end_time
        if op.failure and op.status != "InProgress":
            status["error"] = {"code": op.failure.code, "message": op.failure.message}
        return 200, status, ({"Retry-After": "0"} if op.status == "InProgress" else {})

    # --- resource groups ----------------------------------------------------------------------

    def _group(self, sub: str, rg: str) -> dict | None:
        return self._groups.get((sub.lower(), rg.lower()))

    def _ensure_group(self, sub: str, rg: str, location: str) -> None:
        if self._group(sub, rg):
            return
        if self.require_resource_groups:
            raise ARMError(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
        self._groups[(sub.lower(), rg.lower())] = self._group_json(sub, rg, location, {})

    @staticmethod
    def _group_json(sub: str, rg: str, location: str, tags: dict) -> dict:
        return {"id": f"/subscriptions/{sub}/resourceGroups/{rg}", "name": rg,
                "type": "Microsoft.Resources/resourceGroups", "location": location,
                "tags": tags, "properties": {"provisioningState": "Succeeded"}}

    def _get_group(self, request: Request, params: dict, body: bytes) -> tuple:
        group = self._group(params["sub"], params["rg"])
        if group is None:
            raise ARMError(404, "ResourceGroupNotFound",
                           f"Resource group '{params['rg']}' could not be found.")
        return (204, None, {}) if request.method == "HEAD" else (200, copy.deepcopy(group), {})

    def _put_group(self, request: Request, params: dict, body: bytes) -> tuple:
        spec = _json_body(body)
        if not spec.get("location"):
            raise ARMError(400, "LocationRequired",
                           "The location property is required for this definition.")
        existing = self._group(params["sub"], params["rg"])
        name = existing["name"] if existing else params["rg"]
        group = self._group_json(params["sub"], name, _location(spec["location"]),
                                 spec.get("tags") or {})
        self._groups[(params["sub"].lower(), params["rg"].lower())] = group
        return (200 if existing else 201), copy.deepcopy(group), {}

    def _delete_group(self, request: Request, params: dict, body: bytes) -> tuple:
        group = self._group(params["sub"], params["rg"])
        if group is None:
            raise ARMError(404, "ResourceGroupNotFound",
                           f"Resource group '{params['rg']}' could not be found.")
        key = (params["sub"].lower(), params["rg"].lower())
        prefix = group["id"].lower() + "/"

        def done() -> None:
            self._groups.pop(key, None)
            for member in [k for k in self._clusters if k.startswith(prefix)]:
                self._cancel(member)
                self._drop_cluster(member)

        headers = self._start_operation(
            request, subscription=params["sub"], location=group["location"], target_id=group["id"],
            cluster=None, on_success=done, on_failure=lambda status: None, location_only=True)
        return 202, None, headers

    # --- managed clusters ---------------------------------------------------------------------

    def _cluster_id(self, params: dict) -> str:
        existing = self._clusters.get(self._cluster_key(params))
        if existing:
            return existing["id"]
        group = self._group(params["sub"], params["rg"])
        rg = group["name"] if group else params["rg"]
        return (f"/subscriptions/{params['sub']}/resourcegroups/{rg}/providers/{PROVIDER}/"
                f"managedClusters/{params['name']}")

    @staticmethod
    def _cluster_key(params: dict) -> str:
        return (f"/subscriptions/{params['sub']}/resourcegroups/{params['rg']}/providers/"
                f"{PROVIDER}/managedclusters/{params['name']}").lower()

    def _cluster(self, params: dict) -> dict:
        cluster = self._clusters.get(self._cluster_key(params))
        if cluster is None:
            raise ARMError(404, "ResourceNotFound",
                           f"The Resource '{PROVIDER}/managedClusters/{params['name']}' under "
                           f"resource group '{params['rg']}' was not found. For more details "
                           "please go to https://aka.ms/ARMResourceNotFoundFix")
        return cluster

    def _render_cluster(self, key: str) -> dict:
        cluster = copy.deepcopy(self._clusters[key])
        cluster["properties"]["agentPoolProfiles"] = [
            {"name": pool["name"], **copy.deepcopy(pool["properties"])}
            for pool in self._pools.get(key, {}).values()]
        return cluster

    def _get_cluster(self, request: Request, params: dict, body: bytes) -> tuple:
        key = self._cluster_key(params)
        self._observe_target(key)
        self._cluster(params)
        return 200, self._render_cluster(key), {}

    def _list_clusters(self, request: Request, params: dict, body: bytes) -> tuple:
        prefix = f"/subscriptions/{params['sub']}/".lower()
        if params.get("rg"):
            if self.require_resource_groups and not self._group(params["sub"], params["rg"]):
                raise ARMError(404, "ResourceGroupNotFound",
                               f"Resource group '{params['rg']}' could not be found.")
            prefix += f"resourcegroups/{params['rg']}/".lower()
        return 200, {"value": [self._render_cluster(k) for k in self._clusters
                               if k.startswith(prefix)]}, {}

    def _put_cluster(self, request: Request, params: dict, body: bytes) -> tuple:
        spec = _json_body(body)
        key = self._cluster_key(params)
        existing = self._clusters.get(key)
        if not _CLUSTER_NAME.fullmatch(params["name"]):
            raise ARMError(400, "InvalidParameter",
                           f"The value of parameter name '{params['name']}' is invalid: 1-63 "
                           "letters, digits, '-' and '_', starting and ending with a letter or "
                           "digit.")
        if not spec.get("location"):
            raise ARMError(400, "LocationRequired",
                           "The location property is required for this definition.")
        location = _location(spec["location"])
        props = dict(spec.get("properties") or {})
        profiles = props.pop("agentPoolProfiles", None) or []
        if existing:
            self._busy(key)
            if existing["location"] != location:
                raise ARMError(400, "InvalidResourceLocation",
                               f"The resource '{params['name']}' already exists in location "
                               f"'{existing['location']}' in resource group '{params['rg']}'. A "
                               f"resource with the same name cannot be created in location "
                               f"'{location}'. Please select a new resource name.")
            old = existing["properties"]
            if props.get("dnsPrefix") and props["dnsPrefix"] != old["dnsPrefix"]:
                raise ARMError(400, "PropertyChangeNotAllowed",
                               "Changing property 'dnsPrefix' is not allowed.")
        else:
            self._ensure_group(params["sub"], params["rg"], location)
            if not profiles:
                raise ARMError(400, "InvalidParameter",
                               "The value of parameter agentPoolProfiles is invalid: a managed "
                               "cluster needs at least one agent pool.")
            if not any(p.get("mode") == "System" for p in profiles):
                profiles = [{**profiles[0], "mode": "System"}, *profiles[1:]]
        cluster_id = self._cluster_id(params)
        version = props.get("kubernetesVersion") or (
            existing["properties"]["kubernetesVersion"] if existing else DEFAULT_KUBERNETES_VERSION)
        pools = copy.deepcopy(self._pools.get(key, {}))
        touched = []
        for profile in profiles:
            profile = dict(profile)
            name = str(profile.pop("name", ""))
            previous = pools.get(name.lower())
            pool = self._build_pool(cluster_id, name, profile, previous, version)
            pools[name.lower()] = pool
            touched.append(name.lower())
        if not any(p["properties"]["mode"] == "System" for p in pools.values()):
            raise ARMError(400, "InvalidParameter",
                           "There has to be at least one system agent pool.")

        if existing:
            state = "Updating"
            old = {k: v for k, v in existing["properties"].items() if k != "agentPoolProfiles"}
            props = {**old, **{k: v for k, v in props.items() if k not in _SERVER_SET_CLUSTER}}
        else:
            state = "Creating"
            dns_prefix = props.get("dnsPrefix") or (
                f"{params['name'][:10]}-{params['rg'][:16]}-{params['sub'][:6]}")
            suffix = uuid.uuid4().hex[:8]
            props = {**props, "dnsPrefix": dns_prefix,
                     "fqdn": f"{dns_prefix}-{suffix}.hcp.{location}.azmk8s.io".lower(),
                     "azurePortalFQDN": f"{dns_prefix}-{suffix}.portal.hcp.{location}.azmk8s.io"
                                        .lower(),
                     "nodeResourceGroup": props.get("nodeResourceGroup")
                     or f"MC_{params['rg']}_{params['name']}_{location}",
                     "maxAgentPools": 100, "powerState": {"code": "Running"}}
            self._secrets[key] = uuid.uuid4().hex + uuid.uuid4().hex
        props.update(kubernetesVersion=version, currentKubernetesVersion=_patch_version(version),
                     provisioningState=state)
        props.setdefault("enableRBAC", True)
        cluster = {**(existing or {}), "id": cluster_id, "location": location,
                   "name": cluster_id.rsplit("/", 1)[1], "type": CLUSTER_TYPE,
                   "properties": props}
        cluster.setdefault("tags", {})
        cluster.setdefault("sku", {"name": "Base", "tier": "Free"})
        for extra in ("tags", "sku", "identity", "extendedLocation", "kind"):
            if extra in spec:
                cluster[extra] = spec[extra] if spec[extra] is not None else {}
        for name in touched:
            pools[name]["properties"]["provisioningState"] = (
                "Creating" if not existing or name not in self._pools.get(key, {})
                else "Updating")
        self._clusters[key] = cluster
        self._pools[key] = pools

        def settle(state: str) -> None:
            if key not in self._clusters:
                return
            self._clusters[key]["properties"]["provisioningState"] = state
            for name in touched:
                if name in self._pools.get(key, {}):
                    self._pools[key][name]["properties"]["provisioningState"] = state

        headers = self._start_operation(
            request, subscription=params["sub"], location=location, target_id=cluster_id,
            cluster=key, on_success=lambda: settle("Succeeded"), on_failure=settle,
            result=lambda: self._render_cluster(key) if key in self._clusters else None)
        return (200 if existing else 201), self._render_cluster(key), headers

    def _patch_cluster(self, request: Request, params: dict, body: bytes) -> tuple:
        spec = _json_body(body)
        cluster = self._cluster(params)
        key = self._cluster_key(params)
        self._busy(key)
        if "tags" in spec:
            cluster["tags"] = spec["tags"] or {}
        cluster["properties"]["provisioningState"] = "Updating"

        def settle(state: str) -> None:
            if key in self._clusters:
                self._clusters[key]["properties"]["provisioningState"] = state

        headers = self._start_operation(
            request, subscription=params["sub"], location=cluster["location"],
            target_id=cluster["id"], cluster=key, on_success=lambda: settle("Succeeded"),
            on_failure=settle, result=lambda: self._render_cluster(key))
        return 200, self._render_cluster(key), headers

    def _delete_cluster(self, request: Request, params: dict, body: bytes) -> tuple:
        key = self._cluster_key(params)
        cluster = self._clusters.get(key)
        if cluster is None:
            return 204, None, {}
        self._cancel(key)
        cluster["properties"]["provisioningState"] = "Deleting"
        for pool in self._pools.get(key, {}).values():
            pool["properties"]["provisioningState"] = "Deleting"

        def failed(state: str) -> None:
            if key in self._clusters:
                self._clusters[key]["properties"]["provisioningState"] = state

        headers = self._start_operation(
            request, subscription=params["sub"], location=cluster["location"],
            target_id=cluster["id"], cluster=key, on_success=lambda: self._drop_cluster(key),
            on_failure=failed, with_location=True)
        return 202, None, headers

    def _drop_cluster(self, key: str) -> None:
        self._clusters.pop(key, None)
        self._pools.pop(key, None)
        self._secrets.pop(key, None)

    def _power(self, request: Request, params: dict, body: bytes) -> tuple:
        cluster = self._cluster(params)
        key = self._cluster_key(params)
        self._busy(key)
        running = params["action"].lower() == "start"
        cluster["properties"]["provisioningState"] = "Starting" if running else "Stopping"

        def settle(state: str) -> None:
            if key not in self._clusters:
                return
            props = self._clusters[key]["properties"]
            props["provisioningState"] = state
            if state == "Succeeded":
                power = {"code": "Running" if running else "Stopped"}
                props["powerState"] = power
                for pool in self._pools.get(key, {}).values():
                    pool["properties"]["powerState"] = dict(power)

        headers = self._start_operation(
            request, subscription=params["sub"], location=cluster["location"],
            target_id=cluster["id"], cluster=key, on_success=lambda: settle("Succeeded"),
            on_failure=settle, with_location=True)
        return 202, None, headers

    def _credentials(self, request: Request, params: dict, body: bytes) -> tuple:
        cluster = self._cluster(params)
        role = params["role"].lower().removeprefix("listcluster").removesuffix("credential")
        name = {"admin": "clusterAdmin", "user": "clusterUser",
                "monitoringuser": "clusterMonitoringUser"}[role]
        text = (self._kubeconfigs.get(cluster["id"].lower())
                or self._kubeconfigs.get(cluster["name"])
                or self._default_kubeconfig(cluster, params["rg"], name))
        return 200, {"kubeconfigs": [{"name": name,
                                      "value": base64.b64encode(text.encode()).decode()}]}, {}

    def _default_kubeconfig(self, cluster: dict, rg: str, role: str) -> str:
        name = cluster["name"]
        user = f"{role}_{rg}_{name}"
        context = f"{name}-admin" if role == "clusterAdmin" else name
        ca_data = base64.b64encode(self._ca.cert_pem.bytes() if self._ca else b"").decode()
        return yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": name, "cluster": {
                "certificate-authority-data": ca_data,
                "server": f"https://{cluster['properties']['fqdn']}:443"}}],
            "contexts": [{"name": context, "context": {"cluster": name, "user": user}}],
            "current-context": context,
            "users": [{"name": user, "user": {
                "token": self._secrets.get(cluster["id"].lower(), uuid.uuid4().hex)}}],
        }, sort_keys=False)

    # --- agent pools --------------------------------------------------------------------------

    def _build_pool(self, cluster_id: str, name: str, spec: dict, previous: dict | None,
                    cluster_version: str) -> dict:
        """An agent pool from the properties sent, with AKS's defaults and checks."""
        if not _POOL_NAME.fullmatch(name):
            raise ARMError(400, "InvalidParameter",
                           f"The value of parameter agentPoolProfile.name '{name}' is invalid: "
                           "it must start with a lowercase letter and contain only lowercase "
                           "letters and digits, at most 12 characters.")
        kept = {k: v for k, v in previous["properties"].items() if k not in _SERVER_SET_POOL
                } if previous else {}
        props = {**kept, **spec}
        mode = props.setdefault("mode", "User")
        if mode not in ("System", "User", "Gateway"):
            raise ARMError(400, "InvalidParameter", f"Agent pool mode '{mode}' is invalid.")
        autoscale = bool(props.get("enableAutoScaling"))
        if autoscale:
            low, high = props.get("minCount"), props.get("maxCount")
            if low is None or high is None or low > high:
                raise ARMError(400, "InvalidParameter",
                               f"Agent pool '{name}': enableAutoScaling needs minCount <= "
                               "maxCount.")
            props.setdefault("count", low)
            if not low <= props["count"] <= high:
                raise ARMError(400, "InvalidParameter",
                               f"Agent pool '{name}': count {props['count']} is outside "
                               f"minCount {low} .. maxCount {high}.")
        props.setdefault("count", 1)
        if not 0 <= int(props["count"]) <= 1000 or (mode == "System" and props["count"] < 1):
            raise ARMError(400, "InvalidParameter",
                           f"Agent pool '{name}': count {props['count']} is invalid (0-1000, "
                           "at least 1 for a System pool).")
        defaults = {"vmSize": DEFAULT_VM_SIZE, "osDiskSizeGB": 128, "osDiskType": "Managed",
                    "kubeletDiskType": "OS", "maxPods": 110, "type": "VirtualMachineScaleSets",
                    "enableAutoScaling": False, "osType": "Linux", "osSKU": "Ubuntu",
                    "scaleDownMode": "Delete", "enableNodePublicIP": False, "enableFIPS": False,
                    "upgradeSettings": {"maxSurge": "10%"}}
        for k, v in defaults.items():
            props.setdefault(k, v)
        version = props.get("orchestratorVersion") or cluster_version
        props.update(orchestratorVersion=version, currentOrchestratorVersion=_patch_version(version),
                     nodeImageVersion=NODE_IMAGE_VERSION,
                     powerState=(previous["properties"]["powerState"] if previous
                                 else {"code": "Running"}))
        if previous and props.get("vmSize") != previous["properties"]["vmSize"]:
            raise ARMError(400, "PropertyChangeNotAllowed",
                           "Changing property 'vmSize' is not allowed.")
        pool_name = previous["name"] if previous else name
        return {"id": f"{cluster_id}/agentPools/{pool_name}", "name": pool_name,
                "type": POOL_TYPE, "properties": props}

    def _pool_params(self, params: dict) -> tuple[str, dict, str]:
        cluster = self._cluster(params)
        return self._cluster_key(params), cluster, params["pool"].lower()

    def _get_pool(self, request: Request, params: dict, body: bytes) -> tuple:
        key, cluster, name = self._pool_params(params)
        self._observe_target(f"{key}/agentpools/{name}")
        pool = self._pools.get(key, {}).get(name)
        if pool is None:
            raise ARMError(404, "NotFound",
                           f"Agent pool '{params['pool']}' of managed cluster "
                           f"'{cluster['name']}' was not found.")
        return 200, copy.deepcopy(pool), {}

    def _list_pools(self, request: Request, params: dict, body: bytes) -> tuple:
        self._cluster(params)
        key = self._cluster_key(params)
        return 200, {"value": [copy.deepcopy(p) for p in self._pools.get(key, {}).values()]}, {}

    def _put_pool(self, request: Request, params: dict, body: bytes) -> tuple:
        spec = _json_body(body)
        key, cluster, name = self._pool_params(params)
        self._busy(key)
        previous = self._pools.get(key, {}).get(name)
        pool = self._build_pool(cluster["id"], params["pool"], spec.get("properties") or {},
                                previous, cluster["properties"]["kubernetesVersion"])
        others = [p for n, p in self._pools.get(key, {}).items() if n != name]
        if pool["properties"]["mode"] != "System" and not any(
                p["properties"]["mode"] == "System" for p in others):
            raise ARMError(400, "InvalidParameter",
                           "There has to be at least one system agent pool.")
        if previous is None:
            state = "Creating"
        elif {k: v for k, v in pool["properties"].items() if k != "count"} == {
                k: v for k, v in previous["properties"].items()
                if k not in ("count", "provisioningState")}:
            state = "Scaling"
        else:
            state = "Updating"
        pool["properties"]["provisioningState"] = state
        self._pools.setdefault(key, {})[name] = pool

        def settle(state: str) -> None:
            if name in self._pools.get(key, {}):
                self._pools[key][name]["properties"]["provisioningState"] = state

        headers = self._start_operation(
            request, subscription=params["sub"], location=cluster["location"],
            target_id=pool["id"], cluster=key, on_success=lambda: settle("Succeeded"),
            on_failure=settle, result=lambda: copy.deepcopy(self._pools[key].get(name)))
        return (200 if previous else 201), copy.deepcopy(pool), headers

    def _delete_pool(self, request: Request, params: dict, body: bytes) -> tuple:
        key, cluster, name = self._pool_params(params)
        pool = self._pools.get(key, {}).get(name)
        if pool is None:
            return 204, None, {}
        self._busy(key)
        if pool["properties"]["mode"] == "System" and not any(
                p["properties"]["mode"] == "System"
                for n, p in self._pools[key].items() if n != name):
            raise ARMError(400, "OperationNotAllowed",
                           "There has to be at least one system agent pool: the last one "
                           "cannot be deleted.")
        pool["properties"]["provisioningState"] = "Deleting"

        def failed(state: str) -> None:
            if name in self._pools.get(key, {}):
                self._pools[key][name]["properties"]["provisioningState"] = state

        headers = self._start_operation(
            request, subscription=params["sub"], location=cluster["location"],
            target_id=pool["id"], cluster=key,
            on_success=lambda: self._pools.get(key, {}).pop(name, None), on_failure=failed,
            with_location=True)
        return 202, None, headers


def _json_body(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except ValueError as err:
        raise ARMError(400, "InvalidRequestContent",
                       f"The request content was invalid and could not be deserialized: "
                       f"'{err}'.") from err
    if not isinstance(value, dict):
        raise ARMError(400, "InvalidRequestContent",
                       "The request content was invalid and could not be deserialized: a JSON "
                       "object is required.")
    return value


def _patch_version(version: str) -> str:
    """AKS keeps kubernetesVersion as sent ("1.33") and reports the patch it runs."""
    return version if version.count(".") >= 2 else f"{version}.0"


def _owning_client(aio: bool) -> type:
    """A ContainerServiceClient subclass that also closes the credential it was given."""
    if aio:
        from azure.mgmt.containerservice.aio import ContainerServiceClient as AsyncClient

        class OwningAsyncClient(AsyncClient):
            async def close(self) -> None:
                await super().close()
                await self._config.credential.close()

            async def __aexit__(self, *exc: Any) -> None:
                await super().__aexit__(*exc)
                await self._config.credential.close()

        return OwningAsyncClient
    from azure.mgmt.containerservice import ContainerServiceClient

    class OwningClient(ContainerServiceClient):
        def close(self) -> None:
            super().close()
            self._config.credential.close()

        def __exit__(self, *exc: Any) -> None:
            super().__exit__(*exc)
            self._config.credential.close()

    return OwningClient
