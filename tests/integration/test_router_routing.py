"""The router's routing rules, as a real process against the fake Kubernetes API server and real
upstream processes on loopback: versions and the served-model annotation, the weights of the
``airfleet-routes`` ConfigMap (split, live change, malformed, fallback), sticky sessions with
bounded loads, least load from the engines' own ``/metrics``, the retry rule; and two of the
project's mock engines (include/airfleet_mock_engine) as two versions of one model.

One router (scraping every SCRAPE s), one fake API and three upstreams for the module; each
test uses models of its own and sets the weights it needs.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.router_support import MockEngine, RouterProcess, Upstream, free_port, pod

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

NS = "airfleet-routing"
SCRAPE = 0.2  # seconds between the router's scrapes of the engines' /metrics
WITHIN = 3.0  # a change in the API or in an engine's load must show within this long
ROUTES = "airfleet-routes"


@pytest.fixture(scope="module")
def kube():
    with FakeKubeAPIServer() as server:
        yield server


@pytest.fixture(scope="module")
def upstreams():
    started = {name: Upstream(name) for name in "ABC"}
    try:
        for upstream in started.values():
            upstream.wait()
        yield started
    finally:
        for upstream in started.values():
            upstream.stop()


@pytest.fixture(scope="module")
def router(kube, upstreams, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router")
    token_file = tmp / "token"
    token_file.write_text(kube.token)
    proc = RouterProcess(tmp / "router.log", api_url=kube.url, namespace=NS,
                         token_file=token_file, AIRFLEET_ROUTER_WATCH_TIMEOUT="2",
                         AIRFLEET_ROUTER_SCRAPE_INTERVAL=str(SCRAPE),
                         AIRFLEET_ROUTER_UPSTREAM_TIMEOUT="10")
    try:
        yield proc.wait_synced()
    finally:
        proc.stop()


@pytest.fixture
def client(router):
    with httpx.Client(base_url=router.url, timeout=10, trust_env=False) as c:
        yield c


@pytest.fixture
def pods(kube):
    made: list[str] = []

    def create(name: str, model: str, upstream: Upstream | int, **kw) -> str:
        port = upstream if isinstance(upstream, int) else upstream.port
        kube.create(pod(name, model, port, namespace=NS, **kw))
        made.append(name)
        return name

    yield create
    for name in made:
        if kube.get("Pod", name, NS) is not None:
            kube.delete("Pod", name, NS)


@pytest.fixture
def routes(kube):
    """Set the ConfigMap's ``routes.json`` (a dict, or raw text); deleted after the test."""

    def put(doc: dict | str) -> None:
        text = doc if isinstance(doc, str) else json.dumps(doc)
        current = kube.get("ConfigMap", ROUTES, NS)
        if current is None:
            kube.create({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": ROUTES, "namespace": NS},
                         "data": {"routes.json": text}})
        else:
            kube.update({**current, "data": {"routes.json": text}})

    yield put
    if kube.get("ConfigMap", ROUTES, NS) is not None:
        kube.delete("ConfigMap", ROUTES, NS)


def engine(client: httpx.Client, model: str, session: str | None = None,
           path: str = "/v1/chat/completions", **body) -> str:
    """Which upstream answered one request (header X-Airfleet-Engine)."""
    headers = {"X-Session-ID": session} if session else {}
    payload = {"model": model, **body}
    if path == "/v1/chat/completions":
        payload.setdefault("messages", [])
    response = client.post(path, json=payload, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    return response.headers["x-airfleet-engine"]


def engines(client: httpx.Client, model: str, n: int, **kw) -> list[str]:
    return [engine(client, model, **kw) for _ in range(n)]


def eventually(check, within: float = WITHIN, what: str = "condition"):
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            pytest.fail(f"{what} not reached within {within} s")
        time.sleep(0.02)


def metric(client: httpx.Client, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}(\{{{re.escape(want)}\}})? (\S+)$" if want
                         else rf"^{re.escape(name)} (\S+)$", re.M)
    found = pattern.search(client.get("/metrics").text)
    return float(found.group(found.lastindex)) if found else 0.0


def ready_pods(client: httpx.Client, model: str) -> float:
    return metric(client, "airfleet_router_ready_pods", model=model)


