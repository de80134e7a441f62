"""The router's HTTP API (Starlette): OpenAI-compatible inference requests proxied to the pods
serving the requested model, plus ``/v1/models``, ``/healthz`` and ``/metrics``.

A request to ``/v1/chat/completions`` or ``/v1/completions`` is read whole (its JSON names the
model), sent unchanged to one ready pod of that model (see :mod:`airfleet_router.balancer`)
and the pod's answer is relayed as it arrives, byte for byte: Server-Sent Events of a
``"stream": true`` request reach the client chunk by chunk. If the chosen pod refuses the
connection, one other ready pod is tried (the request was not sent, so this is safe for a
POST); nothing is retried once the request has reached a pod.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``. Request bodies
and the ``Authorization`` header are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Collection
from http.cookiejar import CookieJar

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

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024  # base64 images in chat requests make bodies large
UPSTREAM_CONNECT_TIMEOUT = 3.0  # a pod IP that does not answer SYNs: fail over quickly
# Below the 5 s keep-alive of uvicorn (vLLM, SGLang) so we do not reuse a connection the pod
# is closing at that very moment.
UPSTREAM_KEEPALIVE_EXPIRY = 4.0
UPSTREAM_KEEPALIVE_CONNECTIONS = 64  # per pool
POOLS_PER_ENDPOINT = 8  # see UpstreamPools
PRUNE_INTERVAL = 30.0  # seconds between closing the pools of pods that left the table
# A response of known length up to this size is read whole, then sent in one piece: a
# non-streamed completion is useless to the client until complete anyway, and this saves the
# streaming machinery (a task per response) about 0.7 ms per request. Anything longer, of
# unknown length or an event stream is relayed as it arrives.
BUFFERED_MAX = 1024 * 1024
RETRY_AFTER_NO_POD = "5"  # seconds; a pod becoming ready takes longer than that anyway
# Hop-by-hop headers (RFC 9110 7.6.1) are for one connection and never forwarded; Host and
# Content-Length are set again for the upstream request; Date and Server come from our server.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "trailers", "transfer-encoding",
                        "upgrade"})
NOT_FORWARDED_UP = HOP_BY_HOP | {"host", "content-length"}
NOT_FORWARDED_DOWN = HOP_BY_HOP | {"date", "server"}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
UNKNOWN_MODEL = ""  # the model label of requests for no known model (bounded cardinality)


class Metrics:
    """The router's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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


class _NoCookies(CookieJar):
    """httpx clients keep the cookies responses set and send them with later requests: in a
    proxy shared by every client, that hands one user's cookie to the next. Keep none."""

    def extract_cookies(self, response, request) -> None:
        pass

    def set_cookie(self, cookie) -> None:
        pass


class _UpstreamResponse(StreamingResponse):
    """Relays an httpx streamed response as it arrives. ``on_done`` runs once: as soon as the
    upstream body is exhausted (before the client sees the end of the response, so the
    balancer's count is exact for the client's next request), or when the client went away or
    the upstream broke off (``StreamingResponse``'s background task does not run then)."""

    def __init__(self, upstream: httpx.Response, endpoint: Endpoint,
                 on_done: Callable[[], None]) -> None:
        super().__init__(self._relay(), status_code=upstream.status_code)
        self.raw_headers = _response_headers(upstream)
        self._upstream = upstream
        self._endpoint = endpoint
        self._on_done: Callable[[], None] | None = on_done

    async def _relay(self) -> AsyncIterator[bytes]:
        async for chunk in self._upstream.aiter_raw():
            yield chunk
        self._done()

    def _done(self) -> None:
        if self._on_done is not None:
            self._on_done, on_done = None, self._on_done
            on_done()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except httpx.HTTPError as e:
            # The pod broke off mid-response: the client's connection is dropped too (no
            # clean end of a truncated body), which is what the re-raise makes uvicorn do.
            log.warning("upstream %s broke off its response: %s", self._endpoint,
                        type(e).__name__)
            raise
        finally:
            self._done()
            await self._upstream.aclose()


def _response_headers(upstream: httpx.Response) -> list[tuple[bytes, bytes]]:
    """The upstream's headers as sent (repeated ones kept), minus those not forwarded."""
    dropped = NOT_FORWARDED_DOWN | _connection_tokens(upstream.headers.get("connection"))
    return [(k.lower(), v) for k, v in upstream.headers.raw
            if k.lower().decode("latin-1") not in dropped]


def _buffered(upstream: httpx.Response) -> bool:
    length = upstream.headers.get("content-length", "")
    return (length.isdigit() and int(length) <= BUFFERED_MAX
            and not upstream.headers.get("content-type", "").startswith("text/event-stream"))


