"""Ray's dashboard over HTTP: is the head's GCS healthy, which nodes are ALIVE.

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
