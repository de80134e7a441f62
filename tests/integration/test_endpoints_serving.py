"""An endpoint serves, end to end on a Kubernetes cluster: the endpoint DAGs (``dag.test()``)
write the Deployments and the routes; the fake API server's kubelet runs each pod of the mock
engine's image as a real process (its probes decide Ready); the real router, with only its
ServiceAccount's Role, discovers the pods and routes real requests to them.

What a user would check: a streamed chat answer through the router; a 90/10 canary split over
2,000 conversations within 5 points; a session staying on its engine; traffic moved to the new
version without restarting the old one."""

from __future__ import annotations

import json
import re
from collections import Counter

import httpx
import pytest

from airfleet.backends.kubernetes import manifests as m
from airfleet.endpoints import EndpointPhase, example_endpoint
from airfleet.store import Store
from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.fakes.kube_kubelet import python_module_runner
from tests.integration.kube_support import cluster, kube, run, states  # noqa: F401 - fixtures
from tests.router_support import RouterProcess

pytestmark = pytest.mark.integration

NS = m.namespace_of("llm-a")
MODEL = "chat"
CONVERSATIONS = 2000


@pytest.fixture(scope="module")
def server():
    """The fake API server, running the mock engine's image as processes."""
    runner = python_module_runner("airfleet_mock_engine")
    image = m.ENGINE_IMAGES["mock"].split(":")[0]
    with FakeKubeAPIServer(ready_delay=0.3, terminate_delay=0.2,
                           run_images={image: runner}) as server:
        yield server


@pytest.fixture
def router(kube, tmp_path):
    token_file, ca_file = tmp_path / "token", tmp_path / "ca.pem"
    ca_file.write_bytes(kube.ca_pem)

    def start() -> RouterProcess:
        token_file.write_text(kube.service_account_token(NS, m.POD_READER))
        return RouterProcess(tmp_path / "router.log", api_url=kube.https_url, namespace=NS,
                             token_file=token_file, AIRFLEET_ROUTER_CA_FILE=str(ca_file),
                             AIRFLEET_ROUTER_WATCH_TIMEOUT="1").wait_synced()

    started: list[RouterProcess] = []
    yield lambda: started.append(start()) or started[-1]
    for proc in started:
        proc.stop()


def deploy(dags, **spec) -> None:
    data = example_endpoint()
    data["spec"].update(spec)
    dr = run(dags, "airfleet_endpoint_deploy", {"endpoint": data})
    assert str(dr.state) == "success", states(dr)


def version_of(engine: str) -> str:
    """The version a pod serves, from its name (<endpoint>-<version>-<replica set>-<pod>)."""
    found = re.fullmatch(rf"{MODEL}-(v\d+)-[a-z0-9]+-[a-z0-9]+", engine)
    assert found, f"{engine!r} is not a pod of the {MODEL} endpoint"
    return found.group(1)


def test_a_deployed_endpoint_serves_through_the_router_with_a_canary_split(dags, kube, router):
    assert str(run(dags, "airfleet_cluster_create", {"cluster": cluster(kube)}).state) == \
        "success"
    deploy(dags, replicas=2)
    v1 = Store().get_endpoint(MODEL, "v1")
    assert v1.phase is EndpointPhase.RUNNING
    assert v1.endpoint.status.ready_replicas == 2
    pods = [p["metadata"]["name"] for p in kube.list("Pod", NS)
            if p["metadata"]["labels"].get(m.ENDPOINT_LABEL) == MODEL]
    assert {pod for _, pod, _ in kube.processes.pids(NS)} == set(pods), kube.processes.pids(NS)

    proc = router()
    with httpx.Client(base_url=proc.url, timeout=30, trust_env=False) as client:
        # A streamed answer, chunk by chunk, from an engine the deploy started.
        body = {"model": MODEL, "stream": True, "max_tokens": 4,
                "messages": [{"role": "user", "content": "hello through the router"}]}
        with client.stream("POST", "/v1/chat/completions", json=body) as answer:
            assert answer.status_code == 200, answer.read()
            assert answer.headers["x-airfleet-engine"] in pods
            chunks = [line for line in answer.iter_lines() if line.startswith("data: ")]
        assert chunks[-1] == "data: [DONE]" and len(chunks) >= 3, chunks
        text = "".join(json.loads(c[6:])["choices"][0]["delta"].get("content", "")
                       for c in chunks[:-1])
        assert text == "hello through the router"  # the prompt's words, max_tokens of them

        # A canary: v2 at 10 %, v1 keeps the rest without a restart.
        generation = kube.get("Deployment", f"{MODEL}-v1", NS)["metadata"]["generation"]
        deploy(dags, version="v2", traffic_weight=10)
        assert kube.get("Deployment", f"{MODEL}-v1", NS)["metadata"]["generation"] == generation
        served: Counter[str] = Counter()
        for i in range(CONVERSATIONS):
            answer = client.post("/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 1,
                "messages": [{"role": "user", "content": f"conversation {i}"}]})
            assert answer.status_code == 200, answer.text
            served[version_of(answer.headers["x-airfleet-engine"])] += 1
        assert set(served) == {"v1", "v2"}, served
        assert abs(served["v2"] / CONVERSATIONS - 0.10) <= 0.05, served

        # One session, one engine.
        engines = {client.post("/v1/chat/completions", headers={"X-Session-ID": "s-42"},
                               json={"model": MODEL, "max_tokens": 1, "messages": [
                                   {"role": "user", "content": f"turn {i}"}]},
                               ).headers["x-airfleet-engine"] for i in range(20)}
        assert len(engines) == 1, engines

        # All traffic to v2, then v1 deleted: every answer comes from v2 and none fails.
        deploy(dags, version="v2", traffic_weight=100)
        dr = run(dags, "airfleet_endpoint_delete", {"name": MODEL, "version": "v1"})
        assert str(dr.state) == "success", states(dr)
        after = Counter(version_of(client.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 1,
            "messages": [{"role": "user", "content": f"after {i}"}]}).headers[
                "x-airfleet-engine"]) for i in range(50))
        assert after == {"v2": 50}, after
    assert not [p for p in kube.list("Pod", NS)
                if p["metadata"]["labels"].get(m.VERSION_LABEL) == "v1"]
