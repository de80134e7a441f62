"""Benchmark: what one policy pre-check costs per execution mode (no binding, local,
subprocess, http). Prints the figures and writes them to
``tests/benchmarks/results/policy_overhead.json``; it asserts nothing about time.

One pre-check is ``flows.precheck`` on a create: the bindings read from the store (SQLite), the
shipped ``max_nodes`` policy evaluated, the decision written to the audit trail. The http mode's
server is a real one on loopback that evaluates the same policy.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from airfleet import flows
from airfleet.policy import Binding
from airfleet.store import Store

pytestmark = pytest.mark.benchmark

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "benchmarks" / "results" / "policy_overhead.json"
RUNS = {"none": 50, "local": 50, "subprocess": 20, "http": 50}
CLUSTER = {"metadata": {"name": "bench", "labels": {"team": "search"}},
           "spec": {"type": "ssh", "provider": "static",
                    "config": {"ssh": {"head": "10.0.0.1", "workers": ["10.0.0.2"],
                                       "credential": {"airflow_conn_id": "ssh_fleet"}}}}}


def _policy_server():
    spec = importlib.util.spec_from_file_location("max_nodes", ROOT / "policies" / "max_nodes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body = json.dumps(module.evaluate(request)).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_policy_overhead(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLEET_DATABASE_URL", f"sqlite:///{tmp_path / 'airfleet.db'}")
    store = Store()
    store.migrate()
    checked = flows.validate("create", {"cluster": CLUSTER}, store)
    server = _policy_server()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    figures = {}
    for mode, runs in RUNS.items():
        bound = [] if mode == "none" else [
            Binding("create_cluster", "max_nodes", mode=mode, url=url if mode == "http" else None)]
        store.set_bindings({"create_cluster": bound}, cluster=None, actor="bench")
        timings = []
        for _ in range(runs + 1):
            started = time.perf_counter()
            result = flows.precheck(store, checked, run="bench/run")
            timings.append((time.perf_counter() - started) * 1000)
            assert not result["denied"], result["decisions"]
        timings = sorted(timings[1:])  # the first run warms imports and connections
        figures[mode] = {"runs": runs, "p50_ms": round(statistics.median(timings), 2),
                         "p95_ms": round(timings[int(0.95 * (len(timings) - 1))], 2),
                         "policy_ms": result["decisions"][0]["elapsed_ms"]}
    server.shutdown()
    baseline = figures["none"]["p50_ms"]
    for mode in ("local", "subprocess", "http"):
        figures[mode]["overhead_ms"] = round(figures[mode]["p50_ms"] - baseline, 2)
    report = {"unit": "milliseconds per pre-check (one create_cluster action)",
              "python": sys.version.split()[0], "modes": figures}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print("\nPolicy pre-check (store read + policy + audit write), shipped max_nodes:")
    for mode, f in figures.items():
        extra = f"  overhead {f['overhead_ms']:7.2f} ms" if "overhead_ms" in f else ""
        print(f"  {mode:10s} p50 {f['p50_ms']:7.2f} ms  p95 {f['p95_ms']:7.2f} ms{extra}")
    print(f"  written to {RESULTS.relative_to(ROOT)}")