# ---- the served model ------------------------------------------------------------------------

def test_served_model_annotation_names_the_model(client, pods, upstreams):
    """A served name with a "/" (no label value may hold one) comes from the annotation; the
    label stays the name of a pod without the annotation."""
    pods("served-0", "org-llama", upstreams["A"], served_model="org/llama", version="v1")
    pods("served-1", "plain-llama", upstreams["B"])
    eventually(lambda: ready_pods(client, "org/llama") == 1
               and ready_pods(client, "plain-llama") == 1, what="both models ready")
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "org/llama" in ids and "org-llama" not in ids and "plain-llama" in ids
    assert engine(client, "org/llama") == "A"
    assert engine(client, "plain-llama") == "B"
    assert client.post("/v1/chat/completions",
                       json={"model": "org-llama", "messages": []}).status_code == 404


# ---- weights ---------------------------------------------------------------------------------

def test_weighted_split_is_exact_and_smooth(client, pods, routes, upstreams):
    """90/10 between two versions (two engines): smooth weighted round-robin sends exactly 9
    of every 10 unkeyed requests to v1, interleaved, so 2,000 requests split 1,800/200."""
    pods("split-v1", "split", upstreams["A"], version="v1")
    pods("split-v2", "split", upstreams["B"], version="v2")
    routes({"models": {"split": {"v1": 90, "v2": 10}}})
    eventually(lambda: ready_pods(client, "split") == 2, what="two ready pods")
    eventually(lambda: engines(client, "split", 10).count("B") == 1, what="weights applied")
    seen = engines(client, "split", 2000)
    share = seen.count("A") / len(seen)
    assert abs(share - 0.90) <= 0.05, share
    assert seen.count("A") == 1800
    for i in range(0, 2000, 10):  # smooth: every run of 10 holds exactly one v2 request
        assert seen[i:i + 10].count("B") == 1, seen[i:i + 10]
    assert metric(client, "airfleet_router_version_requests_total",
                  model="split", version="v2") >= 200


def test_weights_change_live_and_a_bad_configmap_is_ignored(client, pods, routes, upstreams):
    pods("live-v1", "live", upstreams["A"], version="v1")
    pods("live-v2", "live", upstreams["B"], version="v2")
    routes({"models": {"live": {"v1": 100, "v2": 0}}})
    eventually(lambda: ready_pods(client, "live") == 2, what="two ready pods")
    eventually(lambda: set(engines(client, "live", 6)) == {"A"}, what="all on v1")
    routes({"models": {"live": {"v1": 0, "v2": 100}}})  # the canary takes over, no restart
    eventually(lambda: set(engines(client, "live", 6)) == {"B"}, what="all on v2")

    errors = metric(client, "airfleet_router_routes_config_errors_total")
    routes('{"models": {"live": {"v1": 100, "v2": "lots"}}}')  # not an integer
    eventually(lambda: metric(client, "airfleet_router_routes_config_errors_total") > errors,
               what="the malformed ConfigMap seen")
    assert set(engines(client, "live", 6)) == {"B"}  # the last good weights stay
    routes("{not json")
    eventually(lambda: metric(client, "airfleet_router_routes_config_errors_total")
               > errors + 1, what="the unparsable ConfigMap seen")
    assert set(engines(client, "live", 6)) == {"B"}
    assert "JSON" in client.get("/healthz").json()["routes"]["config_error"]


def test_deleted_configmap_means_no_weights(client, kube, pods, routes, upstreams):
    pods("nocm-v1", "nocm", upstreams["A"], version="v1")
    pods("nocm-v2", "nocm", upstreams["B"], version="v2")
    routes({"models": {"nocm": {"v2": 100}}})
    eventually(lambda: ready_pods(client, "nocm") == 2, what="two ready pods")
    eventually(lambda: set(engines(client, "nocm", 6)) == {"B"}, what="all on v2")
    kube.delete("ConfigMap", ROUTES, NS)
    eventually(lambda: set(engines(client, "nocm", 6)) == {"A", "B"}, what="both versions")
    assert client.get("/healthz").json()["routes"]["state"] in ("watching", "listing")


