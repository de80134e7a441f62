"""Which pods serve which model: the routing table, and the Kubernetes watch that feeds it.

:class:`RoutingTable` is pure: it turns pod objects (the API's JSON, as dicts) and watch events
into ``model -> ready endpoints``. A pod labelled ``airfleet.io/endpoint`` is routable when it
has a ``airfleet.io/model`` label, ``status.podIP``, condition ``Ready=True`` and no
``deletionTimestamp``; its port is the container port named ``http``, else the
``airfleet.io/port`` annotation, else 8000. Pods that are not routable are still remembered,
so the router can tell an unknown model (404) from a known model with no ready pod (503).

:class:`PodWatcher` keeps the table current with a list, then a watch from the list's
resourceVersion (newline-delimited JSON events), like client-go's reflector:

- ADDED / MODIFIED / DELETED update the table as they arrive;
- BOOKMARK only advances the resourceVersion;
- ERROR 410 Gone (or an HTTP 410) means the resourceVersion is too old: list again;
- the server ending the stream (its ``timeoutSeconds``) is normal: watch again from the last
  resourceVersion;
- any other failure (connection, 5xx, 401, a malformed event) is retried with a capped
  exponential backoff while the router keeps routing on the last known table; ``state`` and
  ``last_error`` say so on ``/healthz``.

The same reflector (:class:`Reflector`) also follows the ConfigMap of traffic weights (see
:mod:`airfleet_router.routes`).

The watch uses plain httpx rather than kubernetes_asyncio: we need exactly two GETs and a
line-by-line JSON stream per resource, and kubernetes_asyncio would add a large generated
client to the image and to start-up time for no behaviour we use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import httpx

from airfleet_router.config import RouterConfig

log = logging.getLogger(__name__)

ENDPOINT_LABEL = "airfleet.io/endpoint"
MODEL_LABEL = "airfleet.io/model"
VERSION_LABEL = "airfleet.io/version"
# The exact served model name ("org/model" holds a "/", which no label value may).
SERVED_MODEL_ANNOTATION = "airfleet.io/served-model"
PORT_ANNOTATION = "airfleet.io/port"
PORT_NAME = "http"
METRICS_PORT_NAME = "metrics"
DEFAULT_PORT = 8000
NO_VERSION = ""  # the version of a pod without the version label

# The API server ends each watch after config.watch_timeout seconds and we watch again. Our
# read timeout is longer, so a silently dead connection is noticed at the latest
# WATCH_READ_SLACK seconds after the server should have ended the stream.
WATCH_READ_SLACK = 30
API_CONNECT_TIMEOUT = 5.0
API_LIST_TIMEOUT = 30.0
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 5.0
# A watch that ends in less than this, with no event, counts as a failure for the backoff, so
# a server that closes every stream at once is not hammered.
WATCH_MIN_HEALTHY = 1.0


class Endpoint(NamedTuple):
    ip: str
    port: int

    def url(self, path: str) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}{path}"

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class PodRoute:
    """What one pod means for routing: its model (None without the label) and, when it is
    routable, its endpoint; otherwise ``reason`` says why not."""

    name: str
    model: str | None
    endpoint: Endpoint | None
    reason: str = ""
    version: str = NO_VERSION
    metrics_port: int | None = None  # where its Prometheus /metrics is; None: not routable


def pod_route(pod: dict[str, Any]) -> PodRoute:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    name = meta.get("name") or "?"
    labels = meta.get("labels") or {}
    served = ((meta.get("annotations") or {}).get(SERVED_MODEL_ANNOTATION) or "").strip()
    model = served or labels.get(MODEL_LABEL) or None
    if model is None:
        return PodRoute(name, None, None, f"no {MODEL_LABEL} label")
    if meta.get("deletionTimestamp"):
        return PodRoute(name, model, None, "terminating")
    ip = status.get("podIP")
    if not ip:
        return PodRoute(name, model, None, "no pod IP")
    if not _is_ready(status):
        return PodRoute(name, model, None, "not ready")
    port = _port(pod)
    if port is None:
        return PodRoute(name, model, None,
                        f"annotation {PORT_ANNOTATION} is not a port number")
    return PodRoute(name, model, Endpoint(ip, port), version=labels.get(VERSION_LABEL) or NO_VERSION,
                    metrics_port=_named_port(pod, METRICS_PORT_NAME) or port)


def _is_ready(status: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in status.get("conditions") or [])


def _named_port(pod: dict[str, Any], name: str) -> int | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == name and port.get("containerPort"):
                return int(port["containerPort"])
    return None


def _port(pod: dict[str, Any]) -> int | None:
    named = _named_port(pod, PORT_NAME)
    if named is not None:
        return named
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(PORT_ANNOTATION)
    if raw is None:
        return DEFAULT_PORT
    try:
        port = int(str(raw).strip())
    except ValueError:
        return None
    return port if 0 < port < 65536 else None


class RoutingTable:
    """Pods by name and, derived from them, ``model -> ready endpoints`` (a sorted tuple, so
    the balancer's round-robin order is stable). Every mutation returns the models whose
    ready endpoints changed or that appeared or disappeared."""

    def __init__(self) -> None:
        self._pods: dict[str, PodRoute] = {}
        self._ready: dict[str, tuple[Endpoint, ...]] = {}
        self._versions: dict[str, dict[Endpoint, str]] = {}
        self._metrics_ports: dict[Endpoint, int] = {}
        self._known: frozenset[str] = frozenset()

    def ready(self, model: str) -> tuple[Endpoint, ...]:
        return self._ready.get(model, ())

    def versions(self, model: str) -> dict[Endpoint, str]:
        """The version of each ready endpoint of ``model`` (``""`` without the label)."""
        return self._versions.get(model, {})

    def scrape_targets(self) -> dict[Endpoint, int]:
        """Every ready endpoint and the port of its Prometheus ``/metrics``."""
        return self._metrics_ports

    def knows(self, model: str) -> bool:
        """A pod with this model exists, ready or not."""
        return model in self._known

    def models(self) -> list[str]:
        """Models with at least one ready endpoint, sorted."""
        return sorted(self._ready)

    def endpoints(self) -> set[Endpoint]:
        """Every ready endpoint, whatever its model."""
        return {ep for eps in self._ready.values() for ep in eps}

    def known_models(self) -> frozenset[str]:
        return self._known

    def counts(self) -> dict[str, int]:
        return {"pods": len(self._pods),
                "ready_pods": sum(1 for p in self._pods.values() if p.endpoint),
                "models": len(self._ready)}

    def replace(self, pods: Iterable[dict[str, Any]]) -> set[str]:
        """The full list (after a list call): pods not in it are gone."""
        new = {}
        for pod in pods:
            route = pod_route(pod)
            new[route.name] = route
        for name in self._pods.keys() - new.keys():
            self._log_change(self._pods[name], None)
        for name, route in new.items():
            self._log_change(self._pods.get(name), route)
        self._pods = new
        return self._rebuild()

    def apply(self, event_type: str, pod: dict[str, Any]) -> set[str]:
        """One watch event: ADDED, MODIFIED or DELETED (other types change nothing)."""
        route = pod_route(pod)
        old = self._pods.get(route.name)
        if event_type in ("ADDED", "MODIFIED"):
            self._pods[route.name] = route
        elif event_type == "DELETED":
            self._pods.pop(route.name, None)
            route = None
        else:
            return set()
        self._log_change(old, route)
        return self._rebuild()

    def _rebuild(self) -> set[str]:
        ready: dict[str, set[Endpoint]] = {}
        versions: dict[str, dict[Endpoint, str]] = {}
        metrics_ports: dict[Endpoint, int] = {}
        for route in self._pods.values():
            if route.endpoint is not None:
                ready.setdefault(route.model, set()).add(route.endpoint)
                versions.setdefault(route.model, {})[route.endpoint] = route.version
                metrics_ports[route.endpoint] = route.metrics_port or route.endpoint.port
        new = {model: tuple(sorted(eps)) for model, eps in ready.items()}
        known = frozenset(r.model for r in self._pods.values() if r.model)
        changed = {m for m in new.keys() | self._ready.keys()
                   if new.get(m) != self._ready.get(m)
                   or versions.get(m) != self._versions.get(m)}
        changed |= known ^ self._known
        self._ready, self._known = new, known
        self._versions, self._metrics_ports = versions, metrics_ports
        return changed

    @staticmethod
    def _log_change(old: PodRoute | None, new: PodRoute | None) -> None:
        was = old.endpoint if old else None
        now = new.endpoint if new else None
        if now is not None and now != was:
            log.info("pod %s: model %s version %s routable at %s", new.name, new.model,
                     new.version or "-", now)
        elif now is None and was is not None:
            why = new.reason if new else "deleted"
            log.info("pod %s: model %s no longer routable (%s)", old.name, old.model, why)
        elif old is None and new is not None and new.model is None:
            log.warning("pod %s has label %s but no %s label; not routed", new.name,
                        ENDPOINT_LABEL, MODEL_LABEL)


# ---- the watch -------------------------------------------------------------------------------

class WatchError(Exception):
    """The API refused or broke off a list or watch; retried after a backoff."""


class ResourceVersionGone(WatchError):
    """410 Gone: our resourceVersion is older than the API server keeps; list again."""


class Backoff:
    """Exponential backoff with full jitter over the upper half: 0.1 s, 0.2 s, ... capped."""

    def __init__(self, initial: float = BACKOFF_INITIAL, cap: float = BACKOFF_MAX) -> None:
        self.initial, self.cap = initial, cap
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._next = self.initial


class Reflector:
    """List then watch one resource of the namespace (client-go's reflector, see the module
    docstring); subclasses say which objects (``selector``) and what to do with the full list
    (:meth:`replace`) and with each event (:meth:`apply`).

    ``on_restart(reason)`` is called each time the watch is restarted (``stream_end``,
    ``gone``, ``error``).
    """

    resource = ""  # plural, core API group
    what = ""  # for logs: "pod", "routes"

    def __init__(self, config: RouterConfig, client: httpx.AsyncClient,
                 on_restart: Callable[[str], None] = lambda reason: None) -> None:
        self.config = config
        self.client = client
        self.on_restart = on_restart
        self.state = "starting"
        self.synced = False
        self.last_sync: float | None = None  # time.time() of the last successful list
        self.last_error: str | None = None
        self.resource_version: str | None = None
        self._backoff = Backoff()
        self._path = f"/api/v1/namespaces/{config.namespace}/{self.resource}"

    def selector(self) -> dict[str, str]:
        raise NotImplementedError

    def replace(self, items: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def apply(self, event_type: str, obj: dict[str, Any]) -> None:
        raise NotImplementedError

    def health(self) -> dict[str, Any]:
        return {"state": self.state, "synced": self.synced, "last_sync": self.last_sync,
                "last_error": self.last_error, "resource_version": self.resource_version}

    async def run(self) -> None:
        """Forever (until cancelled)."""
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                started = time.monotonic()
                events = await self._watch()
                if events == 0 and time.monotonic() - started < WATCH_MIN_HEALTHY:
                    await self._restart("stream_end", "the API server ended the watch at once")
                else:
                    self._backoff.reset()
                    self.on_restart("stream_end")
            except ResourceVersionGone:
                log.info("resourceVersion %s is gone; listing again", self.resource_version)
                self.resource_version = None
                self.on_restart("gone")
            except (WatchError, httpx.HTTPError, ValueError) as e:
                await self._restart("error", _describe(e))
            except Exception as e:  # an object or answer of a shape we did not expect
                log.exception("%s watch: unexpected failure", self.what)
                await self._restart("error", f"{type(e).__name__}: {e}")

    async def _restart(self, reason: str, error: str) -> None:
        self.state = "backoff"
        self.last_error = error
        self.on_restart(reason)
        delay = self._backoff.next()
        log.warning("%s watch: %s; retrying in %.1f s (routing on the last known %s)",
                    self.what, error, delay, self.resource)
        await asyncio.sleep(delay)

    def _headers(self) -> dict[str, str]:
        token = self.config.token.get()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _check(self, response: httpx.Response, verb: str) -> None:
        if response.status_code == 410:
            raise ResourceVersionGone()
        if response.status_code == 401:
            self.config.token.invalidate()
        if response.status_code >= 400:
            raise WatchError(f"{verb} {self.resource} in {self.config.namespace}: HTTP "
                             f"{response.status_code} {_status_message(response)}")

    async def _list(self) -> None:
        self.state = "listing"
        response = await self.client.get(
            self._path, params=self.selector(), headers=self._headers(),
            timeout=httpx.Timeout(API_LIST_TIMEOUT, connect=API_CONNECT_TIMEOUT))
        self._check(response, "list")
        body = response.json()
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if not rv:
            raise WatchError(f"list {self.resource}: the answer has no "
                             f"metadata.resourceVersion")
        self.replace(body.get("items") or [])
        self.resource_version = rv
        self.synced = True
        self.last_sync = time.time()
        self._backoff.reset()

    async def _watch(self) -> int:
        """One watch stream until the server ends it; returns the number of events."""
        params = {**self.selector(), "watch": "true",
                  "resourceVersion": self.resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(self.config.watch_timeout)}
        timeout = httpx.Timeout(self.config.watch_timeout + WATCH_READ_SLACK,
                                connect=API_CONNECT_TIMEOUT)
        events = 0
        async with self.client.stream("GET", self._path, params=params, headers=self._headers(),
                                      timeout=timeout) as response:
            if response.status_code >= 400:
                await response.aread()
                self._check(response, "watch")
            self.state = "watching"
            self.last_error = None
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                self._handle(json.loads(line))
                events += 1
                if events == 1:  # the stream works: the next failure starts a fresh backoff
                    self._backoff.reset()
        return events

    def _handle(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise ResourceVersionGone()
            raise WatchError(f"watch {self.resource}: ERROR event {obj.get('code')} "
                             f"{obj.get('reason') or ''} {obj.get('message') or ''}".strip())
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self.apply(kind, obj)
        elif kind != "BOOKMARK":
            raise WatchError(f"watch {self.resource}: unknown event type {kind!r}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.resource_version = rv


def _status_message(response: httpx.Response) -> str:
    """The ``message`` of a Kubernetes Status body, shortened; never the request."""
    try:
        message = response.json().get("message") or ""
    except ValueError:
        message = response.text
    return str(message)[:200]


def _describe(e: Exception) -> str:
    if isinstance(e, httpx.HTTPError):
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if isinstance(e, json.JSONDecodeError):
        return f"malformed watch event ({e.msg})"
    return str(e)


class PodWatcher(Reflector):
    """List then watch endpoint pods of one namespace into a :class:`RoutingTable`.

    ``on_change(models)`` is called (in the event loop) with the models whose ready endpoints
    changed.
    """

    resource = "pods"
    what = "pod"

    def __init__(self, config: RouterConfig, table: RoutingTable, client: httpx.AsyncClient,
                 on_change: Callable[[set[str]], None] = lambda models: None,
                 on_restart: Callable[[str], None] = lambda reason: None) -> None:
        super().__init__(config, client, on_restart)
        self.table = table
        self.on_change = on_change

    def selector(self) -> dict[str, str]:
        return {"labelSelector": ENDPOINT_LABEL}

    def replace(self, items: list[dict[str, Any]]) -> None:
        changed = self.table.replace(items)
        if not self.synced:
            log.info("pod watch synced: %s", self.table.counts())
        self.synced = True  # before on_change, which reports it
        self.on_change(changed)

    def apply(self, event_type: str, obj: dict[str, Any]) -> None:
        changed = self.table.apply(event_type, obj)
        if changed:
            self.on_change(changed)
