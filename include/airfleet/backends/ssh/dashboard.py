"""Ray's dashboard over HTTP: is the head's GCS healthy, which nodes are ALIVE; Ray Serve's
REST API (the applications) and the package API (``py_modules`` uploads) for endpoints.

The head's dashboard listens on the head's loopback only (``commands.DASHBOARD_HOST``): its
Jobs API runs any code it is sent, to anyone who reaches it. Airfleet reaches it through an
SSH port forward (:mod:`.tunnel`). How a verb reaches it is one of the clients the backend is
given (``clients["dashboard"]``, a :data:`Reach`): :func:`.tunnel.through_ssh` in production
(``airfleet_airflow.clients``), :func:`direct` only where the "dashboards" are simulated and
no SSH exists (the health benchmark, tests).

Probes use short timeouts on purpose: ``ray health-check`` takes 42 s to give up on a dead
head, an HTTP probe answers (or fails) in a few seconds.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from airfleet.errors import AirfleetError

if TYPE_CHECKING:
    from airfleet.backends.ssh.remote import Remote

PROBE_TIMEOUT = 5.0
SERVE_APPLICATIONS = "/api/serve/applications/"
SERVE_TIMEOUT = 30.0  # GET of every Serve application's status
# The first PUT starts Serve's controller and proxies before it answers (a few seconds here).
SERVE_PUT_TIMEOUT = 120.0
PACKAGE_TIMEOUT = 120.0
TRANSIENT_STATUS = (502, 503, 504)  # the dashboard (or Serve's controller) not ready yet
ATTEMPTS = 3


class ServeRefused(AirfleetError):
    """The dashboard refused a Serve config or a package (a 4xx, or an upload it cannot
    store): sending the same request again cannot help."""


class NoDashboardAccess(AirfleetError):
    """The verb was given no way to reach the head's dashboard (no SSH access to tunnel
    through, or no ``clients["dashboard"]``)."""


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every client: httpx builds (and loads CA files into) a new one per
    client otherwise, which dominated a fleet-wide health check's CPU time."""
    return httpx.create_ssl_context()


@dataclass(frozen=True)
class RayNode:
    node_id: str
    ip: str
    state: str  # ALIVE | DEAD
    is_head: bool

    @property
    def alive(self) -> bool:
        return self.state == "ALIVE"


def url(host: str, port: int) -> str:
    return f"http://{host}:{port}"