def test_routes_watch_survives_api_errors_and_410(client, kube, pods, routes, upstreams):
    """The ConfigMap watch has the pod watch's resilience: 500s are retried after a backoff
    (the weights in force stay), and a resourceVersion compacted away makes it list again."""
    pods("rw-v1", "routeswatch", upstreams["A"], version="v1")
    pods("rw-v2", "routeswatch", upstreams["B"], version="v2")
    routes({"models": {"routeswatch": {"v1": 100}}})
    eventually(lambda: ready_pods(client, "routeswatch") == 2, what="two ready pods")
    eventually(lambda: set(engines(client, "routeswatch", 4)) == {"A"}, what="all on v1")
    errors = metric(client, "airfleet_router_routes_watch_restarts_total", reason="error")
    gone = metric(client, "airfleet_router_routes_watch_restarts_total", reason="gone")
    kube.fail_next(6, status=500, method="GET", path=f"/namespaces/{NS}/configmaps")
    eventually(lambda: metric(client, "airfleet_router_routes_watch_restarts_total",
                              reason="error") > errors, within=5, what="a failed watch")
    assert set(engines(client, "routeswatch", 4)) == {"A"}  # routing on the last weights
    routes({"models": {"routeswatch": {"v2": 100}}})  # changed during the outage...
    kube.compact()  # ...and gone from the history the watch resumes from
    eventually(lambda: set(engines(client, "routeswatch", 4)) == {"B"}, within=15,
               what="the change made during the outage applied")
    assert metric(client, "airfleet_router_routes_watch_restarts_total",
                  reason="error") >= errors + 6
    assert metric(client, "airfleet_router_routes_watch_restarts_total", reason="gone") > gone


def test_versions_missing_from_the_map_weigh_zero(client, pods, routes, upstreams):
    pods("unmapped-v1", "unmapped", upstreams["A"], version="v1")
    pods("unmapped-v3", "unmapped", upstreams["C"], version="v3")
    routes({"models": {"unmapped": {"v1": 100}}})
    eventually(lambda: ready_pods(client, "unmapped") == 2, what="two ready pods")
    eventually(lambda: set(engines(client, "unmapped", 6)) == {"A"}, what="weights applied")
    assert set(engines(client, "unmapped", 20)) == {"A"}


def test_no_weighted_version_ready_falls_back_to_any_pod(client, kube, pods, routes, upstreams):
    """The canary (weight 100) is the only weighted version and it goes unready: traffic goes
    to the weight-0 version rather than nowhere, and the fallback is counted."""
    pods("fb-v1", "fallback", upstreams["A"], version="v1")
    pods("fb-v2", "fallback", upstreams["B"], version="v2")
    routes({"models": {"fallback": {"v1": 0, "v2": 100}}})
    eventually(lambda: ready_pods(client, "fallback") == 2, what="two ready pods")
    eventually(lambda: set(engines(client, "fallback", 6)) == {"B"}, what="all on v2")
    before = metric(client, "airfleet_router_weight_fallbacks_total", model="fallback")
    kube.set_pod_ready(NS, "fb-v2", False)
    eventually(lambda: ready_pods(client, "fallback") == 1, what="v2 unready")
    assert set(engines(client, "fallback", 5)) == {"A"}
    assert metric(client, "airfleet_router_weight_fallbacks_total",
                  model="fallback") >= before + 5


# ---- sticky sessions -------------------------------------------------------------------------

def test_session_sticks_to_its_engine_and_spills_when_it_is_overloaded(client, pods,
                                                                       upstreams):
    pods("sticky-0", "sticky", upstreams["A"])
    pods("sticky-1", "sticky", upstreams["B"])
    eventually(lambda: ready_pods(client, "sticky") == 2, what="two ready pods")
    first = {s: engine(client, "sticky", session=s) for s in (f"s-{i}" for i in range(20))}
    assert set(first.values()) == {"A", "B"}  # sessions spread over the pods...
    for session, home in first.items():  # ...and each one stays where it started
        assert set(engines(client, "sticky", 5, session=session)) == {home}

    session = "s-0"
    home = first[session]
    other = "B" if home == "A" else "A"
    upstreams[home].set_waiting(50)  # another client's queue on the session's engine
    try:
        eventually(lambda: engine(client, "sticky", session=session) == other,
                   what="the session spilled to the other engine")
        assert set(engines(client, "sticky", 5, session=session)) == {other}
    finally:
        upstreams[home].set_waiting(0)
    eventually(lambda: engine(client, "sticky", session=session) == home,
               what="the session back on its engine")


