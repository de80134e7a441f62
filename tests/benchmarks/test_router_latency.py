"""Benchmark: the latency the router adds to an inference request, and its throughput. Prints
the figures and writes them to ``tests/benchmarks/results/router_latency.json``; it asserts
nothing about time.

One mock engine (include/airfleet_mock_engine, the project's stand-in for vLLM: uvicorn +
Starlette echoing the prompt, no latency per token, no model behind it) on loopback, the router as a real process
(``python -m airfleet_router``, default settings: no access log) finding it through the fake
Kubernetes API. The same client calls the upstream directly and through the router, in
alternating rounds so drift hits both sides alike:

- sequential: one request at a time on one keep-alive connection (the added latency per
  request: router p50/p99 minus direct p50/p99);
- concurrent: 32 and 128 requests in flight (asyncio, one connection each), requests per
  second and errors. The load comes from aiohttp (pinned in constraints.txt): an httpx 0.28
  AsyncClient tops out at about 300 requests/s with 32 in flight on this machine
  (encode/httpx#3215), so it would measure itself, not the router;
- weighted split: a second mock engine as version v2 of another model, the ConfigMap
  ``airfleet-routes`` giving v1/v2 90/10, 2,000 sequential requests: the share of v1 and its
  error in percentage points.

The client, the router and the upstream share this machine's CPUs, so the concurrent figures
are a floor for the router on a core of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import pytest

from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.router_support import MockEngine, RouterProcess, pod, wait_http

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "benchmarks" / "results" / "router_latency.json"
NS = "airfleet-bench"
MODEL = "bench-model"
SEQUENTIAL = 2000  # per side, in ROUNDS alternating rounds
CONCURRENT = 4000
IN_FLIGHT = (32, 128)
SPLIT_MODEL = "bench-canary"
SPLIT_REQUESTS = 2000
SPLIT_WEIGHTS = {"v1": 90, "v2": 10}
ROUNDS = 2
WARMUP = 200
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _sequential(base: str, n: int) -> tuple[list[float], float]:
    """Latencies (s) of ``n`` requests one after another, and the wall time."""
    latencies = []
    with httpx.Client(base_url=base, trust_env=False, timeout=30) as client:
        started = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            response = client.post("/v1/chat/completions", json=BODY)
            latencies.append(time.perf_counter() - t)
            if response.status_code != 200:
                raise AssertionError(f"{base}: {response.status_code} {response.text}")
        return latencies, time.perf_counter() - started


def _concurrent(base: str, n: int, in_flight: int) -> tuple[list[float], float, int]:
    """Latencies of the successful requests, the wall time, and the errors (a status other
    than 200 or a failed connection)."""
    async def run() -> tuple[list[float], float, int]:
        latencies: list[float] = []
        errors = 0
        left = iter(range(n))
        connector = aiohttp.TCPConnector(limit=in_flight)
        async with aiohttp.ClientSession(base, connector=connector, trust_env=False) as client:
            async def worker() -> None:
                nonlocal errors
                for _ in left:
                    t = time.perf_counter()
                    try:
                        async with client.post("/v1/chat/completions", json=BODY) as response:
                            await response.read()
                    except aiohttp.ClientError:
                        errors += 1
                        continue
                    if response.status != 200:
                        errors += 1
                        continue
                    latencies.append(time.perf_counter() - t)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(in_flight)))
            return latencies, time.perf_counter() - started, errors

    return asyncio.run(run())


def _figures(latencies: list[float], wall: float, errors: int = 0) -> dict:
    return {"p50_ms": _percentile(latencies, 0.5) * 1000,
            "p99_ms": _percentile(latencies, 0.99) * 1000,
            "mean_ms": statistics.fmean(latencies) * 1000,
            "rps": len(latencies) / wall, "errors": errors}


def _compare(measure, direct_url: str, router_url: str, n: int) -> dict:
    sides: dict[str, tuple[list[float], float, int]] = {"direct": ([], 0.0, 0),
                                                        "router": ([], 0.0, 0)}
    for _ in range(ROUNDS):
        for side, url in (("direct", direct_url), ("router", router_url)):
            latencies, wall, *errors = measure(url, n // ROUNDS)
            old = sides[side]
            sides[side] = (old[0] + latencies, old[1] + wall, old[2] + sum(errors))
    out = {side: _figures(*values) for side, values in sides.items()}
    out["added_p50_ms"] = out["router"]["p50_ms"] - out["direct"]["p50_ms"]
    out["added_p99_ms"] = out["router"]["p99_ms"] - out["direct"]["p99_ms"]
    out["router_share_of_direct_rps"] = out["router"]["rps"] / out["direct"]["rps"]
    return out


def _split(router_url: str) -> dict:
    """v1's share of SPLIT_REQUESTS unkeyed requests to the weighted model."""
    served: dict[str, int] = {}
    with httpx.Client(base_url=router_url, trust_env=False, timeout=30) as client:
        for _ in range(SPLIT_REQUESTS):
            response = client.post("/v1/chat/completions",
                                   json={"model": SPLIT_MODEL, "max_tokens": 1,
                                         # no user message: no session key, not sticky
                                         "messages": [{"role": "system", "content": "hi"}]})
            response.raise_for_status()
            name = response.headers["x-airfleet-engine"]
            served[name] = served.get(name, 0) + 1
    share = served.get("bench", 0) / SPLIT_REQUESTS
    want = SPLIT_WEIGHTS["v1"] / sum(SPLIT_WEIGHTS.values())
    return {"requests": SPLIT_REQUESTS, "weights": SPLIT_WEIGHTS, "served": served,
            "v1_share": share, "error_pp": abs(share - want) * 100}