class DashboardAccess:
    """One head's dashboard as this process reaches it; ``aclose()`` when done.

    :meth:`gcs_healthy` and :meth:`list_nodes` raise what opening the way there raised (a
    tunnel whose SSH connection cannot open: the node unreachable, our key refused, a host
    key that is not the pinned one), so a caller can say why; a dashboard that does not
    answer is "not healthy" / ``httpx.HTTPError``.
    """

    where: str  # for people: which dashboard, and how it is reached

    async def _client(self) -> httpx.AsyncClient:
        raise NotImplementedError

    async def gcs_healthy(self, timeout: float = PROBE_TIMEOUT) -> bool:
        client = await self._client()
        try:
            r = await client.get("/api/gcs_healthz", timeout=timeout)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.text.strip() == "success"

    async def list_nodes(self, timeout: float = PROBE_TIMEOUT) -> list[RayNode]:
        """Every node the GCS knows, ALIVE and DEAD (``httpx.HTTPError`` when it does not
        answer)."""
        client = await self._client()
        r = await client.get("/api/v0/nodes", params={"limit": 10000}, timeout=timeout)
        r.raise_for_status()
        return parse_nodes(r.json())

    # ---- Ray Serve (endpoints) ---------------------------------------------------------

    async def _request(self, method: str, path: str, *, timeout: float,
                       **kwargs: Any) -> httpx.Response:
        """One request, again (up to :data:`ATTEMPTS`) on a dropped connection or a
        502/503/504: every request here is idempotent (a Serve PUT is declarative)."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                r = await (await self._client()).request(method, path, timeout=timeout,
                                                         **kwargs)
            except httpx.TransportError:
                if attempt == ATTEMPTS:
                    raise
            else:
                if r.status_code not in TRANSIENT_STATUS or attempt == ATTEMPTS:
                    return r
            await asyncio.sleep(attempt)
        raise AssertionError("unreachable")

    @staticmethod
    def _check(r: httpx.Response, what: str) -> None:
        """4xx: :class:`ServeRefused` with the dashboard's words; 5xx: ``httpx.HTTPStatusError``
        (transient to the caller), its body in the message."""
        if r.is_success:
            return
        text = r.text.strip()
        if 400 <= r.status_code < 500:
            raise ServeRefused(f"{what}: the Ray dashboard answered {r.status_code}: {text[:2000]}")
        raise httpx.HTTPStatusError(f"{what}: the Ray dashboard answered {r.status_code}: "
                                    f"{text[-2000:]}", request=r.request, response=r)

    async def serve_applications(self, timeout: float = SERVE_TIMEOUT) -> dict[str, Any]:
        """``GET /api/serve/applications/``: Serve's HTTP options, proxies and every
        application with its recorded config, status and deployments (Ray's
        ``ServeInstanceDetails``; no application and no proxy when Serve does not run)."""
        r = await self._request("GET", SERVE_APPLICATIONS, timeout=timeout)
        self._check(r, f"GET {SERVE_APPLICATIONS}")
        return r.json()

    async def put_serve_applications(self, config: dict[str, Any],
                                     timeout: float = SERVE_PUT_TIMEOUT) -> None:
        """``PUT /api/serve/applications/``: ``config`` (Ray's ``ServeDeploySchema``) becomes
        the whole set of applications; Serve starts when it does not run yet."""
        r = await self._request("PUT", SERVE_APPLICATIONS, json=config, timeout=timeout)
        self._check(r, f"PUT {SERVE_APPLICATIONS}")

    async def package_exists(self, http_path: str, timeout: float = PROBE_TIMEOUT) -> bool:
        """``GET /api/packages/<protocol>/<name>``: whether the cluster's GCS holds the
        package (the dashboard also pins it for a few minutes, so it is not collected before
        the config that uses it is deployed)."""
        r = await self._request("GET", http_path, timeout=timeout)
        if r.status_code == 404:
            return False
        self._check(r, f"GET {http_path}")
        return True

    async def upload_package(self, http_path: str, data: bytes,
                             timeout: float = PACKAGE_TIMEOUT) -> None:
        """``PUT /api/packages/<protocol>/<name>``: store a package in the cluster's GCS."""
        r = await self._request("PUT", http_path, content=data, timeout=timeout)
        if r.status_code == 500 and "ValueError" in r.text:  # too large: Ray says which limit
            raise ServeRefused(f"PUT {http_path}: {r.text.strip().splitlines()[-1]}")
        self._check(r, f"PUT {http_path}")

    async def why_silent(self) -> str | None:
        """After a request got no answer: why, when the way there can tell (None otherwise)."""
        return None

    async def aclose(self) -> None:
        """Release what reaching the dashboard holds (idempotent)."""


class DirectDashboard(DashboardAccess):
    """Plain HTTP to ``host:port``. Only for dashboards that are simulated and reachable
    without SSH (benchmarks, tests): a real head's dashboard answers on its loopback only."""

    def __init__(self, host: str, port: int) -> None:
        self.where = url(host, port)
        self._http: httpx.AsyncClient | None = None

    async def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.where, verify=tls_context(),
                                           trust_env=False)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


# How a verb reaches a head's dashboard: (the verb's SSH session or None, head, port) -> access.
Reach = Callable[["Remote | None", str, int], DashboardAccess]


def direct(remote: Remote | None, host: str, port: int) -> DirectDashboard:
    """A :data:`Reach` that ignores SSH: for simulated dashboards only (see
    :class:`DirectDashboard`)."""
    return DirectDashboard(host, port)


def gcs_healthy(base_url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Synchronous probe of a dashboard this process reaches at ``base_url`` (tests, tools)."""
    try:
        r = httpx.get(f"{base_url}/api/gcs_healthz", timeout=timeout, trust_env=False)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and r.text.strip() == "success"


def list_nodes(base_url: str, timeout: float = PROBE_TIMEOUT) -> list[RayNode]:
    """Every node the GCS knows, ALIVE and DEAD (raises httpx.HTTPError when unreachable)."""
    r = httpx.get(f"{base_url}/api/v0/nodes", params={"limit": 10000}, timeout=timeout,
                  trust_env=False)
    r.raise_for_status()
    return parse_nodes(r.json())


def parse_nodes(payload: dict[str, Any]) -> list[RayNode]:
    """``/api/v0/nodes`` answers ``{"data": {"result": {"result": [node, ...]}}}``."""
    rows = payload["data"]["result"]["result"]
    return [RayNode(row["node_id"], row["node_ip"], row["state"], bool(row.get("is_head_node")))
            for row in rows]


def alive_by_ip(nodes: list[RayNode]) -> dict[str, RayNode]:
    """The ALIVE node of each IP (a restarted node leaves DEAD entries behind under its IP)."""
    return {n.ip: n for n in nodes if n.alive}