def test_first_user_messages_key_a_session(client, pods, upstreams):
    """Without X-Session-ID, the first two user messages are the key: a conversation lands on
    the same engine from its second turn on, whatever follows; a completion's key is the
    first 256 characters of its prompt."""
    pods("conv-0", "conv", upstreams["A"])
    pods("conv-1", "conv", upstreams["B"])
    eventually(lambda: ready_pods(client, "conv") == 2, what="two ready pods")
    homes = set()
    for i in range(12):
        start = [{"role": "system", "content": "be brief"},
                 {"role": "user", "content": f"question {i}"}]
        home = engine(client, "conv", messages=start)
        homes.add(home)
        assert {engine(client, "conv", messages=start) for _ in range(3)} == {home}
        second = [*start, {"role": "assistant", "content": "answer"},
                  {"role": "user", "content": "and then?"}]
        later = engine(client, "conv", messages=second)
        third = [*second, {"role": "assistant", "content": "more"},
                 {"role": "user", "content": f"a third question {i}"}]
        assert {engine(client, "conv", messages=third) for _ in range(3)} == {later}
        prompt = f"completion {i} " * 40
        p_home = engine(client, "conv", path="/v1/completions", prompt=prompt)
        assert engine(client, "conv", path="/v1/completions",
                      prompt=prompt[:256] + "different tail") == p_home
    assert homes == {"A", "B"}


def test_affinity_off_keys_only_the_header(kube, pods, upstreams, tmp_path):
    """AIRFLEET_ROUTER_AFFINITY=off: the same conversation is no longer sticky (idle pods
    take turns), a request with X-Session-ID still is."""
    pods("off-0", "affoff", upstreams["A"])
    pods("off-1", "affoff", upstreams["B"])
    token = tmp_path / "token"
    token.write_text(kube.token)
    proc = RouterProcess(tmp_path / "router.log", api_url=kube.url, namespace=NS,
                         token_file=token, AIRFLEET_ROUTER_AFFINITY="off",
                         AIRFLEET_ROUTER_SESSION_HEADER="X-Conversation")
    try:
        proc.wait_synced()
        with httpx.Client(base_url=proc.url, timeout=10, trust_env=False) as c:
            eventually(lambda: ready_pods(c, "affoff") == 2, what="two ready pods")
            same = [{"role": "user", "content": "the same question"}]
            assert set(engines(c, "affoff", 6, messages=same)) == {"A", "B"}
            homes = {c.post("/v1/chat/completions", json={"model": "affoff", "messages": same},
                            headers={"X-Conversation": "c-1"}).headers["x-airfleet-engine"]
                     for _ in range(6)}
            assert len(homes) == 1
    finally:
        proc.stop()


def test_a_session_stays_on_its_version(client, pods, routes, upstreams):
    pods("sv-v1", "sessver", upstreams["A"], version="v1")
    pods("sv-v2", "sessver", upstreams["B"], version="v2")
    routes({"models": {"sessver": {"v1": 50, "v2": 50}}})
    eventually(lambda: ready_pods(client, "sessver") == 2, what="two ready pods")
    eventually(lambda: engines(client, "sessver", 2) in (["A", "B"], ["B", "A"]),
               what="weights applied")
    homes = {f"u-{i}": engine(client, "sessver", session=f"u-{i}") for i in range(200)}
    share = list(homes.values()).count("A") / len(homes)
    assert 0.35 <= share <= 0.65, share  # buckets by cumulative weight
    for session in list(homes)[:20]:
        assert set(engines(client, "sessver", 3, session=session)) == {homes[session]}


# ---- load from the engines' metrics ----------------------------------------------------------

