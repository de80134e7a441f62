"""The router's HTTP API (Starlette): OpenAI-compatible inference requests proxied to the pods
serving the requested model, plus ``/v1/models``, ``/healthz`` and ``/metrics``.

A request to ``/v1/chat/completions`` or ``/v1/completions`` is read whole (its JSON names the
model and, for sticky sessions, its session key: the ``X-Session-ID`` header or its first
user messages), sent unchanged to one ready pod of that model (see
:mod:`airfleet_router.balancer`) and the pod's answer is relayed as it arrives, byte for byte:
Server-Sent Events of a ``"stream": true`` request reach the client chunk by chunk. If the
chosen pod refuses the connection, one other ready pod of the model is tried, of the same
version when there is one (the request was not sent, so this is safe for a POST); nothing is
retried once the request has reached a pod.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. Request bodies
and the ``Authorization`` header are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection

import httpx
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from airfleet_router.balancer import Balancer
from airfleet_router.config import RouterConfig
from airfleet_router.discovery import Endpoint, PodWatcher, RoutingTable
from airfleet_router.routes import RoutesWatcher
from airfleet_router.scraper import Scraper
from airfleet_router.upstream import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024  # base64 images in chat requests make bodies large
UPSTREAM_CONNECT_TIMEOUT = 3.0  # a pod IP that does not answer SYNs: fail over quickly
# Below the 5 s keep-alive of uvicorn (vLLM, SGLang) so we do not reuse a connection the pod
# is closing at that very moment.
UPSTREAM_KEEPALIVE_EXPIRY = 4.0
PRUNE_INTERVAL = 30.0  # seconds between closing the pools of pods that left the table
# A response of known length up to this size is read whole, then sent in one piece: a
# non-streamed completion is useless to the client until complete anyway, and this saves the
# streaming machinery (a task per response) about 0.7 ms per request. Anything longer, of
# unknown length or an event stream is relayed as it arrives.
BUFFERED_MAX = 1024 * 1024
PROMPT_KEY_CHARS = 256  # of a completion's prompt, for its session key
RETRY_AFTER_NO_POD = "5"  # seconds; a pod becoming ready takes longer than that anyway
# Hop-by-hop headers (RFC 9110 7.6.1) are for one connection and never forwarded; Host and
# Content-Length are set again for the upstream request; Date and Server come from our server.
# Expect is not forwarded either: the router has the whole body and sends it at once.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "trailers", "transfer-encoding",
                        "upgrade"})
NOT_FORWARDED_UP = HOP_BY_HOP | {"host", "content-length", "expect"}
NOT_FORWARDED_DOWN = HOP_BY_HOP | {"date", "server"}
_NOT_FORWARDED_UP = frozenset(name.encode("latin-1") for name in NOT_FORWARDED_UP)
_NOT_FORWARDED_DOWN = frozenset(name.encode("latin-1") for name in NOT_FORWARDED_DOWN)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
UNKNOWN_MODEL = ""  # the model label of requests for no known model (bounded cardinality)


class Metrics:
    """The router's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple, object] = {}
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "airfleet_router_requests", "Inference requests by model and HTTP status answered",
            ["model", "status"], registry=self.registry)
        self.upstream_latency = Histogram(
            "airfleet_router_upstream_latency_seconds",
            "From sending a request to a pod to its response headers",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.upstream_connect_failures = Counter(
            "airfleet_router_upstream_connect_failures",
            "Connections to a ready pod that failed (the request was then retried or got 502)",
            ["model"], registry=self.registry)
        self.ready_pods = Gauge(
            "airfleet_router_ready_pods", "Ready pods by model", ["model"],
            registry=self.registry)
        self.watch_restarts = Counter(
            "airfleet_router_watch_restarts",
            "Restarts of the pod watch by reason (stream_end, gone, error)", ["reason"],
            registry=self.registry)
        self.watch_synced = Gauge(
            "airfleet_router_watch_synced", "1 once the pod list has been read",
            registry=self.registry)
        self.version_requests = Counter(
            "airfleet_router_version_requests",
            "Requests sent to a pod, by model and the pod's version", ["model", "version"],
            registry=self.registry)
        self.weight_fallbacks = Counter(
            "airfleet_router_weight_fallbacks",
            "Requests of a weighted model sent to any ready pod because no version with a "
            "weight above 0 had one", ["model"], registry=self.registry)
        self.routes_errors = Counter(
            "airfleet_router_routes_config_errors",
            "Malformed airfleet-routes ConfigMaps seen (the last good weights were kept)",
            registry=self.registry)
        self.routes_restarts = Counter(
            "airfleet_router_routes_watch_restarts",
            "Restarts of the airfleet-routes watch by reason (stream_end, gone, error)",
            ["reason"], registry=self.registry)
        self.scrape_failures = Counter(
            "airfleet_router_scrape_failures",
            "Engine /metrics scrapes that failed (the pod is then balanced on in-flight only)",
            registry=self.registry)

    def labelled(self, metric, *values: str):
        """``metric.labels(*values)``, remembered: that look-up costs more than the update, and
        these children are never removed (the values are bounded: known models, versions,
        statuses)."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def update_ready(self, table: RoutingTable, models: set[str]) -> None:
        for model in models:
            if table.knows(model):
                self.ready_pods.labels(model).set(len(table.ready(model)))
            else:
                with contextlib.suppress(KeyError):
                    self.ready_pods.remove(model)


def error_response(status: int, message: str, type_: str, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None,
                                   "code": code}}, status_code=status, headers=headers)


class _RequestTooLarge(Exception):
    pass


class _ConnectFailed(Exception):
    """The pod could not be reached: nothing was sent, another pod may be tried."""


class _ClientGone(Exception):
    """The client disconnected while sending its request."""


class _Buffered:
    """A whole upstream response, sent as two ASGI messages (cheaper than a Response)."""

    __slots__ = ("status_code", "headers", "body")

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]],
                 body: bytes) -> None:
        self.status_code, self.headers, self.body = status_code, headers, body

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


class _UpstreamResponse(StreamingResponse):
    """Relays a pod's response as it arrives. ``on_done`` runs once: as soon as the
    upstream body is exhausted (before the client sees the end of the response, so the
    balancer's count is exact for the client's next request), or when the client went away or
    the upstream broke off (``StreamingResponse``'s background task does not run then)."""

    def __init__(self, upstream: UpstreamResponse, endpoint: Endpoint,
                 on_done: Callable[[], None]) -> None:
        super().__init__(self._relay(), status_code=upstream.status)
        self.raw_headers = _response_headers(upstream)
        self._upstream = upstream
        self._endpoint = endpoint
        self._on_done: Callable[[], None] | None = on_done

    async def _relay(self) -> AsyncIterator[bytes]:
        async for chunk in self._upstream.chunks():
            yield chunk
        self._done()

    def _done(self) -> None:
        if self._on_done is not None:
            self._on_done, on_done = None, self._on_done
            on_done()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (TimeoutError, UpstreamError) as e:
            # The pod broke off mid-response (or fell silent): the client's connection is
            # dropped too (no clean end of a truncated body), which the re-raise makes
            # uvicorn do.
            log.warning("upstream %s broke off its response: %s", self._endpoint,
                        type(e).__name__)
            raise
        finally:
            self._done()
            self._upstream.close()  # the connection goes unless the body was read whole


def _response_headers(upstream: UpstreamResponse) -> list[tuple[bytes, bytes]]:
    """The upstream's headers as sent (repeated ones kept), minus those not forwarded."""
    dropped = _NOT_FORWARDED_DOWN
    connection = upstream.header(b"connection")
    if connection is not None:
        dropped = dropped | {t.encode("latin-1")
                             for t in _connection_tokens(connection.decode("latin-1"))}
    return [(name, v) for k, v in upstream.raw_headers if (name := k.lower()) not in dropped]


def _buffered(upstream: UpstreamResponse) -> bool:
    length = upstream.header(b"content-length") or b""
    return (length.isdigit() and int(length) <= BUFFERED_MAX
            and not (upstream.header(b"content-type") or b"").startswith(b"text/event-stream"))


def _connection_tokens(value: str | None) -> frozenset[str]:
    """Headers named in ``Connection`` are hop-by-hop too."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


async def _read_body(receive, length: bytes | None, limit: int) -> bytes:
    """The whole request body from the ASGI ``receive``."""
    if length and length.isdigit() and int(length) > limit:
        raise _RequestTooLarge()
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body
    chunks, size = [body], len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _RequestTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> tuple[dict | None, str | None, str | None]:
    """(payload, model, None) or (None, None, what is wrong with the body)."""
    if not body.strip():
        return None, None, "the request body must be a JSON object with a 'model'"
    try:
        payload = json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError; the body is not echoed
        return None, None, "the request body is not valid JSON"
    if not isinstance(payload, dict):
        return None, None, "the request body must be a JSON object"
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return None, None, ("you must provide a model parameter ('model' must be a non-empty "
                            "string)")
    return payload, model, None


def _model_of(body: bytes) -> tuple[str | None, str | None]:
    """(model, None) or (None, what is wrong with the body)."""
    _, model, problem = _parse(body)
    return model, problem


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def message_key(payload: dict) -> bytes | None:
    """A session key from the conversation's start: the content of up to the first two user
    messages of a chat request, or the first PROMPT_KEY_CHARS characters of a completion's
    prompt. None when there is neither (the request is then not sticky)."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        parts = [_text(m.get("content")) for m in messages
                 if isinstance(m, dict) and m.get("role") == "user"][:2]
        return "\x00".join(parts).encode("utf-8", "surrogatepass") if parts else None
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]
    if prompt is None or prompt == "":
        return None
    return _text(prompt)[:PROMPT_KEY_CHARS].encode("utf-8", "surrogatepass")


