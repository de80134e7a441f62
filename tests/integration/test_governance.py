"""Governance through the real flows (``dag.test()``): policies bound with the CLI judge each
action of a run, in their own interpreters; a deny stops the run with nothing changed; a dry
run reports and changes nothing; every decision lands in the audit trail."""

from __future__ import annotations

import copy
import json
import time

import pytest

from airfleet import cli
from airfleet.store import Store
from tests.integration.test_flows import SSH_CLUSTER, output, run, states

pytestmark = pytest.mark.integration


def bind(*args: str) -> None:
    assert cli.main(["policies", "bind", *args]) == 0


def snapshot(name: str = "llm-a"):
    record = Store().require_cluster(name)
    return (record.generation, record.version, record.phase,
            record.cluster.model_dump(mode="json"))


def decisions(name: str = "llm-a") -> list[dict]:
    return [a for a in Store().policy_audit(name) if a["kind"] == "decision"]


def with_workers(*workers: str) -> dict:
    desired = copy.deepcopy(SSH_CLUSTER)
    desired["spec"]["config"]["ssh"]["workers"] = list(workers)
    return desired


def test_a_denied_add_node_leaves_the_cluster_as_it_was(dags, fake, capfd, caplog):
    assert str(run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER}).state) == "success"
    bind("add_node=max_nodes", "--param", "max_nodes=2")
    before, calls = snapshot(), fake.calls()

    dr = run(dags, "airfleet_cluster_update",
             {"cluster": with_workers("10.0.0.2", "10.0.0.3")})

    assert str(dr.state) == "failed"
    s = states(dr)
    assert s["admit"] == "failed" and s["apply"] == "upstream_failed"
    assert s["release_lease"] == "success"
    assert snapshot() == before and fake.calls() == calls
    assert Store().get_lease("llm-a").holder is None
    log = output(capfd, caplog)
    assert 'action add_node: {"node": {"name": "10.0.0.3", "role": "worker"}, ' \
           '"workers_after": 2}' in log
    assert "denied by policy: cluster llm-a would have 3 nodes" in log
    (denied,) = [d for d in decisions() if d["action"] == "add_node"]
    assert denied["policy"] == "max_nodes" and denied["allowed"] is False
    assert denied["run_id"] == f"airfleet_cluster_update/{dr.run_id}"
    assert "max_nodes 2" in denied["reason"]


@pytest.mark.parametrize("flow", ["create", "onboard"])
def test_a_denied_create_or_onboard_registers_nothing(dags, fake, capfd, caplog, flow):
    bind(f"{flow}_cluster=required_labels", "--param", 'labels={"cost-center": []}')

    dr = run(dags, f"airfleet_cluster_{flow}", {"cluster": SSH_CLUSTER})

    assert str(dr.state) == "failed" and states(dr)["admit"] == "failed"
    assert states(dr)["release_lease"] == "success"
    assert Store().list_clusters(include_deleted=True) == [] and fake.calls() == []
    assert Store().get_lease("llm-a").holder is None
    assert "denied by policy: " in output(capfd, caplog)
    (denied,) = decisions()
    assert denied["action"] == f"{flow}_cluster" and denied["allowed"] is False
    assert "cost-center" in denied["reason"]


def test_an_update_is_judged_per_action_and_a_cluster_binding_wins(dags, fake, capfd, caplog):
    run(dags, "airfleet_cluster_create", {"cluster": with_workers("10.0.0.2", "10.0.0.3")})
    bind("remove_node=min_workers", "--param", "min_workers=3")  # global: keep three
    bind("remove_node=min_workers", "--param", "min_workers=1", "--cluster", "llm-a")

    dr = run(dags, "airfleet_cluster_update", {"cluster": with_workers("10.0.0.2", "10.0.0.4")})

    assert str(dr.state) == "success", states(dr)
    assert Store().require_cluster("llm-a").cluster.spec.config.ssh.workers == \
        ["10.0.0.2", "10.0.0.4"]
    log = output(capfd, caplog)
    assert "policy -: add_node allowed: no policy is bound to add_node" in log
    assert "policy min_workers: remove_node allowed" in log
    assert [(d["action"], d["policy"], d["allowed"]) for d in decisions()
            if d["run_id"].startswith("airfleet_cluster_update")] == [
        ("add_node", None, True), ("remove_node", "min_workers", True)]


