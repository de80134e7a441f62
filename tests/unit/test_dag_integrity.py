"""Every DAG file imports cleanly, has tags and docs, takes its Params from the models, and
reads no connection or variable (and imports none of the store, vault or backends) at parse
time. Each file is parsed in a fresh interpreter with a secrets backend that records look-ups.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from airfleet.endpoints import ENDPOINT_CONF, endpoint_param_schemas
from airfleet.resources import FLOW_CONF, param_schemas

ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted((ROOT / "dags").glob("*.py"))
EXPECTED = {"airfleet_cluster_create": "create", "airfleet_cluster_update": "update",
            "airfleet_cluster_delete": "delete", "airfleet_cluster_onboard": "onboard",
            "airfleet_cluster_health_check": "health_check",
            "airfleet_endpoint_deploy": "endpoint_deploy",
            "airfleet_endpoint_scale": "endpoint_scale",
            "airfleet_endpoint_delete": "endpoint_delete"}
HEAVY = ["airfleet.store", "airfleet.vault", "airfleet.crypto", "airfleet.flows",
         "airfleet.backends", "cryptography.hazmat.primitives.ciphers.aead"]

_PROBE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(sys.argv[1])
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "dags": {d.dag_id: {"tags": sorted(d.tags), "doc_md": d.doc_md or "",
                        "schedule": repr(d.schedule),
                        "max_active_runs": d.max_active_runs, "catchup": d.catchup,
                        "params": {k: v.schema for k, v in d.params.items()},
                        "tasks": [t.task_id for t in d.tasks],
                        "setup": [t.task_id for t in d.tasks if t.is_setup],
                        "teardown": [t.task_id for t in d.tasks if t.is_teardown]}
             for d in bag.dags.values()},
    "heavy": [m for m in sys.argv[2].split(",") if m in sys.modules]}))
"""


def parse(path: Path) -> dict:
    lookups = Path(tempfile.mkdtemp()) / "lookups.txt"
    lookups.touch()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT}",
           "AIRFLOW__SECRETS__BACKEND": "tests.fakes.forbidding_secrets.RecordLookups",
           "AIRFLOW__SECRETS__BACKEND_KWARGS": "{}", "AIRFLEET_LOOKUP_LOG": str(lookups)}
    done = subprocess.run([sys.executable, "-c", _PROBE, str(path), ",".join(HEAVY)], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, f"parsing {path.name} crashed:\n{done.stderr[-2000:]}"
    return {**json.loads(done.stdout.strip().splitlines()[-1]),
            "lookups": lookups.read_text().splitlines()}


@pytest.fixture(scope="module", params=DAG_FILES, ids=lambda p: p.name)
def parsed(request) -> tuple[Path, dict]:
    return request.param, parse(request.param)


def test_the_flows_are_there():
    assert sorted(p.stem for p in DAG_FILES) == sorted(EXPECTED)


def test_imports_with_one_dag_tags_docs_and_no_heavy_imports(parsed):
    path, result = parsed
    assert result["errors"] == {}
    assert list(result["dags"]) == [path.stem]  # one DAG per file, named like it
    dag = result["dags"][path.stem]
    assert "airfleet" in dag["tags"]
    assert len(dag["doc_md"]) > 80 and "Conf" in dag["doc_md"] or "names" in dag["doc_md"]
    assert result["heavy"] == [], "imported at parse time: move into the task"
    assert result["lookups"] == [], "connection/variable read at parse time"


def test_params_are_generated_from_the_models(parsed):
    path, result = parsed
    flow = EXPECTED[path.stem]
    schemas = param_schemas(FLOW_CONF[flow]) if flow in FLOW_CONF else \
        endpoint_param_schemas(ENDPOINT_CONF[flow])
    expected = json.loads(json.dumps(schemas))
    params = result["dags"][path.stem]["params"]
    for schema in [*expected.values(), *params.values()]:  # Param keeps these beside the schema
        schema.pop("description", None)
        schema.pop("default", None)
    assert params == expected


def test_mutating_flows_share_the_lease_shape(parsed):
    path, result = parsed
    dag = result["dags"][path.stem]
    if path.stem == "airfleet_cluster_health_check":
        assert dag["setup"] == [] and dag["teardown"] == []  # health checks take no lease
        assert dag["max_active_runs"] == 1 and dag["catchup"] is False
        assert dag["schedule"] == "datetime.timedelta(seconds=300)"
        return
    # admit (validate, lease, policies, first writes) first; the lease teardown has no setup
    # task, so it runs even when admit failed after it took the lease.
    assert dag["tasks"][0] == "admit"
    assert dag["setup"] == [] and dag["teardown"] == ["release_lease"]
    assert "watcher" in dag["tasks"]


def test_a_parse_time_lookup_would_be_caught(tmp_path):
    """The guard itself works: a DAG file that reads a variable at parse time fails."""
    bad = tmp_path / "bad_dag.py"
    bad.write_text("from airflow.sdk import Variable, dag  # noqa\nVariable.get('x')\n")
    result = parse(bad)
    assert result["lookups"] == ["variable x"]


def test_a_bad_number_of_health_check_parts_is_an_import_error_naming_the_setting(monkeypatch):
    monkeypatch.setenv("AIRFLEET_HEALTH_SHARDS", "0")
    result = parse(ROOT / "dags" / "airfleet_cluster_health_check.py")
    assert "airfleet_cluster_health_check" not in result["dags"]
    (error,) = result["errors"].values()
    assert "AIRFLEET_HEALTH_SHARDS='0': set it to a whole number from 1 to 64" in error