class UpstreamPools:
    """A connection pool (:class:`~airfleet_router.upstream.UpstreamPool`) per pod.
    :meth:`prune` closes the pools of endpoints that left the routing table once no request
    uses them, and the other pools' idle connections past their keep-alive."""

    def __init__(self, upstream_timeout: float) -> None:
        self._connect_timeout = min(UPSTREAM_CONNECT_TIMEOUT, upstream_timeout)
        self._read_timeout = upstream_timeout
        self._pools: dict[Endpoint, UpstreamPool] = {}

    def get(self, endpoint: Endpoint) -> UpstreamPool:
        pool = self._pools.get(endpoint)
        if pool is None:
            pool = self._pools[endpoint] = UpstreamPool(
                endpoint, connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout, keepalive=UPSTREAM_KEEPALIVE_EXPIRY)
        return pool

    def __len__(self) -> int:
        """Endpoints with pools."""
        return len(self._pools)

    async def prune(self, live: Collection[Endpoint], busy: Callable[[Endpoint], bool]) -> int:
        """Close the pools of endpoints not in ``live`` and not ``busy``; how many endpoints."""
        gone = [ep for ep in self._pools if ep not in live and not busy(ep)]
        for endpoint in gone:
            await self._pools.pop(endpoint).aclose()
        for pool in self._pools.values():  # and idle connections past their keep-alive
            pool.sweep()
        return len(gone)

    async def aclose(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            await pool.aclose()


class Router:
    """The application: routing table, weights, balancer, metrics, upstream pools, and the
    pod watch, routes watch and load scraper (started in the lifespan).

    The proxied paths are served by :meth:`__call__` straight from ASGI (no Starlette request
    or response objects on the hot path); everything else goes to the Starlette app.
    """

    PROXIED_PATHS = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.table = RoutingTable()
        self.metrics = Metrics()
        self.balancer = Balancer(
            config.load_factor, on_fallback=self._on_fallback)
        self.watcher: PodWatcher | None = None
        self.routes: RoutesWatcher | None = None
        self.pools = UpstreamPools(config.upstream_timeout)
        self._session_header = config.session_header.lower().encode("latin-1")
        self._fallback_logged: set[str] = set()
        routes = [Route(path, self._wrong_method,
                        methods=["GET", "PUT", "PATCH", "DELETE", "OPTIONS"])
                  for path in self.PROXIED_PATHS]
        routes += [Route("/v1/models", self.list_models, methods=["GET"]),
                   Route("/healthz", self.healthz, methods=["GET"]),
                   Route("/metrics", self.prometheus, methods=["GET"])]
        self.app = Starlette(routes=routes, lifespan=self.lifespan,
                             exception_handlers={HTTPException: self._http_error})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" \
                and scope["path"] in self.PROXIED_PATHS:
            response = await self.proxy(scope, receive)
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # trust_env=False: the pod's HTTP(S)_PROXY must not divert traffic to the API server.
        api = httpx.AsyncClient(base_url=self.config.api_url, verify=self.config.api_verify(),
                                trust_env=False)
        self.watcher = PodWatcher(
            self.config, self.table, api,
            on_change=self._on_change,
            on_restart=lambda reason: self.metrics.watch_restarts.labels(reason).inc())
        self.routes = RoutesWatcher(
            self.config, api, on_change=self._on_weights,
            on_invalid=self.metrics.routes_errors.inc,
            on_restart=lambda reason: self.metrics.routes_restarts.labels(reason).inc())
        scraper = Scraper(self.balancer, self.table.scrape_targets,
                          self.config.scrape_interval, self.metrics.scrape_failures.inc)
        tasks = [asyncio.create_task(self.watcher.run(), name="pod-watch"),
                 asyncio.create_task(self.routes.run(), name="routes-watch"),
                 asyncio.create_task(scraper.run(), name="load-scraper"),
                 asyncio.create_task(self._prune_pools(), name="prune-pools")]
        log.info("router serving namespace %s from %s; API %s", self.config.namespace,
                 f"{self.config.host}:{self.config.port}", self.config.api_url)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.pools.aclose()
            await api.aclose()

    async def _prune_pools(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL)
            closed = await self.pools.prune(self.table.endpoints(),
                                            lambda ep: self.balancer.outstanding(ep) > 0)
            if closed:
                log.debug("closed the connection pools of %d departed endpoints", closed)

    def _on_change(self, models: set[str]) -> None:
        self.metrics.update_ready(self.table, models)
        if self.watcher is not None and self.watcher.synced:
            self.metrics.watch_synced.set(1)

    def _on_weights(self, weights) -> None:
        self.balancer.set_weights(weights)
        self._fallback_logged.clear()

    def _on_fallback(self, model: str) -> None:
        self.metrics.weight_fallbacks.labels(model).inc()
        if model not in self._fallback_logged:  # once per model and set of weights
            self._fallback_logged.add(model)
            log.warning("model %s: no version with a weight above 0 has a ready pod; sending "
                        "its requests to any ready pod of the model", model)

    # ---- handlers ----------------------------------------------------------------------------

    async def proxy(self, scope, receive):
        """The ASGI response to a proxied request."""
        headers = scope["headers"]
        length = connection = session = None
        for name, value in headers:
            if name == b"content-length":
                length = value
            elif name == b"connection":
                connection = value
            elif name == self._session_header:
                session = value
        try:
            body = await _read_body(receive, length, MAX_BODY_BYTES)
        except _RequestTooLarge:
            return self._count(UNKNOWN_MODEL, error_response(
                413, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                "invalid_request_error", "request_too_large"))
        except _ClientGone:
            return self._count(UNKNOWN_MODEL, error_response(
                400, "the client disconnected", "invalid_request_error", "invalid_request"))
        payload, model, problem = _parse(body)
        if model is None:
            return self._count(UNKNOWN_MODEL, error_response(
                400, problem, "invalid_request_error", "invalid_request"))
        endpoints = self.table.ready(model)
        if not endpoints:
            if not self.table.knows(model):
                return self._count(UNKNOWN_MODEL, error_response(
                    404, f"The model '{model}' does not exist", "invalid_request_error",
                    "model_not_found"))
            return self._count(model, error_response(
                503, f"no ready endpoint serves model '{model}' yet; retry later",
                "server_error", "no_ready_endpoint",
                headers={"Retry-After": RETRY_AFTER_NO_POD}))

        if session is not None:
            key: bytes | None = b"s\x00" + session
        elif self.config.affinity == "messages":
            key = message_key(payload)
        else:
            key = None
        query = scope.get("query_string", b"")
        path = scope["path"].encode("ascii")  # one of PROXIED_PATHS
        target = path + b"?" + query if query else path
        dropped = _NOT_FORWARDED_UP
        if connection is not None:
            dropped = dropped | {t.encode("latin-1")
                                 for t in _connection_tokens(connection.decode("latin-1"))}
        up_headers = [(k, v) for k, v in headers if k not in dropped]
        versions = self.table.versions(model)
        tried: list[Endpoint] = []
        while len(tried) < 2:  # the chosen pod, then one other on a connect failure
            if not tried:
                endpoint = self.balancer.pick(model, endpoints, key=key, versions=versions)
            else:  # another pod, of the same version if it has one
                endpoint = self.balancer.pick(model, endpoints, exclude=tried,
                                              versions=versions,
                                              prefer_version=versions.get(tried[0], ""))
            if endpoint is None:
                break
            tried.append(endpoint)
            try:
                response = await self._forward(model, endpoint, versions.get(endpoint, ""),
                                               target, up_headers, body)
            except _ConnectFailed:
                continue
            return self._count(model, response)
        return self._count(model, error_response(
            502, f"could not connect to any endpoint serving model '{model}' "
                 f"(tried {len(tried)})", "server_error", "upstream_unreachable"))

    async def _forward(self, model: str, endpoint: Endpoint, version: str, target: bytes,
                       headers: list[tuple[bytes, bytes]], body: bytes):
        """The answer of ``endpoint`` (or our error for its failure); raises
        :class:`_ConnectFailed` when it cannot be reached, i.e. nothing was sent."""
        token = self.balancer.acquire(endpoint)
        relayed = False  # a streamed response releases the endpoint when it is done
        try:
            pool = self.pools.get(endpoint)
            started = time.monotonic()
            try:
                upstream = await pool.post(target, headers, body)
            except UpstreamConnectError as e:
                self.metrics.upstream_connect_failures.labels(model).inc()
                log.warning("model %s: cannot connect to %s (%s)", model, endpoint, e)
                raise _ConnectFailed() from e
            except TimeoutError:
                log.warning("model %s: %s sent no response within %s s", model, endpoint,
                            self.config.upstream_timeout)
                return error_response(
                    504, f"the endpoint serving model '{model}' did not answer in time",
                    "server_error", "upstream_timeout")
            except UpstreamError as e:
                log.warning("model %s: %s failed: %s", model, endpoint, e)
                return error_response(
                    502, f"the endpoint serving model '{model}' failed to answer",
                    "server_error", "upstream_error")
            metrics = self.metrics
            metrics.labelled(metrics.upstream_latency, model).observe(time.monotonic() - started)
            metrics.labelled(metrics.version_requests, model, version).inc()
            if not _buffered(upstream):
                relayed = True
                return _UpstreamResponse(
                    upstream, endpoint,
                    on_done=lambda: self.balancer.release(endpoint, token))
            try:
                content = await upstream.read()
            except (TimeoutError, UpstreamError) as e:
                upstream.close()
                log.warning("model %s: %s broke off its response: %s", model, endpoint,
                            type(e).__name__)
                return error_response(
                    502, f"the endpoint serving model '{model}' broke off its response",
                    "server_error", "upstream_error")
            return _Buffered(upstream.status, _response_headers(upstream), content)
        finally:
            if not relayed:
                self.balancer.release(endpoint, token)

    async def _wrong_method(self, request: Request) -> Response:
        raise HTTPException(405, headers={"Allow": "POST"})

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model, "object": "model", "owned_by": "airfleet"}
            for model in self.table.models()]})

    async def healthz(self, request: Request) -> Response:
        watch = self.watcher.health() if self.watcher else {"state": "starting",
                                                             "synced": False}
        body = {"status": "ok" if watch["synced"] else "starting", "watch": watch,
                "routes": self.routes.health() if self.routes else None,
                **self.table.counts()}
        return JSONResponse(body, status_code=200 if watch["synced"] else 503)

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- helpers -----------------------------------------------------------------------------

    def _count(self, model: str, response):
        self.metrics.labelled(self.metrics.requests, model, str(response.status_code)).inc()
        return response

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), kind,
                              headers=dict(exc.headers or {}))


def create_app(config: RouterConfig) -> Router:
    """The ASGI application."""
    return Router(config)