@pytest.mark.parametrize(("dag_id", "conf"), [
    ("airfleet_cluster_create", {"cluster": SSH_CLUSTER, "dry_run": True}),
    ("airfleet_cluster_onboard", {"cluster": SSH_CLUSTER, "dry_run": True}),
])
def test_a_dry_create_or_onboard_reports_and_changes_nothing(dags, fake, capfd, caplog,
                                                             dag_id, conf):
    bind("create_cluster=required_labels,max_nodes", "onboard_cluster=max_nodes",
         "--param", "max_nodes=1")
    dr = run(dags, dag_id, conf)

    assert str(dr.state) == "success"
    assert {t for t, state in states(dr).items() if state != "skipped"} == {"admit"}
    store = Store()
    assert store.list_clusters(include_deleted=True) == [] and store.get_lease("llm-a") is None
    assert fake.calls() == [] and decisions() == []
    log = output(capfd, caplog)
    action = dag_id.removeprefix("airfleet_cluster_")
    assert f"dry run: action {action}_cluster: " in log
    assert f"dry run: policy max_nodes: {action}_cluster DENIED: cluster llm-a would have " \
           "2 nodes" in log
    assert "dry run: nothing was changed" in log


def test_a_dry_update_and_delete_change_nothing(dags, fake, capfd, caplog):
    run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})
    bind("add_node=max_nodes", "--param", "max_nodes=2")
    before, calls, token = snapshot(), fake.calls(), Store().get_lease("llm-a").token
    trail = Store().policy_audit()

    update = run(dags, "airfleet_cluster_update",
                 {"cluster": with_workers("10.0.0.2", "10.0.0.3"), "dry_run": True})
    delete = run(dags, "airfleet_cluster_delete", {"name": "llm-a", "dry_run": True})

    assert str(update.state) == str(delete.state) == "success"
    assert snapshot() == before and fake.calls() == calls
    assert Store().get_lease("llm-a").token == token  # no lease was taken
    assert Store().policy_audit() == trail
    log = output(capfd, caplog)
    assert "dry run: policy max_nodes: add_node DENIED" in log
    assert "dry run: policy -: delete_cluster allowed: no policy is bound" in log


def test_a_hanging_policy_fails_the_run_within_its_timeout(dags, fake, capfd, caplog,
                                                           tmp_path, monkeypatch):
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "forever.py").write_text("import time\n\ndef evaluate(request):\n"
                                       "    while True:\n        time.sleep(1)\n")
    monkeypatch.setenv("AIRFLEET_POLICIES_DIR", str(folder))
    run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})
    bind("delete_cluster=forever", "--timeout", "2")

    started = time.monotonic()
    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-a"})

    assert str(dr.state) == "failed" and time.monotonic() - started < 60
    assert states(dr)["admit"] == "failed" and states(dr)["teardown"] == "upstream_failed"
    assert Store().require_cluster("llm-a").phase.value == "Running"
    assert "policy forever did not answer within 2 s (stopped)" in output(capfd, caplog)


def test_a_bad_binding_is_refused_and_writes_nothing(fake, capsys):
    for args, message in [
        (["add_nodes=max_nodes"], "unknown action 'add_nodes'"),
        (["add_node=max_nodez"], "no policy 'max_nodez'"),
        (["add_node=README"], "a policy name is a Python module name"),
        (["add_node=max_nodes", "remove_node=nope"], "no policy 'nope'"),
        (["add_node=max_nodes", "--cluster", "ghost"], "cluster ghost is not registered"),
        (["add_node"], "write ACTION=POLICY"),
    ]:
        assert cli.main(["policies", "bind", *args]) == 1
        assert message in capsys.readouterr().err
    assert Store().bindings(every_scope=True) == [] and Store().policy_audit() == []


def test_bindings_follow_seed_semantics_with_an_audit_trail(fake, capsys):
    bind("add_node=max_nodes,maintenance_window", "remove_node=min_workers")
    bind("add_node=", "delete_cluster=maintenance_window")  # remove_node not given: stays
    assert [(b.action, b.policy) for b in Store().bindings()] == [
        ("delete_cluster", "maintenance_window"), ("remove_node", "min_workers")]
    trail = [(a["kind"], a["action"], a["policy"]) for a in Store().policy_audit()]
    assert trail == [("bind", "add_node", "max_nodes"), ("bind", "add_node", "maintenance_window"),
                     ("bind", "remove_node", "min_workers"),
                     ("unbind", "add_node", "maintenance_window"),
                     ("unbind", "add_node", "max_nodes"),
                     ("bind", "delete_cluster", "maintenance_window")]
    assert all(a["actor"].startswith("cli") for a in Store().policy_audit())


