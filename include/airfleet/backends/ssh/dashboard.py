"""Ray's dashboard over HTTP: is the head's GCS healthy, which nodes are ALIVE.

Probes use short timeouts on purpose: ``ray health-check`` takes 42 s to give up on a dead
head, an HTTP probe answers (or fails) in a few seconds.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from typing import Any

import httpx

PROBE_TIMEOUT = 5.0


@functools.cache
def _tls() -> ssl.SSLContext:
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


def gcs_healthy(base_url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    try:
        r = httpx.get(f"{base_url}/api/gcs_healthz", timeout=timeout)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and r.text.strip() == "success"


async def async_gcs_healthy(base_url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    try:
        async with httpx.AsyncClient(timeout=timeout, verify=_tls()) as client:
            r = await client.get(f"{base_url}/api/gcs_healthz")
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and r.text.strip() == "success"


def list_nodes(base_url: str, timeout: float = PROBE_TIMEOUT) -> list[RayNode]:
    """Every node the GCS knows, ALIVE and DEAD (raises httpx.HTTPError when unreachable)."""
    r = httpx.get(f"{base_url}/api/v0/nodes", params={"limit": 10000}, timeout=timeout)
    r.raise_for_status()
    return parse_nodes(r.json())


async def async_list_nodes(base_url: str, timeout: float = PROBE_TIMEOUT) -> list[RayNode]:
    async with httpx.AsyncClient(timeout=timeout, verify=_tls()) as client:
        r = await client.get(f"{base_url}/api/v0/nodes", params={"limit": 10000})
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
