"""The engines' own load, read from their Prometheus ``/metrics`` every few seconds.

One task scrapes every ready pod at once (one shared HTTP client, a short timeout) every
``AIRFLEET_ROUTER_SCRAPE_INTERVAL`` seconds, at the container port named ``metrics`` if the
pod declares one, else at its http port. Of the text it reads only these gauges (summed over
their label sets, e.g. one per model name):

============================  ==========================  ====================
meaning                       vLLM                        SGLang
============================  ==========================  ====================
requests running              ``vllm:num_requests_running``  ``sglang:num_running_reqs``
requests waiting              ``vllm:num_requests_waiting``  ``sglang:num_queue_reqs``
kv-cache usage, 0..1          ``vllm:kv_cache_usage_perc``   ``sglang:token_usage``
                              (``vllm:gpu_cache_usage_perc``
                              before vLLM 0.10)
============================  ==========================  ====================

and hands running + waiting and the kv-cache usage to the balancer. A pod whose scrape fails,
or whose page has none of these names, is balanced on this router's requests in flight only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx

from airfleet_router.balancer import Balancer
from airfleet_router.discovery import Endpoint

log = logging.getLogger(__name__)

QUEUED = frozenset({"vllm:num_requests_running", "vllm:num_requests_waiting",
                    "sglang:num_running_reqs", "sglang:num_queue_reqs"})
KV_USAGE = frozenset({"vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
                      "sglang:token_usage"})
PREFIXES = ("vllm:", "sglang:")
MAX_PAGE = 4 * 1024 * 1024  # an engine's page is tens of KiB; do not read a runaway one


def parse_load(text: str) -> tuple[float, float] | None:
    """(running + waiting, kv-cache usage) from a Prometheus text page; None when the page
    has none of the load gauges."""
    queued, kv, found = 0.0, 0.0, False
    for line in text.splitlines():
        if not line.startswith(PREFIXES):
            continue
        if "{" in line:
            name, _, rest = line.partition("{")
            rest = rest.rpartition("}")[2]
        else:
            name, _, rest = line.partition(" ")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = float(parts[0])
        except ValueError:
            continue
        if value != value:  # NaN
            continue
        if name in QUEUED:
            queued += value
            found = True
        elif name in KV_USAGE:
            kv = max(kv, value)
    return (queued, kv) if found else None


class Scraper:
    """Scrapes ``targets()`` (endpoint -> metrics port) every ``interval`` seconds into the
    balancer; ``on_failure()`` counts each failed scrape."""

    def __init__(self, balancer: Balancer, targets: Callable[[], dict[Endpoint, int]],
                 interval: float, on_failure: Callable[[], None] = lambda: None) -> None:
        self.balancer = balancer
        self.targets = targets
        self.interval = interval
        self.on_failure = on_failure
        self._failing: set[Endpoint] = set()

    async def run(self) -> None:
        timeout = httpx.Timeout(max(0.2, min(2.0, self.interval)))
        async with httpx.AsyncClient(timeout=timeout, trust_env=False,
                                     limits=httpx.Limits(max_keepalive_connections=64)) as client:
            while True:
                targets = dict(self.targets())
                self.balancer.forget(targets)
                if targets:
                    await asyncio.gather(*(self._scrape(client, ep, port)
                                           for ep, port in targets.items()))
                await asyncio.sleep(self.interval)

    async def _scrape(self, client: httpx.AsyncClient, endpoint: Endpoint, port: int) -> None:
        url = Endpoint(endpoint.ip, port).url("/metrics")
        try:
            response = await client.get(url)
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            load = parse_load(response.content[:MAX_PAGE].decode("utf-8", "replace"))
        except (httpx.HTTPError, ValueError) as e:
            self.balancer.report(endpoint, None)
            self.on_failure()
            if endpoint not in self._failing:
                self._failing.add(endpoint)
                log.info("cannot scrape the load of %s (%s); balancing it on this router's "
                         "requests in flight", url, type(e).__name__ if str(e) == "" else e)
            return
        self._failing.discard(endpoint)
        if load is None:
            self.balancer.report(endpoint, None)
        else:
            self.balancer.report(endpoint, *load)
