"""The router's pure logic: pod -> routing table, watch events, the balancer, the request's
model, and its configuration. The watch loop is driven here by a scripted API (httpx's
MockTransport); tests/integration/test_router.py runs the real router against a fake API
server and real upstreams."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from tests.router_support import pod

# tests.router_support puts router/ on sys.path: it must come first.
# isort: off
from airfleet_router import config
from airfleet_router.app import (
    UpstreamPools,
    _connection_tokens,
    _model_of,
)
from airfleet_router.balancer import Balancer
from airfleet_router.discovery import (
    Backoff,
    Endpoint,
    PodWatcher,
    RoutingTable,
    pod_route,
)
# isort: on

NS = "airfleet-test"


def with_(obj: dict, **changes) -> dict:
    """A copy of a pod with ``metadata``/``status`` keys changed (``status_conditions=...``)."""
    out = json.loads(json.dumps(obj))
    for key, value in changes.items():
        section, field = key.split("__")
        out[section][field] = value
    return out


# ---- one pod ---------------------------------------------------------------------------------

def test_ready_pod_routes_to_its_http_port():
    route = pod_route(pod("llama-0", "llama", 9001))
    assert route.model == "llama"
    assert route.endpoint == Endpoint("127.0.0.1", 9001)


@pytest.mark.parametrize("change, reason", [
    ({"status__conditions": [{"type": "Ready", "status": "False"}]}, "not ready"),
    ({"status__conditions": []}, "not ready"),
    ({"status__conditions": [{"type": "ContainersReady", "status": "True"}]}, "not ready"),
    ({"status__podIP": None}, "no pod IP"),
    ({"metadata__deletionTimestamp": "2026-01-01T00:00:00Z"}, "terminating"),
])
def test_pod_not_routable(change, reason):
    route = pod_route(with_(pod("p", "m", 9000), **change))
    assert route.endpoint is None
    assert route.model == "m"
    assert route.reason == reason


def test_pod_without_model_label_is_not_routable():
    route = pod_route(pod("p", None, 9000))
    assert route.endpoint is None and route.model is None
    assert "airfleet.io/model" in route.reason


def test_port_is_the_container_port_named_http_in_any_container():
    p = pod("p", "m", 9000, port_name="metrics")
    p["spec"]["containers"].append({"name": "sidecar", "ports": [
        {"name": "grpc", "containerPort": 9100}, {"name": "http", "containerPort": 9200}]})
    assert pod_route(p).endpoint == Endpoint("127.0.0.1", 9200)


def test_port_from_annotation_when_no_http_port():
    p = pod("p", "m", 9000, port_name="grpc", annotations={"airfleet.io/port": "7000"})
    assert pod_route(p).endpoint == Endpoint("127.0.0.1", 7000)


def test_port_defaults_to_8000():
    p = pod("p", "m", 9000)
    p["spec"]["containers"][0].pop("ports")
    assert pod_route(p).endpoint == Endpoint("127.0.0.1", 8000)


@pytest.mark.parametrize("bad", ["http", "0", "70000", ""])
def test_bad_port_annotation_is_not_routed(bad):
    p = pod("p", "m", 9000, port_name="grpc", annotations={"airfleet.io/port": bad})
    route = pod_route(p)
    assert route.endpoint is None and "airfleet.io/port" in route.reason


def test_endpoint_url_brackets_ipv6():
    assert Endpoint("10.0.0.7", 8000).url("/v1/models") == "http://10.0.0.7:8000/v1/models"
    assert Endpoint("fd00::7", 8000).url("/v1/x?a=1") == "http://[fd00::7]:8000/v1/x?a=1"


def test_pod_with_missing_sections_does_not_raise():
    assert pod_route({"metadata": {"name": "bare"}}).endpoint is None
    assert pod_route({}).endpoint is None


# ---- the table -------------------------------------------------------------------------------

def test_list_builds_model_to_ready_endpoints():
    table = RoutingTable()
    changed = table.replace([pod("a-0", "a", 9001), pod("a-1", "a", 9002),
                             pod("b-0", "b", 9003, ready=False), pod("x", None, 9004)])
    assert changed == {"a", "b"}
    assert table.ready("a") == (Endpoint("127.0.0.1", 9001), Endpoint("127.0.0.1", 9002))
    assert table.ready("b") == ()
    assert table.models() == ["a"]
    assert table.knows("b") and not table.knows("c")
    assert table.counts() == {"pods": 4, "ready_pods": 2, "models": 1}


def test_events_add_modify_delete():
    table = RoutingTable()
    table.replace([])
    assert table.apply("ADDED", pod("a-0", "a", 9001, ready=False)) == {"a"}  # now known
    assert table.ready("a") == () and table.knows("a")
    assert table.apply("MODIFIED", pod("a-0", "a", 9001)) == {"a"}
    assert table.ready("a") == (Endpoint("127.0.0.1", 9001),)
    assert table.apply("MODIFIED", pod("a-0", "a", 9001)) == set()  # nothing new
    assert table.apply("ADDED", pod("a-1", "a", 9002)) == {"a"}
    assert len(table.ready("a")) == 2
    terminating = with_(pod("a-0", "a", 9001), metadata__deletionTimestamp="2026-01-01T00:00:00Z")
    assert table.apply("MODIFIED", terminating) == {"a"}
    assert table.ready("a") == (Endpoint("127.0.0.1", 9002),)
    assert table.apply("DELETED", terminating) == set()
    assert table.apply("DELETED", pod("a-1", "a", 9002)) == {"a"}
    assert table.ready("a") == () and not table.knows("a") and table.models() == []


def test_unknown_event_types_change_nothing():
    table = RoutingTable()
    table.replace([pod("a-0", "a", 9001)])
    assert table.apply("BOOKMARK", {"metadata": {"resourceVersion": "9"}}) == set()
    assert table.apply("ERROR", {"code": 500}) == set()
    assert table.models() == ["a"]


def test_relist_drops_pods_missed_while_not_watching():
    table = RoutingTable()
    table.replace([pod("a-0", "a", 9001), pod("b-0", "b", 9002)])
    changed = table.replace([pod("b-0", "b", 9002), pod("c-0", "c", 9003)])
    assert changed == {"a", "c"}
    assert table.models() == ["b", "c"] and not table.knows("a")


def test_model_relabel_moves_the_pod():
    table = RoutingTable()
    table.replace([pod("p", "a", 9001)])
    assert table.apply("MODIFIED", pod("p", "b", 9001)) == {"a", "b"}
    assert table.models() == ["b"] and not table.knows("a")


def test_endpoints_of_every_model():
    table = RoutingTable()
    table.replace([pod("a-0", "a", 9001), pod("b-0", "b", 9002),
                   pod("b-1", "b", 9003, ready=False)])
    assert table.endpoints() == {Endpoint("127.0.0.1", 9001), Endpoint("127.0.0.1", 9002)}


def test_two_pods_on_one_address_count_once():
    table = RoutingTable()
    table.replace([pod("p", "a", 9001), pod("q", "a", 9001)])
    assert table.ready("a") == (Endpoint("127.0.0.1", 9001),)
    table.apply("DELETED", pod("p", "a", 9001))
    assert table.ready("a") == (Endpoint("127.0.0.1", 9001),)


# ---- the balancer ----------------------------------------------------------------------------

EPS = (Endpoint("10.0.0.1", 8000), Endpoint("10.0.0.2", 8000), Endpoint("10.0.0.3", 8000))


def test_idle_endpoints_take_turns():
    balancer = Balancer()
    picks = [balancer.pick("m", EPS) for _ in range(6)]
    assert picks == list(EPS) * 2


def test_least_outstanding_wins_over_the_turn():
    balancer = Balancer()
    balancer.acquire(EPS[0])
    balancer.acquire(EPS[0])
    balancer.acquire(EPS[1])
    assert {balancer.pick("m", EPS) for _ in range(5)} == {EPS[2]}
    balancer.acquire(EPS[2])
    balancer.acquire(EPS[2])
    assert balancer.pick("m", EPS) == EPS[1]  # 2, 1, 2 in flight
    for _ in range(2):
        balancer.release(EPS[0])
    assert balancer.outstanding(EPS[0]) == 0
    assert balancer.pick("m", EPS) == EPS[0]


def test_exclude_and_nothing_left():
    balancer = Balancer()
    assert balancer.pick("m", EPS[:2], exclude=[EPS[0]]) == EPS[1]
    assert balancer.pick("m", EPS[:1], exclude=[EPS[0]]) is None
    assert balancer.pick("m", ()) is None


def test_turns_are_per_model():
    balancer = Balancer()
    assert balancer.pick("a", EPS) == EPS[0]
    assert balancer.pick("b", EPS) == EPS[0]
    assert balancer.pick("a", EPS) == EPS[1]


def test_release_never_goes_negative():
    balancer = Balancer()
    balancer.release(EPS[0])
    assert balancer.outstanding(EPS[0]) == 0


def test_backoff_doubles_to_the_cap_and_resets():
    backoff = Backoff(initial=0.1, cap=0.4)
    delays = [backoff.next() for _ in range(5)]
    for delay, upper in zip(delays, [0.1, 0.2, 0.4, 0.4, 0.4], strict=True):
        assert upper / 2 <= delay <= upper
    backoff.reset()
    assert backoff.next() <= 0.1


def test_one_pool_per_endpoint_closed_when_gone_and_idle():
    a, b, c = EPS

    async def main():
        pools = UpstreamPools(upstream_timeout=5)
        pool_a = pools.get(a)
        assert pool_a not in {pools.get(b), pools.get(c)}
        assert pools.get(a) is pool_a
        # b left the table but still serves a request; c left and is idle.
        assert await pools.prune(live={a}, busy=lambda ep: ep == b) == 1
        assert len(pools) == 2 and not pool_a.is_closed
        assert await pools.prune(live={a}, busy=lambda ep: False) == 1
        assert len(pools) == 1
        await pools.aclose()
        assert pool_a.is_closed

    asyncio.run(main())


# ---- the request's model ---------------------------------------------------------------------

@pytest.mark.parametrize("body, model", [
    (b'{"model": "llama", "messages": []}', "llama"),
    (b'{"model": "org/llama-3.1-8b"}', "org/llama-3.1-8b"),
])
def test_model_of(body, model):
    assert _model_of(body) == (model, None)


@pytest.mark.parametrize("body", [b"", b"  ", b"{", b"[1]", b'"x"', b"{}", b'{"model": ""}',
                                  b'{"model": 7}', b"\xff\xfe"])
def test_model_of_bad_bodies(body):
    model, problem = _model_of(body)
    assert model is None and problem


def test_connection_header_names_hop_by_hop_headers():
    assert _connection_tokens("keep-alive, X-Private") == {"keep-alive", "x-private"}
    assert _connection_tokens(None) == frozenset()


# ---- the watch loop, against a scripted API --------------------------------------------------

class ScriptedAPI:
    """Answers list and watch calls from a script: each entry is (kind, response) where kind
    is "list" or "watch"; a call of the other kind fails the test."""

    def __init__(self, script: list[tuple[str, httpx.Response]]) -> None:
        self.script = list(script)
        self.calls: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        kind = "watch" if params.get("watch") == "true" else "list"
        self.calls.append({"kind": kind, **params,
                           "auth": request.headers.get("authorization")})
        if not self.script:
            return httpx.Response(500, json={"message": "script exhausted"})
        expected, response = self.script.pop(0)
        assert kind == expected, (kind, expected, params)
        return response


def listing(rv: str, *pods: dict) -> httpx.Response:
    return httpx.Response(200, json={"kind": "PodList", "metadata": {"resourceVersion": rv},
                                     "items": list(pods)})


def stream(*events: dict) -> httpx.Response:
    return httpx.Response(200, content=b"".join(json.dumps(e).encode() + b"\n" for e in events))


def event(kind: str, obj: dict, rv: str) -> dict:
    obj = json.loads(json.dumps(obj))
    obj["metadata"]["resourceVersion"] = rv
    return {"type": kind, "object": obj}


def run_watcher(tmp_path: Path, api: ScriptedAPI, until, timeout: float = 5):
    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    cfg = config.RouterConfig(api_url="http://api", namespace=NS,
                              token=config.TokenSource(path=token))
    table, restarts, changes = RoutingTable(), [], []

    async def main():
        client = httpx.AsyncClient(base_url="http://api", transport=httpx.MockTransport(api))
        watcher = PodWatcher(cfg, table, client, on_change=changes.append,
                             on_restart=restarts.append)
        task = asyncio.create_task(watcher.run())
        deadline = time.monotonic() + timeout
        while not until(watcher, restarts) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
        return watcher

    watcher = asyncio.run(main())
    return watcher, table, restarts, changes


def test_watch_follows_events_rewatches_and_relists_on_gone(tmp_path):
    a0, b0 = pod("a-0", "a", 9001, namespace=NS), pod("b-0", "b", 9002, namespace=NS)
    api = ScriptedAPI([
        ("list", listing("10", a0)),
        ("watch", stream(event("ADDED", b0, "11"),
                         {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}})),
        ("watch", stream(event("DELETED", a0, "16"),
                         {"type": "ERROR", "object": {"kind": "Status", "code": 410,
                                                      "reason": "Expired"}})),
        ("list", listing("30", b0)),
        ("watch", httpx.Response(500, json={"kind": "Status", "message": "etcd hiccup"})),
        ("watch", httpx.Response(410, json={"kind": "Status", "code": 410})),
        ("list", listing("40", a0, b0)),
    ])
    watcher, table, restarts, _ = run_watcher(
        tmp_path, api, until=lambda w, _: w.resource_version == "40")
    watches = [c for c in api.calls if c["kind"] == "watch"]
    assert [w["resourceVersion"] for w in watches][:4] == ["10", "15", "30", "30"]
    assert all(c["labelSelector"] == "airfleet.io/endpoint" for c in api.calls)
    assert all(c["auth"] == "Bearer t0k3n" for c in api.calls)
    assert restarts[:4] == ["stream_end", "gone", "error", "gone"]
    assert table.models() == ["a", "b"]
    assert watcher.synced


def test_watch_keeps_the_last_table_through_errors(tmp_path):
    a0 = pod("a-0", "a", 9001, namespace=NS)
    api = ScriptedAPI([("list", listing("10", a0))] +
                      [("watch", httpx.Response(503, json={"message": "down"}))] * 50)
    watcher, table, restarts, _ = run_watcher(
        tmp_path, api, until=lambda w, restarts: restarts.count("error") >= 3)
    assert table.ready("a") == (Endpoint("127.0.0.1", 9001),)
    assert watcher.synced and watcher.state == "backoff"
    assert "HTTP 503" in watcher.last_error and "down" in watcher.last_error


def test_malformed_event_is_an_error_not_a_crash(tmp_path):
    a0 = pod("a-0", "a", 9001, namespace=NS)
    api = ScriptedAPI([("list", listing("10", a0)),
                       ("watch", httpx.Response(200, content=b"{not json\n")),
                       ("watch", stream(event("DELETED", a0, "12")))])
    watcher, table, restarts, _ = run_watcher(
        tmp_path, api, until=lambda w, _: w.resource_version == "12")
    assert restarts[0] == "error"
    assert table.models() == []


def test_never_synced_until_a_list_succeeds(tmp_path):
    api = ScriptedAPI([("list", httpx.Response(403, json={"message": "forbidden"}))] * 3)
    watcher, table, restarts, _ = run_watcher(tmp_path, api, until=lambda w, _: len(api.calls) >= 3)
    assert not watcher.synced and watcher.state == "backoff"
    assert "HTTP 403" in watcher.last_error


# ---- configuration ---------------------------------------------------------------------------

def service_account(tmp_path: Path) -> Path:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "namespace").write_text("airfleet-llm-a\n")
    (sa / "token").write_text("sa-token\n")
    (sa / "ca.crt").write_text("not a real CA\n")
    return sa


def test_in_cluster_defaults(tmp_path):
    sa = service_account(tmp_path)
    cfg = config.load({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
                      service_account_dir=sa)
    assert cfg.api_url == "https://10.96.0.1:443"
    assert cfg.namespace == "airfleet-llm-a"
    assert cfg.token.get() == "sa-token"
    assert cfg.ca_file == sa / "ca.crt"
    assert (cfg.host, cfg.port, cfg.upstream_timeout) == ("0.0.0.0", 8080, 300.0)
    assert (cfg.watch_timeout, cfg.log_level, cfg.access_log) == (300, "info", False)


def test_env_overrides_service_account(tmp_path):
    sa = service_account(tmp_path)
    token = tmp_path / "tok"
    token.write_text("env-token")
    cfg = config.load({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443",
                       "AIRFLEET_ROUTER_API_URL": "http://127.0.0.1:6443/",
                       "AIRFLEET_ROUTER_NAMESPACE": "dev", "AIRFLEET_ROUTER_TOKEN_FILE": str(token),
                       "AIRFLEET_ROUTER_CA_FILE": "none", "AIRFLEET_ROUTER_PORT": "9999",
                       "AIRFLEET_ROUTER_HOST": "127.0.0.1",
                       "AIRFLEET_ROUTER_UPSTREAM_TIMEOUT": "2.5", "AIRFLEET_ROUTER_ACCESS_LOG": "on",
                       "AIRFLEET_ROUTER_WATCH_TIMEOUT": "60", "AIRFLEET_ROUTER_LOG_LEVEL": "DEBUG"},
                      service_account_dir=sa)
    assert (cfg.api_url, cfg.namespace, cfg.ca_file) == ("http://127.0.0.1:6443", "dev", None)
    assert (cfg.host, cfg.port, cfg.upstream_timeout) == ("127.0.0.1", 9999, 2.5)
    assert (cfg.access_log, cfg.watch_timeout, cfg.log_level) == (True, 60, "debug")
    assert cfg.token.get() == "env-token"
    assert cfg.api_verify() is False


def test_ipv6_service_host(tmp_path):
    cfg = config.load({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443",
                       "AIRFLEET_ROUTER_NAMESPACE": "x"}, service_account_dir=tmp_path)
    assert cfg.api_url == "https://[fd00::1]:443"


@pytest.mark.parametrize("env, words", [
    ({}, "no Kubernetes API"),
    ({"AIRFLEET_ROUTER_API_URL": "http://x"}, "no namespace"),
    ({"AIRFLEET_ROUTER_API_URL": "ftp://x", "AIRFLEET_ROUTER_NAMESPACE": "n"}, "http://"),
    ({"AIRFLEET_ROUTER_API_URL": "http://x", "AIRFLEET_ROUTER_NAMESPACE": "n",
      "AIRFLEET_ROUTER_PORT": "eighty"}, "AIRFLEET_ROUTER_PORT must be a number"),
    ({"AIRFLEET_ROUTER_API_URL": "http://x", "AIRFLEET_ROUTER_NAMESPACE": "n",
      "AIRFLEET_ROUTER_UPSTREAM_TIMEOUT": "0"}, "at least"),
    ({"AIRFLEET_ROUTER_API_URL": "http://x", "AIRFLEET_ROUTER_NAMESPACE": "n",
      "AIRFLEET_ROUTER_ACCESS_LOG": "maybe"}, "true or false"),
    ({"AIRFLEET_ROUTER_API_URL": "http://x", "AIRFLEET_ROUTER_NAMESPACE": "n",
      "AIRFLEET_ROUTER_LOG_LEVEL": "loud"}, "LOG_LEVEL"),
])
def test_config_errors(tmp_path, env, words):
    with pytest.raises(config.ConfigError, match=words):
        config.load(env, service_account_dir=tmp_path)


def test_token_file_is_reread_when_it_changes(tmp_path):
    path = tmp_path / "token"
    path.write_text("one\n")
    token = config.TokenSource(path=path)
    assert token.get() == "one"
    path.write_text("two-longer\n")
    assert token.get() == "two-longer"
    rotated = tmp_path / "token.new"  # the kubelet's way: a new file renamed over the old
    rotated.write_text("three-also-longer\n")
    os.replace(rotated, path)
    assert token.get() == "three-also-longer"
    assert "three" not in repr(token)


def test_kubeconfig(tmp_path):
    (tmp_path / "tok").write_text("from-token-file\n")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({  # JSON is YAML
        "apiVersion": "v1", "kind": "Config", "current-context": "dev",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"tokenFile": "tok"}},
                  {"name": "v", "user": {"token": "inline"}}],
        "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "u",
                                                 "namespace": "team"}},
                     {"name": "other", "context": {"cluster": "c", "user": "v"}}]}))
    cfg = config.load({}, kubeconfig=str(kubeconfig), service_account_dir=tmp_path / "none")
    assert (cfg.api_url, cfg.namespace) == ("http://127.0.0.1:6443", "team")
    assert cfg.token.get() == "from-token-file"
    cfg = config.load({"AIRFLEET_ROUTER_NAMESPACE": "ns2"}, kubeconfig=str(kubeconfig),
                      service_account_dir=tmp_path / "none")
    assert cfg.namespace == "ns2"


def test_kubeconfig_without_a_usable_user(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "current-context": "x",
        "clusters": [{"name": "c", "cluster": {"server": "https://k"}}],
        "users": [{"name": "u", "user": {"exec": {"command": "aws"}}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}]}))
    with pytest.raises(config.ConfigError, match="only token"):
        config.load({}, kubeconfig=str(kubeconfig), service_account_dir=tmp_path)
