"""The router's routing rules in isolation (router/airfleet_router): the weights' parser, smooth
weighted round-robin, session buckets, consistent hashing with bounded loads, the load from
engine reports, the engines' /metrics parser, the session key, and the pod's version, served
model and metrics port."""

from __future__ import annotations

import json

import pytest

from tests.router_support import pod

# tests.router_support puts router/ on sys.path: it must come first.
# isort: off
from airfleet_router.app import message_key
from airfleet_router.balancer import Balancer
from airfleet_router.discovery import Endpoint, RoutingTable, pod_route
from airfleet_router.routes import RoutesError, parse_routes
from airfleet_router.scraper import parse_load
# isort: on

V1 = (Endpoint("10.0.0.1", 8000), Endpoint("10.0.0.2", 8000))
V2 = (Endpoint("10.0.0.3", 8000),)
EPS = V1 + V2
VERSIONS = {**dict.fromkeys(V1, "v1"), **dict.fromkeys(V2, "v2")}


def version_of(balancer: Balancer, **kw) -> str:
    return VERSIONS[balancer.pick("m", EPS, versions=VERSIONS, **kw)]


# ---- weights ---------------------------------------------------------------------------------

def test_parse_routes():
    assert parse_routes('{"models": {"org/m": {"v1": 90, "v2": 10}}}') == \
        {"org/m": {"v1": 90, "v2": 10}}
    assert parse_routes("{}") == {}


@pytest.mark.parametrize("text", ["{", "[]", '{"models": []}', '{"models": {"m": 3}}',
                                  '{"models": {"m": {"v1": 101}}}',
                                  '{"models": {"m": {"v1": -1}}}',
                                  '{"models": {"m": {"v1": 1.5}}}',
                                  '{"models": {"m": {"v1": true}}}'])
def test_parse_routes_rejects(text):
    with pytest.raises(RoutesError):
        parse_routes(text)


def test_smooth_weighted_round_robin_is_exact_in_every_window():
    balancer = Balancer()
    balancer.set_weights({"m": {"v1": 90, "v2": 10}})
    picks = [version_of(balancer) for _ in range(1000)]
    assert picks.count("v1") == 900
    for i in range(0, 1000, 10):
        assert picks[i:i + 10].count("v2") == 1


def test_smooth_weighted_round_robin_interleaves():
    balancer = Balancer()
    balancer.set_weights({"m": {"v1": 2, "v2": 1}})
    assert [version_of(balancer) for _ in range(6)] == ["v1", "v2", "v1"] * 2


def test_unmapped_model_and_unnamed_version():
    balancer = Balancer()
    balancer.set_weights({"m": {"v1": 100}})  # v2 unnamed: weight 0
    assert {version_of(balancer) for _ in range(20)} == {"v1"}
    balancer.set_weights({"other": {"v2": 100}})  # m not mapped: all pods equal
    assert {balancer.pick("m", EPS, versions=VERSIONS) for _ in range(6)} == set(EPS)


def test_fallback_when_no_weighted_version_is_ready():
    fell_back = []
    balancer = Balancer(on_fallback=fell_back.append)
    balancer.set_weights({"m": {"v1": 0, "v2": 100}})
    assert balancer.pick("m", V1, versions=VERSIONS) in V1
    assert fell_back == ["m"]


def test_session_bucket_keeps_its_version_and_follows_the_weights():
    balancer = Balancer()
    balancer.set_weights({"m": {"v1": 70, "v2": 30}})
    keys = [f"session-{i}".encode() for i in range(2000)]
    first = {k: version_of(balancer, key=k) for k in keys}
    assert all(version_of(balancer, key=k) == first[k] for k in keys[:100])
    share = list(first.values()).count("v1") / len(keys)
    assert 0.65 <= share <= 0.75, share


def test_retry_prefers_the_same_version():
    balancer = Balancer()
    balancer.set_weights({"m": {"v1": 100}})
    picked = balancer.pick("m", EPS, exclude=[V1[0]], versions=VERSIONS, prefer_version="v1")
    assert picked == V1[1]
    assert balancer.pick("m", EPS, exclude=list(V1), versions=VERSIONS,
                         prefer_version="v1") == V2[0]


# ---- bounded-load consistent hashing ---------------------------------------------------------

