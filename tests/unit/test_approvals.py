"""Approvals a policy asks before a run changes anything: the engine's checks of a policy's
``approval``, how a run combines several (``policy.verdict``), and the shipped
``approve_destructive`` policy. The wait itself runs in a real Airflow: tests/e2e/test_rest.py."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

from airfleet import policy
from airfleet.policy import Binding, Decision

ROOT = Path(__file__).resolve().parents[2]
ALICE = {"reason": "big change", "approvers": ["alice"], "timeout_seconds": 60}


def load_shipped():
    spec = importlib.util.spec_from_file_location("shipped_approve_destructive",
                                                  ROOT / "policies" / "approve_destructive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHIPPED = load_shipped()


# ---- the engine: a policy's approval ---------------------------------------------------------

@pytest.mark.parametrize(("value", "message"), [
    ("yes", "approval must be an object with reason, approvers, timeout_seconds"),
    ({**ALICE, "quorum": 2}, "approval has unknown field(s) quorum"),
    ({**ALICE, "reason": " "}, "approval.reason: say why a human must approve"),
    ({k: v for k, v in ALICE.items() if k != "reason"}, "approval.reason"),
    ({**ALICE, "approvers": []}, "approval.approvers: name at least one Airflow user id"),
    ({k: v for k, v in ALICE.items() if k != "approvers"}, "approval.approvers"),
    ({**ALICE, "approvers": "alice"}, "approval.approvers"),
    ({**ALICE, "approvers": ["alice", ""]}, "approval.approvers"),
    ({**ALICE, "timeout_seconds": 0}, "approval.timeout_seconds: a number of seconds in (0, "),
    ({**ALICE, "timeout_seconds": 8 * 86400}, "approval.timeout_seconds"),
    ({**ALICE, "timeout_seconds": True}, "approval.timeout_seconds"),
    ({**ALICE, "timeout_seconds": "1h"}, "approval.timeout_seconds"),
])
def test_a_bad_approval_is_refused_naming_the_field(value, message):
    with pytest.raises(ValueError) as err:
        policy.check_approval(value)
    assert message in str(err.value)


def test_an_approval_is_normalised_with_a_default_timeout():
    checked = policy.check_approval({"reason": " why ", "approvers": ["bob", "alice", "bob"]})
    assert checked == {"reason": "why", "approvers": ["alice", "bob"],
                       "timeout_seconds": policy.APPROVAL_DEFAULT_SECONDS}


REQUEST = {"action": "delete_cluster", "cluster": {"name": "llm-a", "labels": {}, "spec": None,
                                                   "phase": "Running", "status": None},
           "input": {"force": False}, "health": None, "now": "2026-12-02T05:00:00+00:00",
           "run": None, "dry_run": False}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    answers = {
        "asks": f"{{'allowed': True, 'reason': 'ok once approved', 'approval': {ALICE!r}}}",
        "asks_badly": "{'allowed': True, 'reason': 'x', 'approval': {'reason': 'r'}}",
        "denies_and_asks": f"{{'allowed': False, 'reason': 'no', 'approval': {ALICE!r}}}",
    }
    for name, answer in answers.items():
        (tmp_path / f"{name}.py").write_text(f"def evaluate(request):\n    return {answer}\n")
    return tmp_path


@pytest.mark.parametrize("mode", ["subprocess", "local"])
def test_a_policys_approval_reaches_the_decision(folder, mode):
    (d,) = policy.decide([Binding("delete_cluster", "asks", mode=mode)], "delete_cluster",
                         REQUEST, folder)
    assert d.allowed and d.approval == {**ALICE, "timeout_seconds": 60.0}
    assert d.to_dict()["approval"] == d.approval


def test_a_bad_approval_from_a_policy_is_a_deny_naming_the_field(folder):
    (d,) = policy.decide([Binding("delete_cluster", "asks_badly")], "delete_cluster", REQUEST,
                         folder)
    assert not d.allowed and d.approval is None
    assert "answered a bad approval: approval.approvers" in d.reason


def test_a_deny_needs_no_approval(folder):
    (d,) = policy.decide([Binding("delete_cluster", "denies_and_asks")], "delete_cluster",
                         REQUEST, folder)
    assert not d.allowed and d.reason == "no" and d.approval is None


def test_check_stability_cannot_ask_an_approval(folder):
    request = {**REQUEST, "action": "check_stability", "input": {}}
    (d,) = policy.decide([Binding("check_stability", "asks")], "check_stability", request,
                         folder)
    assert not d.allowed and "asked an approval for check_stability" in d.reason


# ---- a run's verdict -------------------------------------------------------------------------

def decision(name: str, allowed=True, reason="fine", approval=None) -> Decision:
    return Decision("delete_cluster", allowed, reason, name, "v1", "subprocess", {},
                    approval=approval and policy.check_approval(approval))


def test_no_approval_asked_means_none():
    judged = policy.verdict([decision("a"), decision("b")])
    assert judged["approval"] is None and judged["denied"] == []
    assert [d["policy"] for d in judged["decisions"]] == ["a", "b"]


def test_approvals_combine_to_the_common_approvers_and_the_shortest_wait():
    judged = policy.verdict([
        decision("a", approval={"reason": "serves endpoints", "approvers": ["alice", "bob"],
                                "timeout_seconds": 600}),
        decision("b"),
        decision("c", approval={"reason": "prod", "approvers": ["bob", "carol"],
                                "timeout_seconds": 60}),
        decision("c", approval={"reason": "prod", "approvers": ["bob"]})])
    assert judged["denied"] == []
    assert judged["approval"] == {"reason": "a: serves endpoints; c: prod",
                                  "approvers": ["bob"], "timeout_seconds": 60.0}


def test_approvals_no_user_can_give_deny_naming_each_policys_approvers():
    judged = policy.verdict([
        decision("a", approval={"reason": "r", "approvers": ["alice"]}),
        decision("b", approval={"reason": "s", "approvers": ["bob"]})])
    assert judged["approval"] is None
    (reason,) = judged["denied"]
    assert reason.startswith("approval: no user may approve: policy a names alice; "
                             "policy b names bob")


def test_a_denied_run_waits_for_no_approval():
    judged = policy.verdict([decision("a", approval=ALICE),
                             decision("b", allowed=False, reason="too big")])
    assert judged["denied"] == ["too big"] and judged["approval"] is None


# ---- the shipped approve_destructive ---------------------------------------------------------

def ssh_request(action, *, workers=("10.0.0.2", "10.0.0.3"), gpus=None, endpoints=None,
                params=None, inp=None) -> dict:
    """A static cluster (head 10.0.0.1) whose desired spec names ``workers``; ``gpus``: the
    detected GPUs per node address."""
    per_node = {node: {"count": n, "models": {"NVIDIA-L4": n}} for node, n in
                (gpus or {}).items()}
    status = {"nodes": [], "accelerators": {"count": sum((gpus or {}).values()),
                                            "nodes": per_node}}
    spec = {"type": "ssh", "provider": "static",
            "config": {"ssh": {"head": "10.0.0.1", "workers": list(workers)}}}
    req = {"action": action,
           "cluster": {"name": "llm-a", "labels": {}, "spec": spec, "phase": "Running",
                       "status": status},
           "input": inp or {}, "health": None, "now": "2026-12-02T05:00:00+00:00",
           "run": None, "dry_run": False,
           "params": {"approvers": ["alice"]} if params is None else params}
    if endpoints is not None:
        req["endpoints"] = endpoints
    return req


def shipped(req: dict) -> dict:
    before = copy.deepcopy(req)
    answer = SHIPPED.evaluate(req)
    assert req == before, "a policy must not modify its request"
    assert answer["allowed"] is True or "approval" not in answer
    if "approval" in answer:
        policy.check_approval(answer["approval"])  # what the engine accepts
    return answer


def test_deleting_a_cluster_that_serves_endpoints_asks_approval():
    served = [{"name": "chat", "version": "v2", "phase": "Ready"},
              {"name": "embed", "version": "v1", "phase": "Deploying"},
              {"name": "old", "version": "v1", "phase": "Deleted"}]
    answer = shipped(ssh_request("delete_cluster", endpoints=served,
                                 params={"approvers": ["alice", "bob"],
                                         "timeout_seconds": 120}))
    assert answer["approval"] == {
        "reason": "deleting cluster llm-a removes the endpoints it serves: chat, embed",
        "approvers": ["alice", "bob"], "timeout_seconds": 120.0}


@pytest.mark.parametrize("endpoints", [[], None, [{"name": "x", "version": "v1",
                                                   "phase": "Deleted"}]])
def test_deleting_a_cluster_that_serves_nothing_needs_no_approval(endpoints):
    answer = shipped(ssh_request("delete_cluster", endpoints=endpoints))
    assert answer["allowed"] and "approval" not in answer
    assert "needs no approval" in answer["reason"]


@pytest.mark.parametrize(("workers", "gpus", "share", "asked"), [
    # head 10.0.0.1 has 2 GPUs, each worker 1; the desired spec names `workers`
    (("10.0.0.2",), {"10.0.0.1": 2, "10.0.0.2": 1, "10.0.0.3": 1}, 0.5, False),  # 1 of 4
    ((), {"10.0.0.1": 2, "10.0.0.2": 1, "10.0.0.3": 1}, 0.5, False),  # 2 of 4: not more
    ((), {"10.0.0.1": 1, "10.0.0.2": 2, "10.0.0.3": 1}, 0.5, True),  # 3 of 4
    (("10.0.0.2",), {"10.0.0.1": 2, "10.0.0.2": 1, "10.0.0.3": 1}, 0.2, True),  # 1 of 4 > 0.2
    ((), {}, 0.0, False),  # no GPUs detected: nothing to protect
    ((), {"10.0.0.2": 0, "10.0.0.3": 0}, 0.0, False),
])
def test_removing_more_than_a_share_of_the_gpus_asks_approval(workers, gpus, share, asked):
    answer = shipped(ssh_request("remove_node", workers=workers, gpus=gpus,
                                 params={"approvers": ["alice"], "gpu_share": share}))
    assert answer["allowed"] and ("approval" in answer) == asked
    if asked:
        assert "more than gpu_share" in answer["approval"]["reason"]
        assert "binding param gpu_share" in answer["approval"]["reason"]


def test_the_gpu_reason_names_the_numbers_and_the_nodes():
    answer = shipped(ssh_request("remove_node", workers=(), gpus={
        "10.0.0.1": 1, "10.0.0.2": 2, "10.0.0.3": 1}))
    assert answer["approval"]["reason"].startswith(
        "the update of cluster llm-a removes 3 of its 4 GPUs (10.0.0.2, 10.0.0.3)")


@pytest.mark.parametrize("action", SHIPPED.ACTIONS)
def test_always_asks_for_the_listed_actions_only(action):
    params = {"approvers": ["alice"], "always": ["scale_nodegroup", "delete_endpoint"]}
    answer = shipped(ssh_request(action, params=params))
    assert answer["allowed"]
    assert ("approval" in answer) == (action in params["always"])


@pytest.mark.parametrize(("params", "named"), [
    ({}, "approvers"),
    ({"approvers": []}, "approvers"),
    ({"approvers": "alice"}, "approvers"),
    ({"approvers": ["alice"], "gpu_share": 1}, "gpu_share"),
    ({"approvers": ["alice"], "gpu_share": "half"}, "gpu_share"),
    ({"approvers": ["alice"], "timeout_seconds": 0}, "timeout_seconds"),
    ({"approvers": ["alice"], "timeout_seconds": 8 * 86400}, "timeout_seconds"),
    ({"approvers": ["alice"], "always": ["reboot"]}, "always"),
])
def test_bad_params_deny_naming_the_param(params, named):
    answer = shipped(ssh_request("delete_cluster", params=params))
    assert not answer["allowed"] and f"binding param {named}:" in answer["reason"]


def test_the_shipped_policy_asks_the_same_in_its_sandbox():
    """Bound as users bind it: subprocess mode, the engine checking its answer."""
    req = ssh_request("delete_cluster", endpoints=[{"name": "chat", "version": "v1",
                                                   "phase": "Ready"}],
                      params={"approvers": ["bob", "alice"]})
    binding = Binding("delete_cluster", "approve_destructive", params=req["params"])
    (d,) = policy.decide([binding], "delete_cluster", req, ROOT / "policies")
    assert d.mode == "subprocess" and d.allowed
    assert d.approval == {"reason": "deleting cluster llm-a removes the endpoints it serves: "
                                    "chat", "approvers": ["alice", "bob"],
                          "timeout_seconds": 3600.0}


# ---- binding: a policy's PARAMS schema refuses bad params before any run ---------------------

@pytest.mark.parametrize(("params", "message"), [
    ({}, "params: 'approvers' is a required property"),
    ({"approvers": []}, "param approvers: [] should be non-empty"),
    ({"approvers": ["alice", ""]}, "param approvers[1]: '' should be non-empty"),
    ({"approvers": ["alice"], "gpu_share": 1.5}, "param gpu_share: 1.5 is greater than"),
    ({"approvers": ["alice"], "timeout_seconds": -1}, "param timeout_seconds: -1 is less than"),
    ({"approvers": ["alice"], "always": ["reboot"]}, "param always[0]: 'reboot' is not one of"),
    ({"approvers": ["alice"], "approver": "bob"}, "('approver' was unexpected)"),
])
def test_binding_refuses_params_the_policy_does_not_take(params, message):
    from airfleet.errors import InvalidRequest

    binding = Binding("delete_cluster", "approve_destructive", params=params)
    with pytest.raises(InvalidRequest) as err:
        policy.check_binding(binding, ROOT / "policies")
    assert str(err.value).startswith("binding delete_cluster=approve_destructive: ")
    assert message in str(err.value)


def test_binding_takes_good_params_and_never_runs_the_policy(tmp_path):
    from airfleet.errors import InvalidRequest

    (tmp_path / "loud.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('ran').touch()\n"
        "PARAMS = {'type': 'object', 'properties': {'n': {'type': 'integer'}}}\n"
        "def evaluate(request):\n    return {'allowed': True, 'reason': 'ok'}\n")
    (tmp_path / "computed.py").write_text(
        "PARAMS = dict(type='object')\ndef evaluate(request):\n    return {}\n")
    assert policy.check_binding(Binding("add_node", "loud", params={"n": 2}), tmp_path)
    with pytest.raises(InvalidRequest, match="param n: 'two' is not of type 'integer'"):
        policy.check_binding(Binding("add_node", "loud", params={"n": "two"}), tmp_path)
    with pytest.raises(InvalidRequest, match="PARAMS is not a literal"):
        policy.check_binding(Binding("add_node", "computed"), tmp_path)
    assert not (tmp_path / "ran").exists()
    assert policy.check_binding(Binding(
        "delete_cluster", "approve_destructive",
        params={"approvers": ["alice"], "gpu_share": 0.25, "timeout_seconds": 600,
                "always": ["delete_cluster"]}), ROOT / "policies")
