"""Benchmark: how long Airflow takes to parse each DAG file (targets: each file under 0.3 s,
the whole folder under 1 s). Prints the figures and writes them to
``tests/benchmarks/results/dag_parse_time.json``; it asserts nothing about time.

Each file is parsed in a fresh interpreter (as the dag-processor does in its own process), so
the first import of everything it needs is counted; the figure is the median of a few runs of
Airflow's own DagBag file-load duration.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks import repetitions

pytestmark = pytest.mark.benchmark

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "benchmarks" / "results" / "dag_parse_time.json"
RUNS = repetitions(3, quick=1)  # each run: 9 fresh interpreters, about 5 s each

_PROBE = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
t = time.perf_counter()
bag = DagBag(sys.argv[1])
total = time.perf_counter() - t
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()},
                  "total": total,
                  "files": {s.file.rsplit('/', 1)[-1]: s.duration.total_seconds()
                            for s in bag.dagbag_stats}}))
"""


def _parse(path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins")}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(path)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_dag_parse_time():
    files = sorted((ROOT / "dags").glob("*.py"))
    per_file = {}
    for path in files:
        runs = [_parse(path) for _ in range(RUNS)]
        assert not runs[0]["errors"], runs[0]["errors"]
        per_file[path.name] = statistics.median(sum(r["files"].values()) for r in runs)
    folder = [_parse(ROOT / "dags") for _ in range(RUNS)]
    folder_total = statistics.median(sum(r["files"].values()) for r in folder)
    figures = {"runs": RUNS, "unit": "seconds", "per_file": per_file,
               "folder": folder_total, "targets": {"per_file": 0.3, "folder": 1.0},
               "python": sys.version.split()[0]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nDAG parse time (median of {RUNS}, fresh interpreter each):")
    for name, seconds in per_file.items():
        flag = "" if seconds < 0.3 else "  OVER TARGET"
        print(f"  {name:40s} {seconds * 1000:7.1f} ms{flag}")
    print(f"  {'whole dags/ folder':40s} {folder_total * 1000:7.1f} ms"
          f"{'' if folder_total < 1 else '  OVER TARGET'}")
    print(f"  written to {RESULTS.relative_to(ROOT)}")