def test_key_sticks_while_loads_are_even_and_spills_when_overloaded():
    balancer = Balancer(load_factor=1.25)
    home = balancer.pick("m", V1, key=b"s1")
    assert {balancer.pick("m", V1, key=b"s1") for _ in range(10)} == {home}
    other = V1[1] if home == V1[0] else V1[0]
    balancer.report(home, 4)  # total 4 over 2 pods: bound ceil(1.25 * 5 / 2) = 4
    assert balancer.pick("m", V1, key=b"s1") == other
    balancer.report(home, 1)  # bound ceil(1.25 * 2 / 2) = 2 > 1: back home
    assert balancer.pick("m", V1, key=b"s1") == home


def test_keys_spread_over_the_ring():
    balancer = Balancer()
    eps = [Endpoint(f"10.0.1.{i}", 8000) for i in range(4)]
    counts = {ep: 0 for ep in eps}
    for i in range(4000):
        counts[balancer.pick("m", eps, key=f"k{i}".encode())] += 1
    assert min(counts.values()) > 600, counts


# ---- load from engine reports ----------------------------------------------------------------

def test_load_is_the_report_plus_what_was_sent_since():
    balancer = Balancer()
    a, b = V1
    balancer.report(a, 5)
    balancer.report(b, 0)
    assert balancer.pick("m", V1) == b
    token = balancer.acquire(b)
    assert balancer.load(b) == 1
    balancer.release(b, token)
    assert balancer.load(b) == 0
    token = balancer.acquire(b)
    balancer.report(b, 1)  # the engine counts it now...
    balancer.release(b, token)  # ...and it finished since: not counted twice nor kept
    assert balancer.load(b) == 0
    balancer.report(a, None)  # a failed scrape: in flight only
    assert balancer.load(a) == 0


def test_kv_cache_usage_breaks_ties():
    balancer = Balancer()
    a, b = V1
    balancer.report(a, 2, 0.9)
    balancer.report(b, 2, 0.1)
    assert {balancer.pick("m", V1) for _ in range(4)} == {b}


# ---- the engines' /metrics -------------------------------------------------------------------

VLLM = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="org/m"} 3.0
vllm:num_requests_running{engine="1",model_name="org/m"} 1.0
vllm:num_requests_waiting{engine="0",model_name="org/m"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="org/m"} 0.42
vllm:prompt_tokens_total{model_name="org/m"} 1234.0
"""
SGLANG = """sglang:num_running_reqs{model_name="m"} 4.0 1700000000000
sglang:num_queue_reqs{model_name="m"} 6.0
sglang:token_usage{model_name="m"} 0.28
"""


def test_parse_load_vllm_and_sglang():
    assert parse_load(VLLM) == (6.0, 0.42)
    assert parse_load(SGLANG) == (10.0, 0.28)
    assert parse_load("process_cpu_seconds_total 1.0\n") is None
    assert parse_load("vllm:num_requests_running{a=\"}\"} NaN\n") is None


# ---- the request's session key ---------------------------------------------------------------

def test_message_key():
    one = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}
    two = {"messages": [*one["messages"], {"role": "assistant", "content": "x"},
                        {"role": "user", "content": "b"}]}
    three = {"messages": [*two["messages"], {"role": "user", "content": "c"}]}
    assert message_key(one) != message_key(two) == message_key(three)
    assert message_key({"messages": []}) is None
    assert message_key({"prompt": "p" * 300}) == message_key({"prompt": "p" * 256 + "q"})
    assert message_key({"prompt": ["x", "y"]}) == message_key({"prompt": "x"})
    assert message_key({"model": "m"}) is None


# ---- the pod ---------------------------------------------------------------------------------

def test_pod_served_model_version_and_metrics_port():
    route = pod_route(pod("p", "org-m", 9000, version="v2", served_model="org/m",
                          metrics_port=9100))
    assert (route.model, route.version, route.metrics_port) == ("org/m", "v2", 9100)
    plain = pod_route(pod("q", "m", 9000))
    assert (plain.model, plain.version, plain.metrics_port) == ("m", "", 9000)
    table = RoutingTable()
    assert table.replace([pod("p", "org-m", 9000, version="v2", served_model="org/m"),
                          pod("q", "org-m", 9001, version="v1", served_model="org/m")]) \
        == {"org/m"}
    assert table.versions("org/m") == {Endpoint("127.0.0.1", 9000): "v2",
                                       Endpoint("127.0.0.1", 9001): "v1"}
    relabelled = json.loads(json.dumps(pod("q", "org-m", 9001, version="v3",
                                           served_model="org/m")))
    assert table.apply("MODIFIED", relabelled) == {"org/m"}  # a version change is a change
