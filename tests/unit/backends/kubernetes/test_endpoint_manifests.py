"""An endpoint version's Kubernetes objects and each engine's command line, built from the spec
(no API server needed). The flags are those each engine documents (airfleet/engines.py cites
the pages); the mock engine's are checked against its real argument parser."""

from __future__ import annotations

import json
from typing import Any

import airfleet_mock_engine.__main__ as mock_cli
import pytest

from airfleet import engines
from airfleet.backends.kubernetes import manifests as m
from airfleet.endpoints import EndpointVersion, example_endpoint
from airfleet.resources import Cluster, NodeStatus


def cluster(caches=(), nodes: list[NodeStatus] = (), **block: Any) -> Cluster:
    provider, config = ("eks", {"eks": block}) if block else \
        ("existing", {"kubernetes": {"credential": {"airflow_conn_id": "k8s"}}})
    if block:
        config["kubernetes"] = {}
    return Cluster.model_validate({
        "metadata": {"name": "llm-a"},
        "spec": {"type": "kubernetes", "provider": provider, "model_caches": list(caches),
                 "config": config},
        "status": {"phase": "Running", "nodes": [n.model_dump() for n in nodes]}})


def endpoint(**spec: Any) -> EndpointVersion:
    data = example_endpoint()
    data["spec"].update(spec)
    return EndpointVersion.model_validate(data)


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


# ---- command lines --------------------------------------------------------------------------

def test_vllm_command_follows_vllm_serve():
    e = endpoint(engine="vllm", model={"name": "Qwen/Qwen2.5-7B-Instruct", "revision": "a1b2",
                                        "served_name": "qwen"},
                 resources={"gpu": 2}, max_model_len=8192,
                 engine_args={"gpu-memory-utilization": 0.9, "enforce-eager": True,
                              "disable-log-requests": False})
    assert engines.command(e.spec, cache_dir="/models/hf") == [
        "vllm", "serve", "Qwen/Qwen2.5-7B-Instruct", "--host", "0.0.0.0", "--port", "8000",
        "--served-model-name", "qwen", "--revision", "a1b2", "--max-model-len", "8192",
        "--tensor-parallel-size", "2", "--download-dir", "/models/hf",
        "--gpu-memory-utilization", "0.9", "--enforce-eager"]


def test_sglang_command_follows_launch_server_and_enables_metrics():
    e = endpoint(engine="sglang", model={"name": "meta-llama/Llama-3.1-8B-Instruct"},
                 resources={"gpu": 4}, expected_tokens={"input": 3000, "output": 1000})
    assert engines.command(e.spec) == [
        "python3", "-m", "sglang.launch_server", "--model-path",
        "meta-llama/Llama-3.1-8B-Instruct", "--enable-metrics", "--host", "0.0.0.0",
        "--port", "8000", "--served-model-name", "meta-llama/Llama-3.1-8B-Instruct",
        "--context-length", "4400", "--tp-size", "4"]


def test_mock_command_is_accepted_by_the_mock_engines_own_parser():
    e = endpoint(max_model_len=2048, engine_args={"token-latency-ms": 5})
    argv = engines.command(e.spec, cache_dir="/models/hf")
    assert argv[:4] == ["python", "-m", "airfleet_mock_engine", "--model"]
    assert "--download-dir" not in argv and "--revision" not in argv
    parsed = mock_cli.parser().parse_args(argv[3:])  # the real CLI, not a copy of its flags
    assert parsed.served_model_name in ("chat", ["chat"])
    assert parsed.max_model_len == 2048 and parsed.port == 8000


# ---- the Deployment -------------------------------------------------------------------------