def test_engine_reported_queue_steers_unkeyed_requests(client, pods, upstreams):
    """An engine that reports a queue (from other clients) gets no new requests while the
    other is idle; once its queue is gone, the two take turns again."""
    pods("queue-0", "queue", upstreams["A"])
    pods("queue-1", "queue", upstreams["B"])
    eventually(lambda: ready_pods(client, "queue") == 2, what="two ready pods")
    assert set(engines(client, "queue", 4)) == {"A", "B"}
    upstreams["A"].set_waiting(10)
    try:
        eventually(lambda: set(engines(client, "queue", 4)) == {"B"},
                   what="requests steered off the queued engine")
        assert set(engines(client, "queue", 8)) == {"B"}
    finally:
        upstreams["A"].set_waiting(0)
    eventually(lambda: set(engines(client, "queue", 4)) == {"A", "B"}, what="turns again")


def test_metrics_port_is_scraped_and_a_failed_scrape_counts(client, pods, upstreams):
    """A pod declaring a ``metrics`` port is scraped there; one where nothing answers counts
    scrape failures and is balanced on in-flight requests only (it still serves)."""
    pods("mport-0", "mport", upstreams["A"], metrics_port=free_port())
    eventually(lambda: ready_pods(client, "mport") == 1, what="ready pod")
    failures = metric(client, "airfleet_router_scrape_failures_total")
    eventually(lambda: metric(client, "airfleet_router_scrape_failures_total") > failures,
               what="a failed scrape")
    assert set(engines(client, "mport", 3)) == {"A"}


# ---- retries ---------------------------------------------------------------------------------

def test_connect_failure_retries_on_the_same_version(client, pods, routes, upstreams):
    """v1 has a dead pod and a live one, v2 a live one: a request that meets the dead v1 pod
    is retried on the live v1 pod, never moved to v2."""
    pods("rv-dead", "retryver", free_port(), version="v1")
    pods("rv-v1", "retryver", upstreams["A"], version="v1")
    pods("rv-v2", "retryver", upstreams["B"], version="v2")
    routes({"models": {"retryver": {"v1": 100, "v2": 0}}})
    eventually(lambda: ready_pods(client, "retryver") == 3, what="three ready pods")
    eventually(lambda: set(engines(client, "retryver", 4)) == {"A"}, what="weights applied")
    failures = metric(client, "airfleet_router_upstream_connect_failures_total",
                      model="retryver")
    assert set(engines(client, "retryver", 10)) == {"A"}
    assert metric(client, "airfleet_router_upstream_connect_failures_total",
                  model="retryver") > failures


# ---- with the project's mock engine ----------------------------------------------------------

def test_two_mock_engine_versions_split_90_10(client, kube, routes):
    """Two mock engines serving "org/mock" as v1 and v2 (the served name in the annotation,
    as the endpoint deploy flow writes it), weights 90/10, 2,000 conversations each with its
    own first message (so each is keyed, and its bucket picks the version): v1 serves 90 % of
    them, within 5 percentage points."""
    model = "org/mock"
    engines_ = [MockEngine("e-v1", model), MockEngine("e-v2", model)]
    try:
        for e in engines_:
            e.wait()
        for version, e in zip(("v1", "v2"), engines_, strict=True):
            kube.create(pod(f"mock-{version}", "org-mock", e.port, namespace=NS,
                            version=version, served_model=model, endpoint="mock"))
        routes({"models": {model: {"v1": 90, "v2": 10}}})
        eventually(lambda: ready_pods(client, model) == 2, what="two ready pods")
        eventually(lambda: client.get("/healthz").json()["routes"]["models"] >= 1,
                   what="weights loaded")
        served = {"e-v1": 0, "e-v2": 0}
        for i in range(2000):
            response = client.post("/v1/chat/completions", json={
                "model": model, "max_tokens": 1,
                "messages": [{"role": "user", "content": f"conversation {i}"}]})
            assert response.status_code == 200, response.text
            served[response.headers["x-airfleet-engine"]] += 1
        share = served["e-v1"] / 2000
        assert abs(share - 0.90) <= 0.05, served
    finally:
        for version in ("v1", "v2"):
            if kube.get("Pod", f"mock-{version}", NS) is not None:
                kube.delete("Pod", f"mock-{version}", NS)
        for e in engines_:
            e.stop()
