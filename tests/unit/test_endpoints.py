"""The Endpoint resource (airfleet.endpoints): its schema rules, the max_model_len rule, the
traffic rebalance and the placement checks that need the cluster's record."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest

from airfleet.endpoints import (
    ENDPOINT_CONF,
    DeployConf,
    EndpointSpec,
    EndpointVersion,
    check_placement,
    example_endpoint,
    gpus_per_node,
    model_matches,
    rebalanced,
)
from airfleet.errors import InvalidRequest
from airfleet.resources import Cluster, param_schemas, parse_conf


def conf(**spec: Any) -> dict[str, Any]:
    endpoint = example_endpoint()
    endpoint["spec"].update(spec)
    return {"endpoint": endpoint}


def spec(**fields: Any) -> EndpointSpec:
    return parse_conf(DeployConf, conf(**fields)).endpoint.spec


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(InvalidRequest) as caught:
        parse_conf(DeployConf, data)
    return str(caught.value)


def test_the_example_is_valid_for_pydantic_and_for_the_param_schema():
    data = conf()
    parse_conf(DeployConf, data)
    jsonschema.validate(data["endpoint"], param_schemas(DeployConf)["endpoint"])


@pytest.mark.parametrize("action", sorted(ENDPOINT_CONF))
def test_every_flow_conf_has_a_draft7_param_schema(action):
    for schema in param_schemas(ENDPOINT_CONF[action]).values():
        jsonschema.Draft7Validator.check_schema(schema)


@pytest.mark.parametrize("bad, field, words", [
    ({"engine_args": {"hf-token": "hf_x"}}, "engine_args.hf-token", "command line"),
    ({"engine_args": {"api-key": "k"}}, "engine_args.api-key", "command line"),
    ({"engine_args": {"port": 9000}}, "engine_args.port", "sets --port itself"),
    ({"engine_args": {"--dtype": "half"}}, "engine_args", "pattern"),
    ({"engine": "vllm"}, "resources.gpu", "use engine mock"),
    ({"resources": {"gpu_model": "H100"}}, "resources.gpu_model", "resources.gpu of at least 1"),
    ({"traffic_weight": 101}, "traffic_weight", "less than or equal to 100"),
    ({"version": "V1"}, "version", "pattern"),
    ({"max_model_len": 9000, "model": {"name": "m", "context_length": 8192}},
     "max_model_len", "beyond the model's context_length 8192"),
    ({"password": "x"}, "password", "plaintext secrets are not accepted"),
])
def test_bad_input_names_the_field(bad, field, words):
    message = refused(conf(**bad))
    assert f"endpoint.spec.{field}" in message
    assert words in message


def test_the_param_schema_refuses_what_pydantic_refuses_on_its_own_fields():
    schema = param_schemas(DeployConf)["endpoint"]
    for bad in ({"traffic_weight": 101}, {"replicas": -1}, {"engine": "tgi"},
                {"version": "V1"}, {"unknown": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(conf(**bad)["endpoint"], schema)


@pytest.mark.parametrize("flag", ["max-num-batched-tokens", "token-latency-ms",
                                  "tokenizer-mode", "ssl-keyfile"])
def test_flags_that_only_mention_tokens_or_keys_are_not_secrets(flag):
    assert spec(engine_args={flag: "1"}).engine_args == {flag: "1"}


@pytest.mark.parametrize("flag", ["hf-token", "api-key", "auth-token", "password",
                                  "aws-secret-key", "client-secret"])
def test_flags_that_carry_secrets_are_refused(flag):
    assert f"endpoint.spec.engine_args.{flag}: a secret on the engine's command line" in \
        refused(conf(engine_args={flag: "x"}))


def test_max_model_len_rule():
    assert spec().effective_max_model_len is None
    assert spec(max_model_len=4096).effective_max_model_len == 4096
    # ceil((1000 + 500) * 1.1) = 1650
    assert spec(expected_tokens={"input": 1000, "output": 500}).effective_max_model_len == 1650
    capped = spec(expected_tokens={"input": 8000, "output": 2000},
                  model={"name": "m", "context_length": 8192})
    assert capped.effective_max_model_len == 8192


@pytest.mark.parametrize("weights, version, weight, expected", [
    ({"v1": 100}, "v2", 10, {"v1": 90, "v2": 10}),
    ({"v1": 90, "v2": 10}, "v2", 100, {"v1": 0, "v2": 100}),
    ({"v1": 0, "v2": 100}, "v1", 50, {"v1": 50, "v2": 50}),
    ({"v1": 0, "v2": 0, "v3": 100}, "v3", 1, {"v1": 50, "v2": 49, "v3": 1}),
    ({"v1": 50, "v2": 25, "v3": 25}, "v3", 33, {"v1": 45, "v2": 22, "v3": 33}),
    ({}, "v1", 100, {"v1": 100}),
])
def test_rebalanced_weights_sum_to_100(weights, version, weight, expected):
    got = rebalanced(weights, version, weight)
    assert got == expected
    assert sum(got.values()) == 100


def test_a_lone_version_below_100_is_refused():
    with pytest.raises(InvalidRequest, match=r"traffic_weight: v1 is the endpoint's only "
                                             r"version.*would not sum to 100"):
        rebalanced({}, "v1", 10)


# ---- placement ------------------------------------------------------------------------------

def cluster(phase: str = "Running", nodes: dict[str, dict[str, int]] | None = None,
            caches: tuple[str, ...] = ("hf",)) -> Cluster:
    per_node = {node: {"count": sum(models.values()), "models": models}
                for node, models in (nodes or {}).items()}
    totals: dict[str, int] = {}
    for models in (nodes or {}).values():
        for m, n in models.items():
            totals[m] = totals.get(m, 0) + n
    return Cluster.model_validate({
        "metadata": {"name": "llm-a"},
        "spec": {"type": "ssh", "provider": "static",
                 "model_caches": [{"name": c, "host_path": {"path": f"/data/{c}"}}
                                  for c in caches],
                 "config": {"ssh": {"head": "10.0.0.2",
                                    "credential": {"airflow_conn_id": "ssh_fleet"}}}},
        "status": {"phase": phase,
                   "accelerators": {"count": sum(totals.values()), "models": totals,
                                    "nodes": per_node}}})


H100 = "NVIDIA H100 80GB HBM3"
A10 = "NVIDIA A10G"
GPU_CLUSTER = {"10.0.0.2": {H100: 4}, "10.0.0.3": {H100: 2, A10: 1}}


def placed(s: EndpointSpec, c: Cluster | None, others=()) -> str:
    with pytest.raises(InvalidRequest) as caught:
        check_placement(s, c, others)
    return str(caught.value)


def test_a_mock_endpoint_fits_a_running_cluster_without_gpus():
    check_placement(spec(model={"name": "m", "cache": "hf"}), cluster())


def test_unknown_and_not_running_clusters_are_refused():
    assert "endpoint.spec.cluster: cluster llm-a is not registered" in placed(spec(), None)
    message = placed(spec(), cluster("Failed"))
    assert "endpoint.spec.cluster: cluster llm-a is Failed" in message
    assert "only on a Running cluster" in message


def test_an_unknown_cache_names_the_ones_there_are():
    message = placed(spec(model={"name": "m", "cache": "nfs"}), cluster(caches=("hf", "s3")))
    assert "endpoint.spec.model.cache: cluster llm-a has no model cache 'nfs'" in message
    assert "(it has: hf, s3)" in message


def test_gpus_on_a_cluster_without_any():
    message = placed(spec(resources={"gpu": 1}), cluster())
    assert "endpoint.spec.resources.gpu: cluster llm-a has no usable GPUs" in message


def test_a_gpu_model_the_cluster_lacks_names_what_it_has():
    message = placed(spec(resources={"gpu": 1, "gpu_model": "B200"}), cluster(nodes=GPU_CLUSTER))
    assert "endpoint.spec.resources.gpu_model: cluster llm-a has no B200 GPUs" in message
    assert f"{H100} x6" in message and f"{A10} x1" in message


def test_a_replica_must_fit_on_one_node():
    message = placed(spec(engine="vllm", resources={"gpu": 8}), cluster(nodes=GPU_CLUSTER))
    assert "endpoint.spec.resources.gpu: a replica needs 8 GPUs on one node" in message
    assert "largest node of cluster llm-a has 4" in message


def test_replicas_beyond_the_gpus_are_refused_counting_other_endpoints():
    c = cluster(nodes=GPU_CLUSTER)
    # 2-GPU replicas of H100: node 1 holds 2, node 2 holds 1.
    check_placement(spec(engine="vllm", replicas=3, resources={"gpu": 2, "gpu_model": "h100"}), c)
    message = placed(spec(engine="vllm", replicas=4, resources={"gpu": 2, "gpu_model": "H100"}), c)
    assert "endpoint.spec.replicas: 4 replicas of 2 GPU(s) do not fit" in message
    assert "at most 3 replica(s) fit" in message
    other = EndpointVersion.model_validate({
        "metadata": {"name": "other"},
        "spec": {**conf()["endpoint"]["spec"], "engine": "vllm", "replicas": 2,
                 "resources": {"gpu": 1}}})
    message = placed(spec(engine="vllm", replicas=3, resources={"gpu": 2, "gpu_model": "H100"}),
                     c, [other])
    assert "other endpoints use 2" in message


def test_gpu_models_match_by_words_ignoring_case_and_separators():
    assert model_matches("H100", H100)
    assert model_matches("nvidia-h100-80gb-hbm3", H100)
    assert model_matches("H100 80GB", "NVIDIA-H100-80GB-HBM3")
    assert not model_matches("H10", H100)
    assert not model_matches("A100", H100)
    assert gpus_per_node(cluster(nodes=GPU_CLUSTER), "a10g") == {"10.0.0.2": 0, "10.0.0.3": 1}


def test_examples_do_not_share_state():
    a = example_endpoint()
    a["spec"]["replicas"] = 9
    assert example_endpoint()["spec"]["replicas"] == 1
    assert copy.deepcopy(a) == a