def test_deployment_labels_annotations_and_probes_are_what_the_router_reads():
    d = m.endpoint_deployment(cluster(), endpoint(model={"name": "Qwen/Qwen2.5-0.5B-Instruct"}),
                              [])
    assert d["metadata"]["name"] == "chat-v1"
    assert d["metadata"]["namespace"] == m.namespace_of("llm-a")
    template = d["spec"]["template"]
    assert template["metadata"]["labels"][m.ENDPOINT_LABEL] == "chat"
    assert template["metadata"]["labels"][m.VERSION_LABEL] == "v1"
    assert template["metadata"]["labels"][m.MODEL_LABEL] == "Qwen-Qwen2.5-0.5B-Instruct"
    assert template["metadata"]["annotations"][m.SERVED_ANNOTATION] == \
        "Qwen/Qwen2.5-0.5B-Instruct"
    selector = d["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    container = pod_spec(d)["containers"][0]
    assert container["ports"] == [{"name": "metrics", "containerPort": 8000, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "metrics"}
    assert container["image"] == "airfleet/mock-engine:0.1.0"
    assert "resources" not in container or not container["resources"].get("limits")
    assert "nodeSelector" not in pod_spec(d)


def test_two_versions_are_two_deployments_whose_selectors_do_not_overlap():
    v1 = m.endpoint_deployment(cluster(), endpoint(version="v1"), [])
    v2 = m.endpoint_deployment(cluster(), endpoint(version="v2", traffic_weight=10), [])
    assert v1["metadata"]["name"] != v2["metadata"]["name"]
    assert v1["spec"]["selector"] != v2["spec"]["selector"]


def test_gpus_cache_and_pool_taints():
    node = NodeStatus(name="ip-10-0-0-9", labels={m.GPU_PRODUCT_LABEL: "NVIDIA-H100-80GB-HBM3",
                                                   m.GPU_PRESENT_LABEL: "true"})
    other = NodeStatus(name="ip-10-0-0-8", labels={m.GPU_PRODUCT_LABEL: "NVIDIA-A10G"})
    c = cluster(caches=[{"name": "hf", "pvc": {"size": "100Gi"}}], nodes=[node, other],
                region="us-east-1", role_arn="arn:aws:iam::1:role/eks", subnet_ids=["s-1", "s-2"],
                credential={"airflow_conn_id": "aws"}, node_role_arn="arn:aws:iam::1:role/node",
                node_pools=[{"name": "gpu", "instance_types": ["g5.xlarge"], "gpu": True,
                             "taints": [{"key": "sku", "value": "gpu",
                                         "effect": "NoSchedule"}]}])
    d = m.endpoint_deployment(c, endpoint(engine="vllm", resources={"gpu": 2, "gpu_model": "H100",
                                                                    "memory": "64Gi"},
                                          model={"name": "m", "cache": "hf"}), ["airfleet-registry"])
    spec = pod_spec(d)
    container = spec["containers"][0]
    assert container["resources"] == {"requests": {"memory": "64Gi"},
                                      "limits": {"memory": "64Gi", "nvidia.com/gpu": "2"}}
    assert spec["nodeSelector"] == {m.GPU_PRESENT_LABEL: "true"}
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchExpressions"] == [
        {"key": m.GPU_PRODUCT_LABEL, "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}]
    assert {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"} in \
        spec["tolerations"]
    assert {"name": "hf", "persistentVolumeClaim": {"claimName": "cache-hf"}} in spec["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in spec["volumes"]
    assert {"name": "hf", "mountPath": "/models/hf"} in container["volumeMounts"]
    assert container["command"][container["command"].index("--download-dir") + 1] == "/models/hf"
    assert container["image"] == m.ENGINE_IMAGES["vllm"]
    assert spec["imagePullSecrets"] == [{"name": "airfleet-registry"}]


def test_the_spec_image_overrides_the_engine_default():
    d = m.endpoint_deployment(cluster(), endpoint(image="registry.example:5000/mock:1.2"), [])
    assert pod_spec(d)["containers"][0]["image"] == "registry.example:5000/mock:1.2"


def test_routes_configmap_holds_each_models_version_weights():
    cm = m.routes(cluster(), [endpoint(version="v1", traffic_weight=90),
                              endpoint(version="v2", traffic_weight=10),
                              endpoint(model={"name": "e5", "served_name": "embed"})])
    assert cm["metadata"]["name"] == m.ROUTES
    assert json.loads(cm["data"]["routes.json"]) == {
        "models": {"chat": {"v1": 90, "v2": 10}, "embed": {"v1": 100}}}


@pytest.mark.parametrize("text, value", [
    ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen-Qwen2.5-0.5B-Instruct"),
    ("/models/hf/llama", "models-hf-llama"),
    ("x" * 80, "x" * 63),
])
def test_label_value(text, value):
    assert m.label_value(text) == value