# ---- stability ----------------------------------------------------------------------------

def stable(name: str = "llm-a"):
    conditions = Store().require_cluster(name).cluster.status.conditions
    return next((c for c in conditions if c.type == "Stable"), None)


def test_one_not_ready_node_of_three_turns_unstable_and_back(dags, fake, capsys):
    run(dags, "airfleet_cluster_create", {"cluster": with_workers("10.0.0.2", "10.0.0.3")})
    assert cli.main(["stability", "enable", "llm-a"]) == 0
    assert [n.name for n in Store().require_cluster("llm-a").cluster.status.nodes] == \
        ["head", "worker-0", "worker-1"]

    run(dags, "airfleet_cluster_health_check", {})
    assert stable().status == "True" and stable().reason == "ExpectationsMet"

    fake.instruct(not_ready={"llm-a": ["worker-1"]})
    run(dags, "airfleet_cluster_health_check", {})
    condition = stable()
    assert condition.status == "False" and condition.reason == "ExpectationsFailed"
    assert condition.message.startswith("expect_ready_ratio: 2 of 3 nodes ready (0.67), at "
                                        "least 1 expected; not ready: worker-1 (NotReady)")
    assert Store().require_cluster("llm-a").phase.value == "Running"  # health is not stability
    flipped_at = condition.last_transition_time

    run(dags, "airfleet_cluster_health_check", {})  # still down: no new transition
    assert stable().last_transition_time == flipped_at
    assert stable().last_probe_time > flipped_at

    fake.instruct(not_ready={})
    run(dags, "airfleet_cluster_health_check", {})
    assert stable().status == "True"
    history = [(e.reason, e.kind) for e in Store().events("llm-a")
               if e.reason in ("Stable", "Unstable")]
    assert history == [("Stable", "Normal"), ("Unstable", "Warning"), ("Stable", "Normal")]


def test_stability_interval_disable_and_run_now(dags, fake, capsys):
    run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})
    assert cli.main(["stability", "enable", "llm-a", "--interval", "3600",
                     "--param", "min_ready_ratio=0.5"]) == 0
    run(dags, "airfleet_cluster_health_check", {})
    probed = stable().last_probe_time
    fake.instruct(not_ready={"llm-a": ["head", "worker-0"]})
    run(dags, "airfleet_cluster_health_check", {})
    assert stable().status == "True" and stable().last_probe_time == probed  # not due yet

    capsys.readouterr()
    assert cli.main(["stability", "run", "llm-a"]) == 3  # now, on the recorded node data
    assert '"status": "False"' in capsys.readouterr().out
    assert "0 of 2 nodes ready" in stable().message

    assert cli.main(["stability", "interval", "llm-a", "0"]) == 0
    assert [b.params["interval_seconds"] for b in Store().bindings("llm-a")] == [0]
    assert cli.main(["stability", "disable", "llm-a"]) == 0
    assert cli.main(["stability", "run", "llm-a"]) == 1
    assert "no stability suite is bound" in capsys.readouterr().err
    assert cli.main(["stability", "enable", "ghost"]) == 1


# ---- stability as a Great Expectations suite ----------------------------------------------

GX_SUITE = {"name": "stable-nodes", "expectations": [
    {"type": "expect_column_mean_to_be_between", "kwargs": {"column": "ready", "min_value": 1.0}},
    {"type": "expect_column_values_to_be_between",
     "kwargs": {"column": "heartbeat_age_seconds", "max_value": 900}},
    {"type": "expect_table_row_count_to_equal", "kwargs": {"value": 3}}]}


def test_a_gx_suite_on_the_node_table_turns_one_not_ready_node_of_three_unstable(
        dags, fake, capsys, tmp_path):
    run(dags, "airfleet_cluster_create", {"cluster": with_workers("10.0.0.2", "10.0.0.3")})
    suite = tmp_path / "stable-nodes.json"
    suite.write_text(json.dumps(GX_SUITE))
    assert cli.main(["stability", "enable", "llm-a", "--gx-suite", str(suite)]) == 0
    (binding,) = Store().bindings("llm-a")
    assert (binding.mode, binding.policy, binding.params["suite"]) == ("gx", "gx_stable_nodes",
                                                                      GX_SUITE)

    run(dags, "airfleet_cluster_health_check", {})
    assert stable().status == "True", stable().message
    assert stable().message == "all 3 expectations of stable-nodes met on 3 node(s)"

    fake.instruct(not_ready={"llm-a": ["worker-1"]})
    run(dags, "airfleet_cluster_health_check", {})
    condition = stable()
    assert condition.status == "False" and condition.reason == "ExpectationsFailed"
    assert "1 of 3 expectations of stable-nodes failed: expect_column_mean_to_be_between(" \
           "column=ready, min_value=1.0): observed 0.667" in condition.message, condition.message
    assert Store().require_cluster("llm-a").phase.value == "Running"
    (bound,) = [a for a in Store().policy_audit() if a["kind"] == "bind"]
    assert (bound["policy"], bound["mode"]) == ("gx_stable_nodes", "gx")
    assert "expect_column_mean_to_be_between" in bound["reason"]  # the suite, as bound


