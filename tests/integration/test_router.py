"""The router (router/airfleet_router) as a real process, against the fake Kubernetes API server
(tests/fakes/kube_apiserver.py) and real upstream inference servers on loopback
(tests/router_support.Upstream): pods created in the fake point at 127.0.0.1 and the
upstream's port, so the router's answer says which upstream served it.

One router, one fake API and four upstreams for the module; each test uses models of its
own. Routing changes must show within one second of the change in the API.
"""

from __future__ import annotations

import json
import re
import time
import uuid

import httpx
import pytest

from airfleet_router.config import DEFAULT_SCRAPE_INTERVAL
from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.router_support import RouterProcess, Upstream, free_port, pod, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NS = "airfleet-test"
TOKEN_CANARY = f"canary-token-{uuid.uuid4().hex}"
BODY_CANARY = f"canary-body-{uuid.uuid4().hex}"
CLIENT_KEY_CANARY = f"canary-client-key-{uuid.uuid4().hex}"
WATCH_TIMEOUT = 2  # seconds: the router re-watches often, so API failures reach it quickly
WITHIN = 1.0  # a routing change must show within this long
SCRAPE_INTERVAL = DEFAULT_SCRAPE_INTERVAL  # the router's engine /metrics reads


@pytest.fixture(scope="module")
def kube():
    with FakeKubeAPIServer(token=TOKEN_CANARY) as server:
        yield server


@pytest.fixture(scope="module")
def upstreams():
    started = {name: Upstream(name) for name in "ABCD"}
    try:
        for upstream in started.values():
            upstream.wait()
        yield started
    finally:
        for upstream in started.values():
            upstream.stop()