def _connection_tokens(value: str | None) -> frozenset[str]:
    """Headers named in ``Connection`` are hop-by-hop too."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise _RequestTooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _RequestTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def _model_of(body: bytes) -> tuple[str | None, str | None]:
    """(model, None) or (None, what is wrong with the body)."""
    if not body.strip():
        return None, "the request body must be a JSON object with a 'model'"
    try:
        payload = json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError; the body is not echoed
        return None, "the request body is not valid JSON"
    if not isinstance(payload, dict):
        return None, "the request body must be a JSON object"
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return None, "you must provide a model parameter ('model' must be a non-empty string)"
    return model, None


class UpstreamPools:
    """httpx clients (each one connection pool) for the pods: POOLS_PER_ENDPOINT per endpoint,
    used in turn.

    httpx 0.28's pool re-examines every connection it holds whenever a request starts or ends
    (a socket probe per idle one, and a count of all connections per idle one: quadratic), so
    its cost per request grows with the connections in the pool (encode/httpx#3215). Pools per
    pod bound that by the pod's own concurrency, and splitting each pod's connections over a
    few pools divides it again: with 32 requests in flight to one pod, 8 pools halve the
    router's CPU per request and double its throughput. :meth:`prune` closes the pools of
    endpoints that left the routing table once no request uses them.
    """

    def __init__(self, upstream_timeout: float) -> None:
        self._timeout = httpx.Timeout(upstream_timeout,
                                      connect=min(UPSTREAM_CONNECT_TIMEOUT, upstream_timeout))
        # Pods are reached over plain http; one context for all clients spares each new client
        # loading the CA bundle (httpx builds a context per client otherwise).
        self._ssl = ssl.create_default_context()
        self._clients: dict[Endpoint, list[httpx.AsyncClient | None]] = {}
        self._turn = 0

    def get(self, endpoint: Endpoint) -> httpx.AsyncClient:
        clients = self._clients.get(endpoint)
        if clients is None:
            clients = self._clients[endpoint] = [None] * POOLS_PER_ENDPOINT
        self._turn = (self._turn + 1) % POOLS_PER_ENDPOINT
        client = clients[self._turn]
        if client is None:
            client = clients[self._turn] = self._new_client()
        return client

    def __len__(self) -> int:
        """Endpoints with pools."""
        return len(self._clients)

    def _new_client(self) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            timeout=self._timeout, verify=self._ssl,
            # No cap on connections: the inference server queues requests itself, a second
            # queue here would only add pool timeouts.
            limits=httpx.Limits(max_connections=None,
                                max_keepalive_connections=UPSTREAM_KEEPALIVE_CONNECTIONS,
                                keepalive_expiry=UPSTREAM_KEEPALIVE_EXPIRY),
            # trust_env=False: the pod's HTTP(S)_PROXY must not divert traffic to pod IPs.
            trust_env=False, follow_redirects=False, cookies=_NoCookies())
        # httpx adds Accept, Accept-Encoding and User-Agent to every request; the client's own
        # headers (or their absence) must reach the pod unchanged.
        for name in ("accept", "accept-encoding", "user-agent"):
            del client.headers[name]
        return client

    async def prune(self, live: Collection[Endpoint], busy: Callable[[Endpoint], bool]) -> int:
        """Close the pools of endpoints not in ``live`` and not ``busy``; how many endpoints."""
        gone = [ep for ep in self._clients if ep not in live and not busy(ep)]
        for endpoint in gone:
            for client in self._clients.pop(endpoint):
                if client is not None:
                    await client.aclose()
        return len(gone)

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for pools in clients.values():
            for client in pools:
                if client is not None:
                    await client.aclose()


class Router:
    """The application: routing table, balancer, metrics, upstream pools, and the pod watch
    (started in the lifespan)."""

    PROXIED_PATHS = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.table = RoutingTable()
        self.balancer = Balancer()
        self.metrics = Metrics()
        self.watcher: PodWatcher | None = None
        self.pools = UpstreamPools(config.upstream_timeout)
        routes = [Route(path, self.proxy, methods=["POST"]) for path in self.PROXIED_PATHS]
        routes += [Route("/v1/models", self.list_models, methods=["GET"]),
                   Route("/healthz", self.healthz, methods=["GET"]),
                   Route("/metrics", self.prometheus, methods=["GET"])]
        self.app = Starlette(routes=routes, lifespan=self.lifespan,
                             exception_handlers={HTTPException: self._http_error})

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # trust_env=False: the pod's HTTP(S)_PROXY must not divert traffic to the API server.
        api = httpx.AsyncClient(base_url=self.config.api_url, verify=self.config.api_verify(),
                                trust_env=False)
        self.watcher = PodWatcher(
            self.config, self.table, api,
            on_change=self._on_change,
            on_restart=lambda reason: self.metrics.watch_restarts.labels(reason).inc())
        tasks = [asyncio.create_task(self.watcher.run(), name="pod-watch"),
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

    # ---- handlers ----------------------------------------------------------------------------

    async def proxy(self, request: Request) -> Response:
        try:
            body = await _read_body(request, MAX_BODY_BYTES)
        except _RequestTooLarge:
            return self._count(UNKNOWN_MODEL, error_response(
                413, f"the request body is larger than {MAX_BODY_BYTES} bytes",
                "invalid_request_error", "request_too_large"))
        model, problem = _model_of(body)
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

        query = request.scope.get("query_string", b"").decode("latin-1")
        target = request.scope["path"] + (f"?{query}" if query else "")
        dropped = NOT_FORWARDED_UP | _connection_tokens(request.headers.get("connection"))
        headers = [(k, v) for k, v in request.headers.raw
                   if k.decode("latin-1") not in dropped]
        tried: list[Endpoint] = []
        while len(tried) < 2:  # the chosen pod, then one other on a connect failure
            endpoint = self.balancer.pick(model, endpoints, exclude=tried)
            if endpoint is None:
                break
            tried.append(endpoint)
            try:
                response = await self._forward(model, endpoint, request.method, target,
                                               headers, body)
            except _ConnectFailed:
                continue
            return self._count(model, response)
        return self._count(model, error_response(
            502, f"could not connect to any endpoint serving model '{model}' "
                 f"(tried {len(tried)})", "server_error", "upstream_unreachable"))

    async def _forward(self, model: str, endpoint: Endpoint, method: str, target: str,
                       headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
        """The answer of ``endpoint`` (or our error for its failure); raises
        :class:`_ConnectFailed` when it cannot be reached, i.e. nothing was sent."""
        self.balancer.acquire(endpoint)
        relayed = False  # a streamed response releases the endpoint when it is done
        try:
            client = self.pools.get(endpoint)
            started = time.monotonic()
            try:
                upstream = await client.send(
                    client.build_request(method, endpoint.url(target), headers=headers,
                                         content=body),
                    stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                self.metrics.upstream_connect_failures.labels(model).inc()
                log.warning("model %s: cannot connect to %s (%s)", model, endpoint,
                            type(e).__name__)
                raise _ConnectFailed() from e
            except httpx.TimeoutException:
                log.warning("model %s: %s sent no response within %s s", model, endpoint,
                            self.config.upstream_timeout)
                return error_response(
                    504, f"the endpoint serving model '{model}' did not answer in time",
                    "server_error", "upstream_timeout")
            except httpx.HTTPError as e:
                log.warning("model %s: %s failed: %s", model, endpoint, type(e).__name__)
                return error_response(
                    502, f"the endpoint serving model '{model}' failed to answer",
                    "server_error", "upstream_error")
            self.metrics.upstream_latency.labels(model).observe(time.monotonic() - started)
            if not _buffered(upstream):
                relayed = True
                return _UpstreamResponse(upstream, endpoint,
                                         on_done=lambda: self.balancer.release(endpoint))
            try:  # raw: a compressed body stays compressed, as its headers say
                content = b"".join([chunk async for chunk in upstream.aiter_raw()])
            except httpx.HTTPError as e:
                log.warning("model %s: %s broke off its response: %s", model, endpoint,
                            type(e).__name__)
                return error_response(
                    502, f"the endpoint serving model '{model}' broke off its response",
                    "server_error", "upstream_error")
            finally:
                await upstream.aclose()
            response = Response(content, status_code=upstream.status_code)
            response.raw_headers = _response_headers(upstream)
            return response
        finally:
            if not relayed:
                self.balancer.release(endpoint)

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model, "object": "model", "owned_by": "airfleet"}
            for model in self.table.models()]})

    async def healthz(self, request: Request) -> Response:
        watch = self.watcher.health() if self.watcher else {"state": "starting",
                                                             "synced": False}
        body = {"status": "ok" if watch["synced"] else "starting", "watch": watch,
                **self.table.counts()}
        return JSONResponse(body, status_code=200 if watch["synced"] else 503)

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- helpers -----------------------------------------------------------------------------

    def _count(self, model: str, response: Response) -> Response:
        self.metrics.requests.labels(model, str(response.status_code)).inc()
        return response

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), kind,
                              headers=dict(exc.headers or {}))


def create_app(config: RouterConfig) -> Starlette:
    return Router(config).app
