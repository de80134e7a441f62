"""The fake OPA server (tests/fakes/opa_server.py) over raw HTTP, each behaviour as OPA's REST
API reference states it (https://www.openpolicyagent.org/docs/rest-api) and its policy
language reference (https://www.openpolicyagent.org/docs/policy-language) has Rego v1
evaluate it. What Airfleet's http policy mode relies on: the input wrapped in ``input``, the
value in ``result``, and no ``result`` at all for an undefined document."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.fakes.opa_server import OpaServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = (ROOT / "policies" / "opa" / "delete_cluster.rego").read_text()
PROD = {"cluster": {"name": "llm-a", "labels": {"env": "prod"}}}
DEV = {"cluster": {"name": "llm-b", "labels": {"env": "dev"}}}


@pytest.fixture(scope="module")
def opa():
    with OpaServer() as server:
        put = httpx.put(f"{server.url}/v1/policies/airfleet/delete_cluster", content=SHIPPED)
        assert put.status_code == 200 and put.json() == {}
        yield server


def data(opa: OpaServer, path: str, body) -> httpx.Response:
    return httpx.post(f"{opa.url}/v1/data/{path}", json=body)


def test_a_rule_is_read_with_the_input_wrapped_in_input(opa):
    # "Get a Document (with Input)": POST /v1/data/{path} {"input": ...} -> 200 {"result": ...}
    prod = data(opa, "airfleet/delete_cluster/decision", {"input": PROD})
    assert prod.status_code == 200
    assert prod.json() == {"result": {"allowed": False, "reason": (
        "cluster llm-a is labelled env=prod: deleting it needs the label changed first")}}
    assert data(opa, "airfleet/delete_cluster/allow", {"input": DEV}).json() == {"result": True}
    assert data(opa, "airfleet/delete_cluster/allow", {"input": PROD}).json() == {"result": False}


def test_a_package_path_answers_the_object_of_its_rules(opa):
    # The data document is a tree: a package's value is the object of its rules' values.
    assert data(opa, "airfleet/delete_cluster", {"input": DEV}).json() == {"result": {
        "allow": True, "decision": {"allowed": True, "reason": "not a production cluster"}}}


def test_an_undefined_document_answers_200_without_result(opa):
    # "If the path refers to an undefined document, the response will not contain a result
    # property": no such rule, no such package, and a rule without default whose body fails.
    assert data(opa, "airfleet/delete_cluster/nope", {"input": PROD}).json() == {}
    assert data(opa, "airfleet/elsewhere/allow", {"input": PROD}).json() == {}
    put = httpx.put(f"{opa.url}/v1/policies/strict", content=(
        "package strict\n\nallow if input.ok == true\n"))  # Rego v1: no `import rego.v1` needed
    assert put.status_code == 200
    assert data(opa, "strict/allow", {"input": {"ok": False}}).json() == {}
    assert data(opa, "strict/allow", {"input": {"ok": True}}).json() == {"result": True}


def test_the_input_is_read_only_from_the_input_key(opa):
    # A body without "input" leaves input undefined and warns (api_usage_warning): a raw
    # request posted as the body is not what the rules see.
    answer = data(opa, "airfleet/delete_cluster/decision", PROD).json()
    assert answer["warning"]["code"] == "api_usage_warning"
    assert answer["result"] == {"allowed": True, "reason": "not a production cluster"}


def test_bad_modules_and_bodies_are_400_invalid_parameter(opa):
    bad = httpx.put(f"{opa.url}/v1/policies/broken", content="package broken\n\nallow if {\n")
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_parameter"
    assert "broken" not in opa.modules  # nothing loaded
    garbage = httpx.post(f"{opa.url}/v1/data/airfleet/delete_cluster/allow", content=b"{nope")
    assert garbage.status_code == 400 and garbage.json()["code"] == "invalid_parameter"