@pytest.fixture(scope="module")
def router(kube, upstreams, tmp_path_factory):
    """The router under test: https to the fake with its CA, a token file, short watches."""
    tmp = tmp_path_factory.mktemp("router")
    token_file = tmp / "token"
    token_file.write_text(TOKEN_CANARY + "\n")
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(kube.ca_pem)
    proc = RouterProcess(tmp / "router.log", api_url=kube.https_url, namespace=NS,
                         token_file=token_file, AIRFLEET_ROUTER_CA_FILE=str(ca_file),
                         AIRFLEET_ROUTER_ACCESS_LOG="true", AIRFLEET_ROUTER_LOG_LEVEL="debug",
                         AIRFLEET_ROUTER_WATCH_TIMEOUT=str(WATCH_TIMEOUT),
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
    """Create pods in the fake (deleted at the end of the test)."""
    made: list[str] = []

    def create(name: str, model: str | None, upstream: Upstream | int, **kw) -> str:
        port = upstream if isinstance(upstream, int) else upstream.port
        kube.create(pod(name, model, port, namespace=NS, **kw))
        made.append(name)
        return name

    yield create
    for name in made:
        if kube.get("Pod", name, NS) is not None:
            kube.delete("Pod", name, NS)


def ask(client: httpx.Client, model: str, path: str = "/v1/chat/completions", **body):
    return client.post(path, json={"model": model, "messages": [], **body})


def served_by(client: httpx.Client, model: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        response = ask(client, model)
        assert response.status_code == 200, response.text
        out.append(response.json()["upstream"])
    return out


def eventually(check, within: float = WITHIN, what: str = "condition"):
    """Poll ``check()`` until truthy; fail if that takes longer than ``within`` seconds.
    Returns the elapsed time."""
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > within:
            pytest.fail(f"{what} not reached within {within} s")
        time.sleep(0.01)


def models(client: httpx.Client) -> list[str]:
    return [m["id"] for m in client.get("/v1/models").json()["data"]]


def metric(client: httpx.Client, name: str, **labels) -> float:
    """The value of one sample on /metrics (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}(\{{{re.escape(want)}\}})? (\S+)$" if want
                         else rf"^{re.escape(name)} (\S+)$", re.M)
    found = pattern.search(client.get("/metrics").text)
    return float(found.group(found.lastindex)) if found else 0.0


def restarts(client: httpx.Client, reason: str) -> float:
    return metric(client, "airfleet_router_watch_restarts_total", reason=reason)


# ---- discovery and routing -------------------------------------------------------------------

def test_healthz_after_sync(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["watch"]["synced"] is True
    assert body["watch"]["state"] in ("watching", "listing")
    assert {"pods", "ready_pods", "models"} <= body.keys()


def test_models_lists_models_with_a_ready_pod(client, pods, upstreams):
    pods("list-a-0", "list-a", upstreams["A"])
    pods("list-b-0", "list-b", upstreams["B"], ready=False)
    eventually(lambda: "list-a" in models(client), what="list-a listed")
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert {"id": "list-a", "object": "model", "owned_by": "airfleet"} in body["data"]
    assert "list-b" not in models(client)


def test_routes_by_model_and_forwards_the_request(client, pods, upstreams):
    pods("route-a-0", "route-a", upstreams["A"])
    pods("route-b-0", "route-b", upstreams["B"])
    eventually(lambda: {"route-a", "route-b"} <= set(models(client)), what="models listed")
    response = client.post("/v1/completions?api-version=1",
                           json={"model": "route-a", "prompt": "hi"},
                           headers={"x-test": "passed", "authorization": "Bearer client-key"})
    assert response.status_code == 200
    assert response.headers["x-upstream"] == "A"
    assert response.json() == {"upstream": "A", "model": "route-a", "path": "/v1/completions",
                               "query": "api-version=1", "authorization": "Bearer client-key",
                               "x_test": "passed", "cookie": None}
    assert ask(client, "route-b").json()["upstream"] == "B"


def test_cookies_pass_through_and_are_never_kept(router, pods, upstreams):
    """A Set-Cookie reaches the client that caused it; the router keeps no cookie jar, so it
    never sends one client's cookie with another client's request."""
    pods("cookie-0", "cookie", upstreams["A"])
    with httpx.Client(base_url=router.url, trust_env=False) as first, \
            httpx.Client(base_url=router.url, trust_env=False) as second:
        eventually(lambda: "cookie" in models(first), what="model listed")
        response = ask(first, "cookie", set_cookie="user-1-session")
        assert "session=user-1-session" in response.headers["set-cookie"]
        assert ask(second, "cookie").json()["cookie"] is None
        assert ask(first, "cookie").json()["cookie"] == "session=user-1-session"


def test_spreads_requests_over_ready_pods(client, pods, upstreams):
    pods("spread-0", "spread", upstreams["A"])
    pods("spread-1", "spread", upstreams["B"])
    eventually(lambda: metric(client, "airfleet_router_ready_pods", model="spread") == 2,
               what="two ready pods")
    seen = served_by(client, "spread", 10)
    assert seen.count("A") == 5 and seen.count("B") == 5  # round-robin when idle
    assert all(a != b for a, b in zip(seen, seen[1:], strict=False))


def test_busy_pod_gets_fewer_requests(client, pods, upstreams):
    """Least outstanding: while a long stream holds A, new requests go to B."""
    pods("busy-0", "busy", upstreams["A"])
    pods("busy-1", "busy", upstreams["B"])
    eventually(lambda: metric(client, "airfleet_router_ready_pods", model="busy") == 2,
               what="two ready pods")
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": "busy", "stream": True, "chunks": 3,
                             "delay": 0.5}) as long:
        lines = long.iter_lines()  # kept: a dropped iterator closes the response
        holder = json.loads(next(lines).removeprefix("data: "))["upstream"]
        others = served_by(client, "busy", 4)
        assert holder not in others
        assert [line for line in lines if line][-1] == "data: [DONE]"


def test_pod_turning_not_ready_gets_no_more_traffic(client, kube, pods, upstreams):
    pods("unready-0", "unready", upstreams["A"])
    pods("unready-1", "unready", upstreams["B"])
    eventually(lambda: metric(client, "airfleet_router_ready_pods", model="unready") == 2,
               what="two ready pods")
    # An engine's /metrics may still count a stream the router has just finished (the
    # upstream's count drops after its last byte), so a scrape at that moment makes one pod
    # look busy until the next scrape: both serve within one scrape interval.
    eventually(lambda: set(served_by(client, "unready", 4)) == {"A", "B"},
               within=SCRAPE_INTERVAL + WITHIN, what="both pods serving")
    kube.set_pod_ready(NS, "unready-1", False)
    eventually(lambda: served_by(client, "unready", 1) == ["A"] and
               metric(client, "airfleet_router_ready_pods", model="unready") == 1,
               what="B out of rotation")
    assert set(served_by(client, "unready", 6)) == {"A"}
    kube.set_pod_ready(NS, "unready-1", True)
    eventually(lambda: "B" in served_by(client, "unready", 2), what="B back in rotation")


def test_deleted_pod_is_gone(client, kube, pods, upstreams):
    pods("gone-0", "gone", upstreams["A"])
    pods("gone-1", "gone", upstreams["B"])
    eventually(lambda: metric(client, "airfleet_router_ready_pods", model="gone") == 2,
               what="two ready pods")
    kube.delete("Pod", "gone-1", NS)
    eventually(lambda: metric(client, "airfleet_router_ready_pods", model="gone") == 1,
               what="deleted pod dropped")
    assert set(served_by(client, "gone", 6)) == {"A"}
    kube.delete("Pod", "gone-0", NS)
    eventually(lambda: ask(client, "gone").status_code == 404, what="model gone")


def test_new_ready_pod_is_used(client, kube, pods, upstreams):
    pods("new-0", "new", upstreams["A"])
    eventually(lambda: "new" in models(client), what="first pod")
    pods("new-1", "new", upstreams["C"], ready=False)  # scheduled, model still loading
    time.sleep(0.3)
    assert set(served_by(client, "new", 4)) == {"A"}
    kube.set_pod_ready(NS, "new-1", True)
    eventually(lambda: "C" in served_by(client, "new", 2), what="turned-ready pod used")
    pods("new-2", "new", upstreams["D"])  # created ready
    eventually(lambda: "D" in served_by(client, "new", 3), what="new ready pod used")


def test_terminating_pod_leaves_rotation(client, kube, pods, upstreams):
    """A pod being deleted (deletionTimestamp set, finalizer pending) gets no new requests."""
    pods("term-0", "term", upstreams["A"])
    pods("term-1", "term", upstreams["B"])
    obj = kube.get("Pod", "term-1", NS)
    obj["metadata"]["finalizers"] = ["airfleet.io/test"]
    kube.update(obj)
    eventually(lambda: metric(client, "airfleet_router_ready_pods", model="term") == 2,
               what="two ready pods")
    response = httpx.delete(f"{kube.url}/api/v1/namespaces/{NS}/pods/term-1",
                            headers={"authorization": f"Bearer {kube.token}"}, trust_env=False)
    assert response.status_code == 200
    assert kube.get("Pod", "term-1", NS)["metadata"]["deletionTimestamp"]
    eventually(lambda: metric(client, "airfleet_router_ready_pods", model="term") == 1,
               what="terminating pod dropped")
    assert set(served_by(client, "term", 4)) == {"A"}


# ---- errors ----------------------------------------------------------------------------------

def test_unknown_model_is_404(client):
    response = ask(client, "no-such-model")
    assert response.status_code == 404
    assert response.json() == {"error": {
        "message": "The model 'no-such-model' does not exist", "type": "invalid_request_error",
        "param": None, "code": "model_not_found"}}


def test_known_model_without_ready_pod_is_503(client, pods, upstreams):
    pods("cold-0", "cold", upstreams["A"], ready=False)
    eventually(lambda: ask(client, "cold").status_code == 503, what="503 for a known model")
    response = ask(client, "cold")
    assert int(response.headers["retry-after"]) > 0
    error = response.json()["error"]
    assert error["code"] == "no_ready_endpoint" and "cold" in error["message"]


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", b'{"prompt": "x"}',
                                     b'{"model": 3}'])
def test_bad_request_is_400(client, content):
    response = client.post("/v1/completions", content=content,
                           headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_other_paths_and_methods_answer_openai_errors(client):
    assert client.get("/v1/chat/completions").status_code == 405
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404 and "error" in response.json()


def test_streaming_is_relayed_chunk_by_chunk(client, pods, upstreams):
    pods("stream-0", "stream", upstreams["A"])
    eventually(lambda: "stream" in models(client), what="model listed")
    started = time.monotonic()
    arrivals = []
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": "stream", "stream": True, "chunks": 4,
                             "delay": 0.4}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic() - started, line))
    assert [line for _, line in arrivals][-1] == "data: [DONE]"
    assert len(arrivals) == 5
    # The upstream takes 4 x 0.4 s: the first chunk must arrive long before it finishes, and
    # each later one about 0.4 s after the previous (nothing buffered in between).
    assert arrivals[0][0] < 0.3, arrivals
    assert arrivals[-1][0] >= 1.5, arrivals
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert all(gap > 0.25 for gap in gaps), gaps


def test_connect_failure_tries_another_pod(client, pods, upstreams):
    dead = free_port()  # nothing listens there: connection refused
    pods("retry-0", "retry", dead)
    pods("retry-1", "retry", upstreams["B"])
    eventually(lambda: metric(client, "airfleet_router_ready_pods", model="retry") == 2,
               what="two ready pods")
    failures = metric(client, "airfleet_router_upstream_connect_failures_total", model="retry")
    assert set(served_by(client, "retry", 6)) == {"B"}
    assert metric(client, "airfleet_router_upstream_connect_failures_total",
                  model="retry") >= failures + 3


def test_no_reachable_pod_is_502(client, pods):
    pods("down-0", "down", free_port())
    pods("down-1", "down", free_port())
    eventually(lambda: metric(client, "airfleet_router_ready_pods", model="down") == 2,
               what="two ready pods")
    response = ask(client, "down")
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"


def test_upstream_dying_mid_stream_drops_the_client(client, pods):
    victim = Upstream("E").wait()
    try:
        pods("dying-0", "dying", victim)
        eventually(lambda: "dying" in models(client), what="model listed")
        with client.stream("POST", "/v1/chat/completions",
                           json={"model": "dying", "stream": True, "chunks": 10,
                                 "delay": 0.3}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            victim.proc.kill()  # SIGKILL: uvicorn would finish the stream on SIGTERM
            with pytest.raises(httpx.HTTPError):
                for _ in lines:
                    pass
    finally:
        victim.stop()
    assert client.get("/healthz").status_code == 200  # the router itself is fine


# ---- metrics ---------------------------------------------------------------------------------

def test_metrics(client, pods, upstreams):
    pods("metrics-0", "metrics", upstreams["A"])
    eventually(lambda: "metrics" in models(client), what="model listed")
    served_by(client, "metrics", 3)
    ask(client, "metrics-unknown")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert metric(client, "airfleet_router_requests_total", model="metrics", status="200") == 3
    assert metric(client, "airfleet_router_requests_total", model="", status="404") >= 1
    assert metric(client, "airfleet_router_upstream_latency_seconds_count",
                  model="metrics") == 3
    assert "airfleet_router_upstream_latency_seconds_bucket{" in response.text
    assert metric(client, "airfleet_router_ready_pods", model="metrics") == 1
    assert "airfleet_router_watch_restarts_total" in response.text
    assert metric(client, "airfleet_router_watch_synced") == 1
    assert "metrics-unknown" not in response.text  # unknown models do not become labels


# ---- the watch under API trouble -------------------------------------------------------------

def watch_failures(kube) -> int:
    """Pod list/watch calls of the router that the fake answered with a 5xx."""
    return sum(1 for method, path, status in list(kube.requests)
               if method == "GET" and f"/namespaces/{NS}/pods" in path and status >= 500)


def test_watch_survives_an_api_error_burst(client, kube, pods, upstreams):
    """Five 500s in a row: the router backs off, keeps routing, then resumes the watch from
    its resourceVersion and catches up with a pod created during the outage."""
    pods("burst-0", "burst", upstreams["A"])
    eventually(lambda: "burst" in models(client), what="model listed")
    before, failed = restarts(client, "error"), watch_failures(kube)
    kube.fail_next(5, status=500, method="GET", path=f"/namespaces/{NS}/pods")
    # The router re-watches every WATCH_TIMEOUT s, so it meets the failures within that.
    eventually(lambda: watch_failures(kube) > failed, within=WATCH_TIMEOUT + 2,
               what="the first failed watch")
    health = client.get("/healthz")
    assert health.status_code == 200  # synced once: still serving the last known pods
    assert ask(client, "burst").json()["upstream"] == "A"
    pods("burst-1", "burst", upstreams["B"])  # while the router cannot watch
    eventually(lambda: metric(client, "airfleet_router_ready_pods", model="burst") == 2,
               within=10, what="the pod created during the outage is routed")
    assert watch_failures(kube) == failed + 5
    assert restarts(client, "error") >= before + 5
    assert client.get("/healthz").json()["watch"]["state"] == "watching"
    assert set(served_by(client, "burst", 4)) == {"A", "B"}


def test_healthz_reports_backoff(client, kube):
    failed = watch_failures(kube)
    kube.fail_next(4, status=503, method="GET", path=f"/namespaces/{NS}/pods")
    eventually(lambda: watch_failures(kube) > failed, within=WATCH_TIMEOUT + 2,
               what="the first failed watch")
    eventually(lambda: client.get("/healthz").json()["watch"]["state"] == "backoff",
               what="healthz says backoff")
    health = client.get("/healthz")
    assert health.status_code == 200 and "503" in health.json()["watch"]["last_error"]
    eventually(lambda: client.get("/healthz").json()["watch"]["state"] == "watching",
               within=15, what="watching again")
    assert client.get("/healthz").json()["watch"]["last_error"] is None


def test_watch_relists_after_410_gone(client, kube, pods, upstreams):
    """The API forgets history while the router cannot watch (etcd compaction): its resumed
    watch gets ERROR 410 Gone, it lists again and routes what it missed."""
    pods("relist-0", "relist", upstreams["A"])
    eventually(lambda: "relist" in models(client), what="model listed")
    before, failed = restarts(client, "gone"), watch_failures(kube)
    kube.fail_next(4, status=500, method="GET", path=f"/namespaces/{NS}/pods")
    eventually(lambda: watch_failures(kube) > failed, within=WATCH_TIMEOUT + 2,
               what="the router out of its watch")
    pods("relist-1", "relist", upstreams["B"])  # missed by the router...
    kube.delete("Pod", "relist-0", NS)
    kube.compact()  # ...and no longer in the history it resumes from
    eventually(lambda: restarts(client, "gone") > before, within=10, what="410 Gone seen")
    eventually(lambda: served_by(client, "relist", 1) == ["B"], within=2,
               what="re-listed pods routed")
    assert set(served_by(client, "relist", 4)) == {"B"}


def test_stream_end_rewatches(client, kube, pods, upstreams):
    """The server ends each watch after timeoutSeconds; the router resumes without a re-list
    and misses nothing."""
    lists = sum(1 for m, p, _ in list(kube.requests) if "watch=true" not in p and "/pods" in p)
    before = restarts(client, "stream_end")
    eventually(lambda: restarts(client, "stream_end") > before, within=WATCH_TIMEOUT + 2,
               what="a watch ended by the server")
    pods("rewatch-0", "rewatch", upstreams["C"])
    eventually(lambda: "rewatch" in models(client), what="pod routed")
    assert lists == sum(1 for m, p, _ in list(kube.requests)
                        if "watch=true" not in p and "/pods" in p)


def test_token_file_is_reread(client, kube, router, pods, upstreams):
    """The token is rotated in the API and in the file: the router's next watch uses the new
    one (no 401, no failure)."""
    failed_auth = sum(1 for _, p, status in list(kube.requests) if status == 401)
    new_token = TOKEN_CANARY + "-rotated"
    rotated = router.token_file.with_name("token.new")
    rotated.write_text(new_token + "\n")
    kube.token = new_token
    rotated.replace(router.token_file)  # atomically, as the kubelet does
    try:
        before = restarts(client, "stream_end")
        eventually(lambda: restarts(client, "stream_end") > before, within=WATCH_TIMEOUT + 2,
                   what="a new watch")
        pods("rotated-0", "rotated", upstreams["D"])
        eventually(lambda: "rotated" in models(client), what="pod routed")
        assert sum(1 for _, p, status in list(kube.requests) if status == 401) == failed_auth
    finally:
        router.token_file.write_text(TOKEN_CANARY + "\n")
        kube.token = TOKEN_CANARY


# ---- the other ways in -----------------------------------------------------------------------

def test_kubeconfig_option(kube, pods, upstreams, tmp_path):
    """``--kubeconfig``: https API server, its CA (inline data) and the token from the
    fake's kubeconfig; the namespace from the environment."""
    path = tmp_path / "kubeconfig"
    path.write_text(kube.kubeconfig_yaml(tls=True))
    pods("kc-0", "kc", upstreams["C"])
    proc = RouterProcess(tmp_path / "router.log", namespace=NS, args=("--kubeconfig", str(path)))
    try:
        proc.wait_synced()
        response = httpx.post(f"{proc.url}/v1/completions", json={"model": "kc"},
                              trust_env=False)
        assert response.json()["upstream"] == "C"
        assert TOKEN_CANARY not in proc.output()
    finally:
        proc.stop()


def test_healthz_is_503_until_the_first_list(tmp_path):
    """A router whose API is unreachable never synced: /healthz says 503 (the pod is not
    ready), and requests get OpenAI errors, not hangs."""
    token = tmp_path / "token"
    token.write_text("unused\n")
    proc = RouterProcess(tmp_path / "router.log", api_url=f"http://127.0.0.1:{free_port()}",
                         namespace=NS, token_file=token)
    try:
        response = wait_http(f"{proc.url}/healthz", proc=proc.proc,
                             ok=lambda r: r.json()["watch"]["state"] == "backoff")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "starting" and body["watch"]["synced"] is False
        assert "ConnectError" in body["watch"]["last_error"]
        assert httpx.post(f"{proc.url}/v1/completions", json={"model": "x"},
                          trust_env=False).status_code == 404
    finally:
        proc.stop()


# ---- secrets (last: reads everything the router has printed) ---------------------------------

def test_secrets_never_logged(client, router, pods, upstreams):
    pods("secret-0", "secret", upstreams["A"])
    eventually(lambda: "secret" in models(client), what="model listed")
    response = client.post("/v1/chat/completions",
                           json={"model": "secret", "messages": [{"content": BODY_CANARY}]},
                           headers={"authorization": f"Bearer {CLIENT_KEY_CANARY}"})
    assert response.status_code == 200
    client.post("/v1/chat/completions", content=f'{{"model": {BODY_CANARY}'.encode())
    ask(client, BODY_CANARY)  # an unknown model named like a secret: 404, not logged either
    output = router.output()
    assert "POST /v1/chat/completions" in output  # the access log is really captured
    assert TOKEN_CANARY not in output
    assert CLIENT_KEY_CANARY not in output
    assert BODY_CANARY not in output
