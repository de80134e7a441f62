"""The shipped governance policies (policies/*.py): pure functions of a request dict."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ("max_nodes", "cap_node_pool", "allowed_gpu_models", "min_workers",
            "maintenance_window", "required_labels", "approve_destructive")
ACTIONS = ("create_cluster", "delete_cluster", "update_cluster", "onboard_cluster", "add_node",
           "remove_node", "scale_nodegroup", "deploy_endpoint", "scale_endpoint",
           "delete_endpoint")
WEDNESDAY = "2026-12-02T05:00:00+00:00"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"shipped_{name}", ROOT / "policies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODULES = {name: load(name) for name in POLICIES}


def pool(name="gpu", types=("g6.xlarge",), desired=1, lo=0, hi=3, gpu=True) -> dict:
    return {"name": name, "instance_types": list(types), "min": lo, "max": hi,
            "desired": desired, "gpu": gpu, "labels": {}, "taints": []}


def ssh_spec(workers=2) -> dict:
    return {"type": "ssh", "provider": "static", "config": {"ssh": {
        "head": "10.0.0.1", "workers": [f"10.0.0.{i + 2}" for i in range(workers)]}}}


def eks_spec(*pools) -> dict:
    pools = pools or (pool("cpu", ["m5.large"], 2, gpu=False), pool())
    return {"type": "kubernetes", "provider": "eks", "config": {"eks": {"node_pools": list(pools)}}}


def sizes(desired, lo=0, hi=3) -> dict:
    return {"min": lo, "max": hi, "desired": desired}


def default_input(action: str, spec: dict) -> dict:
    new = {"nodes": [], "node_pools": copy.deepcopy(spec["config"].get("eks", {}).get(
        "node_pools", [])), "labels": {"team": "search"}}
    return {"create_cluster": new, "onboard_cluster": new,
            "update_cluster": {"changed": ["metadata.labels"], "labels": {"team": "search"}},
            "add_node": {"node": {"name": "10.0.0.9", "role": "worker"}, "workers_after": 3},
            "remove_node": {"node": {"name": "10.0.0.3", "role": "worker"}, "workers_after": 1},
            "scale_nodegroup": {"pool": "gpu", "from": sizes(1), "to": sizes(2)},
            "delete_cluster": {"force": False}}.get(action, {})


def request(action, inp=None, *, spec=None, params=None, now=WEDNESDAY, health=None,
            status=None) -> dict:
    """A request as the engine builds it; by default a registered EKS cluster with one L4."""
    new = action in ("create_cluster", "onboard_cluster")
    spec = spec or eks_spec()
    status = status or {"nodes": [], "accelerators": {"count": 1, "models": {"NVIDIA-L4": 1}}}
    return {"action": action,
            "cluster": {"name": "llm-a", "labels": {"team": "search"}, "spec": spec,
                        "phase": None if new else "Running", "status": None if new else status},
            "input": default_input(action, spec) if inp is None else inp, "health": health,
            "now": now, "run": None, "dry_run": False, "params": params or {}}


def evaluate(policy: str, req: dict) -> dict:
    decision = MODULES[policy].evaluate(req)
    assert json.loads(json.dumps(decision)) == decision
    assert isinstance(decision["allowed"], bool)
    assert isinstance(decision["reason"], str) and decision["reason"].strip()
    assert set(decision) <= {"allowed", "reason", "input", "approval"}
    return decision


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("action", ACTIONS)
def test_every_policy_returns_a_plain_decision_with_default_params(policy, action):
    req = request(action)
    before = copy.deepcopy(req)
    evaluate(policy, req)
    assert req == before, "a policy must not modify its request"
    assert "default" in MODULES[policy].__doc__


@pytest.mark.parametrize(("policy", "action", "params", "phrase"), [
    ("max_nodes", "remove_node", {"max_nodes": 0}, "max_nodes: remove_node does not add nodes"),
    ("cap_node_pool", "onboard_cluster", {"max_per_pool": 0}, "does not size node pools"),
    ("cap_node_pool", "delete_cluster", {"max_per_pool": 0}, "does not size node pools"),
    ("allowed_gpu_models", "remove_node", {"models": []}, "adds no GPUs"),
    ("min_workers", "delete_cluster", {"min_workers": 100}, "deleting is not shrinking"),
    ("min_workers", "create_cluster", {"min_workers": 100}, "does not remove workers"),
    ("maintenance_window", "onboard_cluster", {"windows": []}, "not restricted"),
    ("required_labels", "add_node", {"labels": {"owner": []}}, "does not set cluster labels"),
])
def test_policies_allow_actions_they_do_not_judge(policy, action, params, phrase):
    decision = evaluate(policy, request(action, params=params))
    assert decision["allowed"] and "input" not in decision and phrase in decision["reason"]


@pytest.mark.parametrize(("policy", "action", "params", "named"), [
    ("max_nodes", "add_node", {"max_nodes": -1}, "max_nodes"),
    ("cap_node_pool", "scale_nodegroup", {"max_per_pool": "four"}, "max_per_pool"),
    ("allowed_gpu_models", "add_node", {"models": "L4"}, "models"),
    ("min_workers", "remove_node", {"min_workers": 1.5}, "min_workers"),
    ("required_labels", "create_cluster", {"labels": ["team"]}, "labels"),
    ("maintenance_window", "add_node",
     {"windows": [{"days": ["funday"], "start": "00:00", "end": "01:00"}]}, "windows[0].days"),
    ("maintenance_window", "add_node",
     {"windows": [{"days": ["mon"], "start": "25:00", "end": "01:00"}]}, "windows[0].start"),
    ("maintenance_window", "add_node",
     {"windows": [{"days": ["mon"], "start": "00:00", "end": "9am"}]}, "windows[0].end"),
    ("maintenance_window", "add_node", {"windows": "weekends"}, "windows"),
    ("maintenance_window", "add_node", {"timezone": "Mars/Olympus_Mons"}, "timezone"),
    ("maintenance_window", "add_node", {"actions": ["reboot"]}, "actions"),
])
def test_bad_params_deny_naming_the_param(policy, action, params, named):
    decision = evaluate(policy, request(action, params=params))
    assert not decision["allowed"] and f"binding param {named} " in decision["reason"]


# max_nodes

def test_max_nodes_denies_a_create_above_the_limit_and_names_the_numbers():
    nodes = [{"name": f"10.0.0.{i + 1}", "role": "head" if i == 0 else "worker"} for i in range(9)]
    req = request("create_cluster", {"nodes": nodes, "node_pools": [], "labels": {}},
                  spec=ssh_spec(8), params={"max_nodes": 8})
    decision = evaluate("max_nodes", req)
    assert not decision["allowed"] and decision["reason"] == (
        "cluster llm-a would have 9 nodes (head and workers), above max_nodes 8 "
        "(binding param max_nodes)")
    pools = request("create_cluster", spec=eks_spec(pool("a", desired=5), pool("b", desired=4)),
                    params={"max_nodes": 8})
    assert "would have 9 nodes (sum of the node pools' desired)" in evaluate(
        "max_nodes", pools)["reason"]


@pytest.mark.parametrize(("workers_after", "params", "allowed"), [
    (15, {}, True), (16, {}, False),                            # default 16, the head counts
    (7, {"max_nodes": 8}, True), (8, {"max_nodes": "8"}, False),  # exactly the limit is allowed
])
def test_max_nodes_add_node_counts_workers_and_head(workers_after, params, allowed):
    req = request("add_node", {"node": {"name": "10.0.0.99", "role": "worker"},
                               "workers_after": workers_after}, spec=ssh_spec(workers_after),
                  params=params)
    assert evaluate("max_nodes", req)["allowed"] is allowed


@pytest.mark.parametrize(("to", "allowed", "count"), [
    (sizes(7, hi=8), False, 9), (sizes(6, hi=8), True, 8),  # cpu 2 + gpu
    (None, True, 2),                                        # the gpu pool is removed
])
def test_max_nodes_scale_nodegroup_sums_desired_with_the_change(to, allowed, count):
    req = request("scale_nodegroup", {"pool": "gpu", "from": sizes(1), "to": to},
                  params={"max_nodes": 8})
    decision = evaluate("max_nodes", req)
    assert decision["allowed"] is allowed and f"would have {count} nodes" in decision["reason"]


# cap_node_pool

def test_cap_node_pool_lowers_a_scale_and_says_what_it_lowered():
    req = request("scale_nodegroup", {"pool": "gpu", "from": sizes(1), "to": sizes(6, 5, 8)})
    decision = evaluate("cap_node_pool", req)  # default max_per_pool 4
    assert decision["allowed"] and decision["input"]["to"] == sizes(4, 4, 4)
    assert req["input"]["to"] == sizes(6, 5, 8)
    for part in ("llm-a", "pool gpu", "min 5 -> 4", "desired 6 -> 4", "max 8 -> 4",
                 "binding param max_per_pool"):
        assert part in decision["reason"]


def test_cap_node_pool_caps_each_pool_of_a_create():
    req = request("create_cluster", spec=eks_spec(pool("a", desired=3, hi=10), pool("b")),
                  params={"max_per_pool": 2})
    decision = evaluate("cap_node_pool", req)
    a, b = decision["input"]["node_pools"]
    assert ((a["min"], a["desired"], a["max"]), (b["min"], b["desired"], b["max"])) == (
        (0, 2, 2), (0, 1, 2))
    assert "pool a: desired 3 -> 2, max 10 -> 2" in decision["reason"]
    assert decision["input"]["labels"] == req["input"]["labels"]


@pytest.mark.parametrize("cap", [0, 1, 3, 4, 6, 10])
@pytest.mark.parametrize("to", [sizes(3, 2, 6), sizes(1), sizes(4, 1, 4), sizes(0, 0, 0), None])
def test_cap_node_pool_never_raises_a_size_and_leaves_an_under_cap_input_alone(to, cap):
    req = request("scale_nodegroup", {"pool": "gpu", "from": sizes(9, hi=9), "to": to},
                  params={"max_per_pool": cap})
    decision = evaluate("cap_node_pool", req)
    assert decision["allowed"]
    if to is None or max(to.values()) <= cap:
        assert "input" not in decision
    else:
        assert decision["input"]["to"] == {k: min(v, cap) for k, v in to.items()}


# allowed_gpu_models

def gpu_status(*models) -> dict:
    return {"accelerators": {"count": len(models), "models": dict.fromkeys(models, 1)}}


@pytest.mark.parametrize("where", ["health", "status"])
def test_allowed_gpu_models_denies_an_observed_disallowed_model(where):
    status = gpu_status("NVIDIA-L4", "NVIDIA-A100-SXM4-80GB")
    health = {"observed_at": WEDNESDAY, "phase": "Running", "failed_probes": 0, "nodes": [],
              **status} if where == "health" else None
    decision = evaluate("allowed_gpu_models", request("update_cluster", health=health,
                                                      status=status))
    assert not decision["allowed"]
    assert "observed GPU model NVIDIA-A100-SXM4-80GB is not in models" in decision["reason"]
    assert "model NVIDIA-L4 " not in decision["reason"]
    assert "binding param models" in decision["reason"]


def test_allowed_gpu_models_prefers_health_over_status():
    health = {"observed_at": WEDNESDAY, "nodes": [], **gpu_status("NVIDIA-L4")}
    req = request("add_node", health=health, status=gpu_status("NVIDIA-A100"))
    assert evaluate("allowed_gpu_models", req)["allowed"]


@pytest.mark.parametrize(("model", "models", "allowed"), [
    ("NVIDIA-H100-80GB-HBM3", ["H100"], True), ("NVIDIA H100 80GB HBM3", ["nvidia-h100"], True),
    ("nvidia_l4", ["NVIDIA-L4"], True), ("Tesla-T4", ["t4"], True),
    ("NVIDIA-L40S", ["L4"], False), ("NVIDIA-A10", ["NVIDIA-A10G"], False),
])
def test_allowed_gpu_models_matches_whole_tokens(model, models, allowed):
    req = request("add_node", status=gpu_status(model), params={"models": models})
    assert evaluate("allowed_gpu_models", req)["allowed"] is allowed


@pytest.mark.parametrize(("itype", "allowed", "model"), [
    ("g6.12xlarge", True, "NVIDIA-L4"), ("g5.xlarge", True, "NVIDIA-A10G"),
    ("p5.48xlarge", True, "NVIDIA-H100"), ("p4d.24xlarge", False, "NVIDIA-A100"),
    ("g6e.xlarge", False, "NVIDIA-L40S"), ("g4dn.xlarge", False, "NVIDIA-T4"),
    ("p5en.48xlarge", False, "NVIDIA-H200"), ("Standard_NC40ads_H100_v5", True, "NVIDIA-H100"),
    ("Standard_NC24ads_A100_v4", False, "NVIDIA-A100"),
    ("Standard_NV36ads_A10_v5", False, "NVIDIA-A10"),
    ("Standard_NC4as_T4_v3", False, "NVIDIA-T4"),
])
def test_allowed_gpu_models_maps_pool_instance_types_with_default_models(itype, allowed, model):
    decision = evaluate("allowed_gpu_models",
                        request("onboard_cluster", spec=eks_spec(pool(types=[itype]))))
    assert decision["allowed"] is allowed
    assert model in decision["reason"] and itype in decision["reason"]


def test_allowed_gpu_models_unknown_gpu_type_denies_and_non_gpu_pools_pass():
    decision = evaluate("allowed_gpu_models",
                        request("create_cluster", spec=eks_spec(pool("gpu", ["x9.large"]))))
    assert not decision["allowed"]
    assert ("pool gpu: unknown GPU instance type x9.large; ask the policy owner to map it"
            in decision["reason"])
    cpu_only = request("create_cluster", spec=eks_spec(pool("cpu", ["x9.large"], gpu=False)))
    assert evaluate("allowed_gpu_models", cpu_only)["allowed"]


def test_allowed_gpu_models_scale_nodegroup_checks_the_desired_spec_pool():
    spec = eks_spec(pool("cpu", ["m5.large"], 2, gpu=False), pool("gpu", ["p4d.24xlarge"]))
    decision = evaluate("allowed_gpu_models", request("scale_nodegroup", spec=spec))
    assert not decision["allowed"] and "p4d.24xlarge has NVIDIA-A100" in decision["reason"]
    widened = request("scale_nodegroup", spec=spec, params={"models": ["A100", "L4"]})
    assert evaluate("allowed_gpu_models", widened)["allowed"]
    shrink = request("scale_nodegroup", {"pool": "gpu", "from": sizes(2), "to": sizes(0)},
                     spec=spec)
    assert evaluate("allowed_gpu_models", shrink)["allowed"]


# min_workers

@pytest.mark.parametrize(("workers_after", "params", "allowed"), [
    (1, {}, True), (0, {}, False), (2, {"min_workers": 3}, False), (3, {"min_workers": 3}, True),
])
def test_min_workers_remove_node(workers_after, params, allowed):
    req = request("remove_node", {"node": {"name": "10.0.0.3", "role": "worker"},
                                  "workers_after": workers_after}, spec=ssh_spec(), params=params)
    decision = evaluate("min_workers", req)
    assert decision["allowed"] is allowed
    assert f"removing node 10.0.0.3 would leave cluster llm-a with {workers_after} worker" \
        in decision["reason"]
    if not allowed:
        assert f"below min_workers {params.get('min_workers', 1)} (binding param min_workers)" \
            in decision["reason"]


def test_min_workers_scale_nodegroup_judges_shrinks_only():
    shrink = request("scale_nodegroup", {"pool": "gpu", "from": sizes(1), "to": None},
                     params={"min_workers": 3})
    decision = evaluate("min_workers", shrink)
    assert not decision["allowed"]
    assert "with 2 workers" in decision["reason"] and "min_workers 3" in decision["reason"]
    grow = request("scale_nodegroup", params={"min_workers": 5})  # 3 -> 4 desired, still < 5
    assert evaluate("min_workers", grow)["allowed"]


# maintenance_window

def test_maintenance_window_default_is_the_weekend_in_utc():
    decision = evaluate("maintenance_window", request("update_cluster"))
    assert not decision["allowed"]
    for part in ("update_cluster", "llm-a", "Wed 2026-12-02 05:00 (UTC)",
                 "sat,sun 00:00-23:59", "binding params windows, timezone"):
        assert part in decision["reason"]
    saturday = request("update_cluster", now="2026-12-05T23:59:30Z")
    assert evaluate("maintenance_window", saturday)["allowed"]
    assert evaluate("maintenance_window", request("create_cluster"))["allowed"]


@pytest.mark.parametrize(("now", "allowed"), [
    ("2026-12-04T21:59:00+00:00", False),  # Fri before the window
    ("2026-12-04T23:00:00+00:00", True),   # Fri, inside
    ("2026-12-05T02:00:59+00:00", True),   # Sat, the end minute belongs to Friday's window
    ("2026-12-05T02:01:00+00:00", False),
    ("2026-12-03T01:00:00+00:00", False),  # Thu after midnight: Wed has no window
])
def test_maintenance_window_spanning_midnight_belongs_to_its_start_day(now, allowed):
    params = {"windows": [{"days": ["fri"], "start": "22:00", "end": "02:00"}]}
    req = request("delete_cluster", now=now, params=params)
    assert evaluate("maintenance_window", req)["allowed"] is allowed


def test_maintenance_window_in_a_non_utc_timezone():
    params = {"windows": [{"days": ["wed"], "start": "14:00", "end": "15:00"}],
              "timezone": "Asia/Tokyo", "actions": ["scale_nodegroup"]}
    assert evaluate("maintenance_window", request("scale_nodegroup", params=params))["allowed"]
    offset = request("scale_nodegroup", params=params, now="2026-12-02T07:00:00+01:00")
    assert evaluate("maintenance_window", offset)["allowed"]  # 15:00 in Tokyo
    late = evaluate("maintenance_window", request("scale_nodegroup", params=params,
                                                  now="2026-12-02T07:00:00+00:00"))
    assert not late["allowed"]
    assert "Wed 2026-12-02 16:00 (Asia/Tokyo)" in late["reason"]
    assert "wed 14:00-15:00" in late["reason"]
    assert evaluate("maintenance_window", request("update_cluster", params=params))["allowed"]


# required_labels

def test_required_labels_default_requires_a_team():
    assert evaluate("required_labels", request("create_cluster"))["allowed"]
    req = request("onboard_cluster", {"nodes": [], "node_pools": [], "labels": {"team": " "}})
    decision = evaluate("required_labels", req)
    assert not decision["allowed"]
    assert decision["reason"] == "cluster llm-a: missing label team (binding param labels)"


def test_required_labels_names_every_missing_and_wrong_label():
    params = {"labels": {"team": ["search", "ads"], "env": ["prod", "staging"], "owner": []}}
    req = request("update_cluster", {"changed": ["metadata.labels"], "labels": {"team": "infra"}},
                  params=params)
    decision = evaluate("required_labels", req)
    assert not decision["allowed"]
    assert "missing labels env, owner" in decision["reason"]
    assert "team=infra (allowed: search, ads)" in decision["reason"]
    fixed = {"team": "ads", "env": "prod", "owner": "kim"}
    ok = request("update_cluster", {"changed": [], "labels": fixed}, params=params)
    assert evaluate("required_labels", ok)["allowed"]


# every shipped policy as a binding runs it by default: subprocess mode (the sandbox, here)

SUBPROCESS_CASES = [
    ("max_nodes", request("add_node", params={"max_nodes": 3})),
    ("cap_node_pool", request("scale_nodegroup", {"pool": "gpu", "from": sizes(1),
                                                  "to": sizes(6, hi=8)})),
    ("allowed_gpu_models", request("create_cluster", params={"models": ["H100"]})),
    ("min_workers", request("remove_node", params={"min_workers": 2})),
    ("maintenance_window", request("scale_nodegroup", params={
        "windows": [{"days": ["wed"], "start": "14:00", "end": "15:00"}],
        "timezone": "Asia/Tokyo", "actions": ["scale_nodegroup"]})),
    ("required_labels", request("create_cluster", params={"labels": {"owner": []}})),
    ("approve_destructive", request("delete_cluster", params={"approvers": ["alice"],
                                                              "always": ["delete_cluster"]})),
    ("stability", {**request("check_stability"), "input": {}}),
]


@pytest.mark.parametrize(("name", "req"), SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_each_shipped_policy_decides_the_same_in_subprocess_mode(name, req):
    from airfleet import policy

    spec = importlib.util.spec_from_file_location(f"inproc_{name}", ROOT / "policies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.evaluate(copy.deepcopy(req))
    binding = policy.Binding(req["action"], name, params=req["params"])
    (decision,) = policy.decide([binding], req["action"], req, ROOT / "policies")
    assert decision.mode == "subprocess" and decision.isolation
    assert (decision.allowed, decision.reason) == (expected["allowed"], expected["reason"])
    assert decision.input == expected.get("input", req["input"])
    assert decision.approval == (expected.get("approval") and
                                 policy.check_approval(expected["approval"]))