def test_router_latency(tmp_path):
    with FakeKubeAPIServer() as kube:
        upstream = MockEngine("bench", MODEL, SPLIT_MODEL)
        canary = MockEngine("canary", SPLIT_MODEL)
        token = tmp_path / "token"
        token.write_text(kube.token)
        router = RouterProcess(tmp_path / "router.log", api_url=kube.url, namespace=NS,
                               token_file=token)
        try:
            upstream.wait()
            canary.wait()
            router.wait_synced()
            kube.create(pod("bench-0", MODEL, upstream.port, namespace=NS))
            kube.create(pod("split-v1", SPLIT_MODEL, upstream.port, namespace=NS,
                            version="v1"))
            kube.create(pod("split-v2", SPLIT_MODEL, canary.port, namespace=NS,
                            version="v2"))
            kube.create({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "airfleet-routes", "namespace": NS},
                         "data": {"routes.json": json.dumps(
                             {"models": {SPLIT_MODEL: SPLIT_WEIGHTS}})}})
            wait_http(f"{router.url}/v1/models", ok=lambda r: len(r.json()["data"]) == 2)
            wait_http(f"{router.url}/healthz",
                      ok=lambda r: (r.json().get("routes") or {}).get("models") == 1)
            _sequential(upstream.url, WARMUP)
            _sequential(router.url, WARMUP)
            sequential = _compare(_sequential, upstream.url, router.url, SEQUENTIAL)
            concurrent = {n: _compare(lambda url, k, n=n: _concurrent(url, k, n),
                                      upstream.url, router.url, CONCURRENT)
                          for n in IN_FLIGHT}
            split = _split(router.url)
        finally:
            router.stop()
            upstream.stop()
            canary.stop()

    figures = {
        "unit": "milliseconds; rps = requests per second",
        "sequential": {"requests_per_side": SEQUENTIAL, **sequential},
        **{f"concurrent_{n}": {"requests_per_side": CONCURRENT, "in_flight": n, **data}
           for n, data in concurrent.items()},
        "weighted_split": split,
        "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "machine": platform.machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")

    print(f"\nRouter latency (one mock engine on loopback, {os.cpu_count()} CPUs shared by "
          f"client, router and upstream):")
    phases = [("sequential", 1, sequential),
              *((f"concurrent_{n}", n, data) for n, data in concurrent.items())]
    for phase, in_flight, data in phases:
        print(f"  {in_flight} in flight, {figures[phase]['requests_per_side']} requests per "
              f"side:")
        for side in ("direct", "router"):
            d = data[side]
            print(f"    {side:7s} p50 {d['p50_ms']:6.2f} ms  p99 {d['p99_ms']:6.2f} ms  "
                  f"{d['rps']:8.0f} req/s  {d['errors']} errors")
        print(f"    added   p50 {data['added_p50_ms']:6.2f} ms  p99 {data['added_p99_ms']:6.2f} ms"
              f"  router at {data['router_share_of_direct_rps']:.0%} of direct req/s")
    print(f"  weighted split {SPLIT_WEIGHTS}, {SPLIT_REQUESTS} requests: v1 share "
          f"{split['v1_share']:.2%} (error {split['error_pp']:.2f} pp), served {split['served']}")
    print(f"  written to {RESULTS.relative_to(ROOT)}")
