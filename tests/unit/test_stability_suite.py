"""The shipped stability suite (policies/stability.py) on health data: each expectation, its
params, and the reason naming what failed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOW = "2026-12-02T05:00:00+00:00"
spec = importlib.util.spec_from_file_location("stability", ROOT / "policies" / "stability.py")
stability = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stability)


def request(phases=("Running", "Running", "Running"), gpus=(0, 1, 1), seen=NOW, **params):
    names = ["head", "worker-0", "worker-1"][:len(phases)]
    nodes = [{"name": n, "role": "head" if n == "head" else "worker", "phase": p,
              "observed_at": seen} for n, p in zip(names, phases, strict=True)]
    per_node = {n: {"count": c} for n, c in zip(names, gpus, strict=False)}
    return {"action": "check_stability", "now": NOW, "params": params, "input": {},
            "cluster": {"name": "llm-a", "status": {"accelerators": {
                "count": sum(gpus), "nodes": per_node}}},
            "health": {"nodes": nodes}}


def test_a_healthy_cluster_is_stable():
    decision = stability.evaluate(request())
    assert decision == {"allowed": True, "reason": "all 3 expectations met on 3 node(s)"}


def test_one_not_ready_node_fails_the_ready_ratio_and_the_gpus_on_it():
    decision = stability.evaluate(request(phases=("Running", "Running", "NotReady")))
    assert not decision["allowed"]
    assert decision["reason"] == (
        "expect_ready_ratio: 2 of 3 nodes ready (0.67), at least 1 expected; not ready: "
        "worker-1 (NotReady); expect_gpu_count: 1 GPU(s) on ready nodes, 2 expected")


def test_params_relax_or_tighten_the_expectations():
    relaxed = request(phases=("Running", "Running", "NotReady"), min_ready_ratio=0.6,
                      expected_gpus=1)
    assert stability.evaluate(relaxed)["allowed"]
    tighter = stability.evaluate(request(expected_gpus=4))
    assert "expect_gpu_count: 2 GPU(s) on ready nodes, 4 expected" in tighter["reason"]


def test_a_stale_or_missing_heartbeat_fails():
    stale = stability.evaluate(request(seen="2026-12-02T04:00:00+00:00"))
    assert "expect_fresh_heartbeats: older than 900 s: head (3600 s ago)" in stale["reason"]
    never = stability.evaluate(request(seen=None))
    assert "head (never)" in never["reason"]
    assert stability.evaluate(request(seen="2026-12-02T04:00:00+00:00",
                                      max_heartbeat_age_seconds=7200))["allowed"]


@pytest.mark.parametrize(("req", "reason"), [
    ({**request(), "health": None}, "expect_nodes: the probe saw no nodes"),
    (request(min_ready_ratio="most"), "stability: bad binding param"),
    ({**request(), "action": "add_node"}, "stability: add_node is not a stability check"),
])
def test_what_it_cannot_judge_is_said(req, reason):
    assert reason in stability.evaluate(req)["reason"]