@pytest.mark.parametrize(("suite", "fragment"), [
    ("{not json", "not JSON"),
    (json.dumps({"name": "s", "expectations": [
        {"type": "expect_column_mean_to_be_between", "kwargs": {"column": "readiness"}}]}),
     "expectations[0] (expect_column_mean_to_be_between) names column 'readiness', which the "
     "node table lacks; its columns are name, role, ready, gpus_detected"),
    (json.dumps({"name": "s", "expectations": [{"type": "expect_nodes_happy", "kwargs": {}}]}),
     "expectations[0] (expect_nodes_happy) is not an expectation GX can run"),
    (json.dumps({"expectations": []}), 'a GX suite is an object with "name"'),
])
def test_a_gx_suite_that_cannot_run_is_refused_at_bind_naming_it(fake, capsys, tmp_path,
                                                                   suite, fragment):
    run_path = tmp_path / "suite.json"
    run_path.write_text(suite)
    assert cli.main(["stability", "enable", "--gx-suite", str(run_path)]) == 1
    err = capsys.readouterr().err
    assert f"--gx-suite {run_path}: " in err and fragment in err, err
    assert Store().bindings(every_scope=True) == [] and Store().policy_audit() == []


# ---- approvals (the wait itself, approved and rejected over REST: tests/e2e/test_rest.py) ----

def test_a_dry_delete_reports_the_approval_it_would_wait_for(dags, fake, capfd, caplog):
    run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})
    bind("delete_cluster=approve_destructive", "--param", 'approvers=["alice", "bob"]',
         "--param", 'always=["delete_cluster"]', "--param", "timeout_seconds=900")
    before, calls = snapshot(), fake.calls()

    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-a", "dry_run": True})

    assert str(dr.state) == "success"
    assert {t for t, state in states(dr).items() if state != "skipped"} == {"admit"}
    assert snapshot() == before and fake.calls() == calls
    report = dr.get_task_instance("admit").xcom_pull(task_ids="admit", key="dry_run")
    assert report["allowed"] and report["approval"] == {
        "reason": "approve_destructive: delete_cluster of cluster llm-a always needs approval "
                  "(binding param always)",
        "approvers": ["alice", "bob"], "timeout_seconds": 900.0}
    assert "dry run: approval by alice or bob (up to 900 s): approve_destructive: " \
           "delete_cluster of cluster llm-a always needs approval" in output(capfd, caplog)


def test_approvals_no_one_could_give_deny_the_run_and_change_nothing(dags, fake, capfd, caplog,
                                                                      tmp_path, monkeypatch):
    folder = tmp_path / "policies"
    folder.mkdir()
    for name, approver in (("ask_alice", "alice"), ("ask_bob", "bob")):
        (folder / f"{name}.py").write_text(
            "def evaluate(request):\n    return {'allowed': True, 'reason': 'ok', "
            f"'approval': {{'reason': 'big', 'approvers': [{approver!r}]}}}}\n")
    monkeypatch.setenv("AIRFLEET_POLICIES_DIR", str(folder))
    run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})
    bind("delete_cluster=ask_alice,ask_bob")
    before, calls = snapshot(), fake.calls()

    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-a"})

    assert str(dr.state) == "failed" and states(dr)["admit"] == "failed"
    assert snapshot() == before and fake.calls() == calls
    assert Store().get_lease("llm-a").holder is None
    assert "denied by policy: approval: no user may approve: policy ask_alice names alice; " \
           "policy ask_bob names bob" in output(capfd, caplog)


def test_params_the_approval_policy_does_not_take_are_refused_when_bound(fake, capsys):
    assert cli.main(["policies", "bind", "delete_cluster=approve_destructive",
                     "--param", 'always=["delete_cluster"]']) != 0
    assert "params: 'approvers' is a required property" in capsys.readouterr().err
    assert Store().bindings(None, every_scope=True) == []
