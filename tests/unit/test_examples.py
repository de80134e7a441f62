"""The shipped examples (examples/*.json) and the README's own JSON examples are valid
clusters, by the pydantic models (the first task) and by the Param schema (the REST API's
400); the trigger form's example is examples/llm-a.json; the README's runnable blocks parse.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from jsonschema import FormatChecker
from jsonschema.validators import validator_for

from airfleet.resources import (
    ClusterConf,
    ClusterRequest,
    example_cluster,
    param_schemas,
    parse_conf,
)
from tests.e2e.test_readme import runnable_blocks

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.json"))
README = (ROOT / "README.md").read_text()
SCHEMA = param_schemas(ClusterConf)["cluster"]


def schema_errors(cluster: dict) -> list[str]:
    validator = validator_for(SCHEMA)(SCHEMA, format_checker=FormatChecker())
    return [e.message for e in validator.iter_errors(cluster)]


def readme_clusters() -> list[dict]:
    """Every ```json block of the README that is a conf with a cluster."""
    blocks = re.findall(r"^```json\n(.*?)^```", README, re.M | re.S)
    confs = [json.loads(b) for b in blocks]
    return [c["cluster"] for c in confs if "cluster" in c]


def test_the_examples_the_readme_names_are_shipped():
    named = set(re.findall(r"examples/([\w.-]+\.json)", README))
    assert {"llm-a.json", "llm-a-3-nodes.json", "existing.json"} <= named
    assert named <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_each_example_is_a_valid_cluster(path):
    cluster = json.loads(path.read_text())
    assert set(cluster) == {"metadata", "spec"}
    ClusterRequest.model_validate(cluster)
    assert schema_errors(cluster) == []


def test_the_readme_json_examples_are_valid_and_match_the_shipped_files():
    clusters = readme_clusters()
    assert len(clusters) >= 3
    shipped = {p.stem: json.loads(p.read_text()) for p in EXAMPLES}
    for cluster in clusters:
        parse_conf(ClusterConf, {"cluster": cluster})
        assert schema_errors(cluster) == []
        name = cluster["metadata"]["name"]
        if name in shipped:  # one example, said the same way in both places
            assert cluster == shipped[name], name


def test_the_form_example_is_llm_a_json():
    shipped = json.loads((ROOT / "examples" / "llm-a.json").read_text())
    assert example_cluster() == shipped
    md = SCHEMA["description_md"]
    assert json.loads(md.split("```json\n", 1)[1].split("\n```", 1)[0]) == shipped


def test_the_cluster_param_has_no_default():
    """A REST trigger without ``cluster`` stays a 400: no default could stand in for it."""
    assert "default" not in SCHEMA


def test_the_readme_runnable_blocks_are_bash():
    blocks = runnable_blocks(README)
    assert len(blocks) >= 5
    for block in blocks:
        done = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert done.returncode == 0, f"{block}\n{done.stderr}"


ENDPOINT_EXAMPLES = sorted((ROOT / "examples" / "endpoints").glob("*.json"))


def endpoint_schema_errors(endpoint: dict) -> list[str]:
    from airfleet.endpoints import DeployConf, endpoint_param_schemas

    schema = endpoint_param_schemas(DeployConf)["endpoint"]
    validator = validator_for(schema)(schema, format_checker=FormatChecker())
    return [e.message for e in validator.iter_errors(endpoint)]


def test_the_endpoint_examples_and_the_readmes_are_valid_endpoints():
    from airfleet.endpoints import DeployConf, example_endpoint

    assert [p.name for p in ENDPOINT_EXAMPLES] == ["chat.json"]
    assert json.loads(ENDPOINT_EXAMPLES[0].read_text()) == example_endpoint()
    assert "examples/endpoints/chat.json" in README
    blocks = [json.loads(b) for b in re.findall(r"^```json\n(.*?)^```", README, re.M | re.S)]
    endpoints = [b["endpoint"] for b in blocks if "endpoint" in b]
    assert endpoints, "the README shows an endpoint"
    for endpoint in [json.loads(p.read_text()) for p in ENDPOINT_EXAMPLES] + endpoints:
        parse_conf(DeployConf, {"endpoint": endpoint})
        assert endpoint_schema_errors(endpoint) == []
