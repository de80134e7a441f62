"""The five flows run for real with ``dag.test()`` against the store, with the recording
backend of ``tests/fakes`` standing in for a product backend.

Each test checks what a user sees: the cluster's phase and history in the store, what the
backend was asked to do, the lease afterwards, and the run's outcome.
"""

from __future__ import annotations

import copy
import json
import secrets
from pathlib import Path

import pytest

from airfleet.resources import Phase
from airfleet.store import Store

pytestmark = pytest.mark.integration

FAKE = "tests.fakes.recording_backend:RecordingBackend"

SSH_CLUSTER = {"metadata": {"name": "llm-a", "labels": {"team": "search"}},
               "spec": {"type": "ssh", "provider": "static",
                        "model_caches": [{"name": "hf", "host_path": {"path": "/data/models"}}],
                        "config": {"ssh": {"head": "10.0.0.1", "workers": ["10.0.0.2"],
                                           "credential": {"airflow_conn_id": "ssh_fleet"}}}}}



def run(dags, dag_id: str, conf: dict):
    return dags[dag_id].test(run_conf=conf)


def states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def transitions(name: str) -> list[tuple[str | None, str | None]]:
    return [(e.from_phase, e.to_phase) for e in Store().events(name)
            if e.kind in ("Transition", "Normal") and e.to_phase]


def output(capfd, caplog) -> str:
    """Everything the run printed or logged (task logs go through logging in dag.test)."""
    out = capfd.readouterr()
    return out.out + out.err + caplog.text


def assert_untouched(fake, name: str = "llm-a") -> None:
    store = Store()
    assert store.list_clusters(include_deleted=True) == []
    assert store.get_lease(name) is None
    assert fake.calls() == []


def test_create_runs_every_step_records_history_and_releases_the_lease(dags, fake):
    dr = run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})

    assert str(dr.state) == "success"
    record = Store().require_cluster("llm-a")
    assert record.phase is Phase.RUNNING
    assert record.observed_generation == record.generation == 1
    assert [n.name for n in record.cluster.status.nodes] == ["head", "worker-0"]
    assert all(n.observed_at for n in record.cluster.status.nodes)
    assert "nvidia.com/gpu" in record.cluster.status.accelerators
    assert fake.calls() == ["provision", "detect_accelerators", "apply"]
    assert transitions("llm-a") == [(None, "Pending"), ("Pending", "Provisioning"),
                                    ("Provisioning", "Running")]
    run_ids = {e.run_id for e in Store().events("llm-a")}
    assert run_ids == {f"airfleet_cluster_create/{dr.run_id}"}
    lease = Store().get_lease("llm-a")
    assert lease.holder is None and lease.token == 1
    assert states(dr)["watcher"] == "skipped"


def test_create_rerun_converges_without_duplicates(dags, fake):
    run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})
    dr = run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})

    assert str(dr.state) == "success"
    clusters = Store().list_clusters(include_deleted=True)
    assert [(c.name, c.generation, c.phase) for c in clusters] == [("llm-a", 1, Phase.RUNNING)]
    assert Store().get_lease("llm-a").token == 2  # a new run, a new holder


def test_a_failing_step_fails_the_run_records_why_and_still_releases(dags, fake):
    fake.instruct(fail_at={"llm-a": "apply"})
    dr = run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})

    assert str(dr.state) == "failed"
    s = states(dr)
    assert s["set_up"] == "failed" and s["wait_ready"] == "upstream_failed"
    assert s["release_lease"] == "success" and s["watcher"] == "failed"
    record = Store().require_cluster("llm-a")
    assert record.phase is Phase.FAILED
    assert "apply failed: fake backend told to fail at apply" in record.cluster.status.message
    assert fake.calls() == ["provision", "detect_accelerators", "apply"]
    assert transitions("llm-a")[-1] == ("Provisioning", "Failed")
    assert Store().get_lease("llm-a").holder is None


def test_admit_failing_after_it_took_the_lease_still_has_it_released(dags, fake, monkeypatch):
    """The lease teardown finds the lease by the run that holds it: admit told nothing (it
    failed), yet the lease is freed and the cluster left as the failure left it."""
    from airfleet import flows

    def broken(*args, **kwargs):
        raise RuntimeError("the store went away mid-admit")

    monkeypatch.setattr(flows, "admit", broken)
    dr = run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})

    assert str(dr.state) == "failed"
    s = states(dr)
    assert s["admit"] == "failed" and s["set_up"] == "upstream_failed"
    assert s["release_lease"] == "success" and s["watcher"] == "failed"
    lease = Store().get_lease("llm-a")
    assert lease.holder is None and lease.token == 1
    assert Store().get_cluster("llm-a") is None and fake.calls() == []


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c["metadata"].pop("name"), "name"),
    (lambda c: c["metadata"].update(name="Bad_Name"), "['metadata']['name']"),
    (lambda c: c["spec"].update(type="vm"), "['spec']['type']"),
    (lambda c: c["spec"].update(model_caches=[{"name": "n", "nfs": {"server": "s", "path": "/x"}}]),
     "['spec']['model_caches'][0]"),
    (lambda c: c["spec"]["config"]["ssh"].update(password="hunter2"), "password"),
    (lambda c: c["spec"]["config"]["ssh"].update(port="22"), "['spec']['config']['ssh']['port']"),
])
def test_bad_conf_is_refused_before_a_run_exists(dags, fake, mutate, field):
    from airflow.sdk.definitions.param import ParamValidationError

    cluster = copy.deepcopy(SSH_CLUSTER)
    mutate(cluster)
    with pytest.raises(ParamValidationError) as err:
        run(dags, "airfleet_cluster_create", {"cluster": cluster})
    assert "cluster" in str(err.value) and field in str(err.value)
    assert_untouched(fake)


def test_what_the_schema_cannot_say_fails_the_admit_task_and_touches_nothing(dags, fake,
                                                                                capfd, caplog):
    cluster = copy.deepcopy(SSH_CLUSTER)
    cluster["spec"]["config"]["ssh"]["workers"] = ["10.0.0.1"]  # the head again
    dr = run(dags, "airfleet_cluster_create", {"cluster": cluster})

    assert str(dr.state) == "failed"
    assert states(dr)["admit"] == "failed" and states(dr)["set_up"] == "upstream_failed"
    assert states(dr)["release_lease"] == "skipped"  # no lease was taken
    assert "cluster.spec.config.ssh.workers: the head 10.0.0.1 must not be listed" in output(capfd, caplog)
    assert_untouched(fake)


def test_a_type_without_backend_fails_in_validate_and_touches_nothing(dags, fake, monkeypatch,
                                                                      capfd, caplog):
    from airfleet import backends

    monkeypatch.setenv("AIRFLEET_BACKENDS", f"ssh={FAKE}")
    monkeypatch.delitem(backends.BUILTIN, "kubernetes")  # a deployment without that backend
    cluster = {"metadata": {"name": "llm-a"},
               "spec": {"type": "kubernetes", "provider": "existing", "config": {"kubernetes": {
                   "credential": {"airflow_conn_id": "k8s"}}}}}
    dr = run(dags, "airfleet_cluster_create", {"cluster": cluster})

    assert states(dr)["admit"] == "failed"
    assert "cluster type kubernetes is not available" in output(capfd, caplog)
    assert_untouched(fake)


def test_a_second_flow_on_a_held_cluster_fails_fast(dags, fake, capfd, caplog):
    Store().acquire_lease("llm-a", "airfleet_cluster_update/someone-else", ttl=600)
    dr = run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})

    assert states(dr)["admit"] == "failed" and states(dr)["release_lease"] == "skipped"
    assert "cluster llm-a is held by run airfleet_cluster_update/someone-else" in output(capfd, caplog)
    assert Store().get_cluster("llm-a") is None
    assert fake.calls() == []
    assert Store().get_lease("llm-a").holder == "airfleet_cluster_update/someone-else"


def test_update_records_the_new_generation_and_converges(dags, fake):
    run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})
    desired = copy.deepcopy(SSH_CLUSTER)
    desired["spec"]["config"]["ssh"]["workers"].append("10.0.0.3")
    dr = run(dags, "airfleet_cluster_update", {"cluster": desired})

    assert str(dr.state) == "success"
    record = Store().require_cluster("llm-a")
    assert record.generation == record.observed_generation == 2
    assert record.cluster.spec.config.ssh.workers == ["10.0.0.2", "10.0.0.3"]
    assert len(record.cluster.status.nodes) == 3
    assert transitions("llm-a")[-2:] == [("Running", "Updating"), ("Updating", "Running")]


def test_update_of_an_unknown_cluster_is_refused(dags, fake, capfd, caplog):
    dr = run(dags, "airfleet_cluster_update", {"cluster": SSH_CLUSTER})
    assert states(dr)["admit"] == "failed"
    assert "cluster llm-a is not registered; create or onboard it first" in output(capfd, caplog)
    assert_untouched(fake)


def test_delete_then_delete_again_is_done(dags, fake):
    run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})
    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-a"})

    assert str(dr.state) == "success"
    assert Store().get_cluster("llm-a") is None
    [gone] = Store().list_clusters(include_deleted=True)
    assert gone.phase is Phase.DELETED and gone.deleted_at is not None
    assert transitions("llm-a")[-2:] == [("Running", "Deleting"), ("Deleting", "Deleted")]

    again = run(dags, "airfleet_cluster_delete", {"name": "llm-a"})
    assert str(again.state) == "success"
    assert states(again)["teardown"] == "skipped"
    assert fake.calls().count("teardown") == 1


LEFT = ["10.0.0.2: container airfleet-ray-worker", "10.0.0.1: process 4242 raylet"]


def test_delete_that_leaves_something_behind_says_what_and_how_force_works(dags, fake):
    run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})
    fake.instruct(leftovers={"llm-a": LEFT})
    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-a"})

    assert str(dr.state) == "failed"
    record = Store().require_cluster("llm-a")
    assert record.phase is Phase.FAILED
    assert all(item in record.cluster.status.message for item in LEFT)
    assert record.cluster.status.left_behind == []  # not deleted: nothing to keep a list for
    first = _note(dr).splitlines()[0]
    assert first.startswith("Failed at teardown: left behind: " + "; ".join(LEFT))
    assert '"force": true' in first and "record the cluster Deleted anyway" in first


def test_a_forced_delete_that_leaves_something_says_each_item_everywhere(dags, fake):
    from airfleet import fleet

    run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})
    fake.instruct(leftovers={"llm-a": LEFT})
    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-a", "force": True})

    assert str(dr.state) == "success", states(dr)
    [gone] = Store().list_clusters(include_deleted=True)
    assert gone.phase is Phase.DELETED and gone.cluster.status.left_behind == LEFT
    assert gone.cluster.status.message == "deleted by force; left behind: " + "; ".join(LEFT)
    events = Store().events("llm-a")
    assert [e.message for e in events if e.reason == "LeftBehind"] == LEFT
    deleted = [e for e in events if e.to_phase == "Deleted"][-1]
    assert deleted.reason == "DeletedByForce" and all(item in deleted.message for item in LEFT)
    assert _note(dr).splitlines()[0] == (
        "llm-a: Running → Deleting → Deleted (deleted by force; left behind: "
        + "; ".join(LEFT) + "); 2 LeftBehind")
    # The fleet keeps showing it, with what it left, until the name is used again.
    [shown] = fleet.visible(Store().list_clusters(include_deleted=True))
    assert fleet.summary(shown)["left_behind"] == LEFT
    fake.instruct()
    run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})
    [again] = fleet.visible(Store().list_clusters(include_deleted=True))
    assert again.phase is Phase.RUNNING and fleet.summary(again)["left_behind"] == []


def test_notes_say_why_a_request_was_refused_and_what_was_not_registered(dags, fake):
    bad = copy.deepcopy(SSH_CLUSTER)
    bad["spec"]["config"]["ssh"]["workers"] = ["10.0.0.1"]  # the head again
    dr = run(dags, "airfleet_cluster_create", {"cluster": bad})
    assert str(dr.state) == "failed"
    first, *rest = _note(dr).splitlines()
    assert first.startswith("Failed at admit: invalid request: "
                            "cluster.spec.config.ssh.workers: the head 10.0.0.1 must not be listed")
    assert rest == ["Nothing changed."]

    dr = run(dags, "airfleet_cluster_delete", {"name": "nobody"})
    assert str(dr.state) == "success"
    assert _note(dr) == "cluster nobody is not registered: nothing to delete"

    dr = run(dags, "airfleet_cluster_health_check", {"names": ["nobody"]})
    assert _note(dr).splitlines()[0].startswith("nobody: not registered, nothing to check")


def test_onboard_discovers_without_setting_up(dags, fake):
    dr = run(dags, "airfleet_cluster_onboard", {"cluster": SSH_CLUSTER})

    assert str(dr.state) == "success"
    assert fake.calls() == ["query", "detect_accelerators"]
    record = Store().require_cluster("llm-a")
    assert record.phase is Phase.RUNNING and len(record.cluster.status.nodes) == 2


def test_health_check_moves_running_and_failed_and_skips_held_clusters(dags, fake, capfd):
    second = copy.deepcopy(SSH_CLUSTER)
    second["metadata"]["name"] = "llm-b"
    run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})
    run(dags, "airfleet_cluster_create", {"cluster": second})

    fake.instruct(unhealthy=["llm-b"])
    dr = run(dags, "airfleet_cluster_health_check", {})
    assert str(dr.state) == "success"
    parts = sorted((ti.map_index, str(ti.state)) for ti in dr.get_task_instances()
                   if ti.task_id == "check_fleet")
    assert parts == [(0, "success"), (1, "success")]  # AIRFLEET_HEALTH_SHARDS' default
    assert _note(dr).splitlines()[0] == "checked 2 clusters: 2 Running"  # llm-b: a first miss
    assert Store().require_cluster("llm-b").phase is Phase.RUNNING  # one miss is not enough
    assert str(run(dags, "airfleet_cluster_health_check", {}).state) == "success"
    assert Store().require_cluster("llm-a").phase is Phase.RUNNING
    b = Store().require_cluster("llm-b")
    assert b.phase is Phase.FAILED and b.cluster.status.message == "fake probe: head unreachable"

    fake.instruct(unhealthy=[])
    Store().acquire_lease("llm-a", "airfleet_cluster_update/busy", ttl=600)
    run(dags, "airfleet_cluster_health_check", {"names": ["llm-a", "llm-b"]})
    assert Store().require_cluster("llm-b").phase is Phase.RUNNING
    assert fake.calls("llm-a").count("health") == 2  # skipped while held
    assert transitions("llm-b")[-2:] == [("Running", "Failed"), ("Failed", "Running")]
    logged = "".join(capfd.readouterr())
    assert "part 2 of 2: checked" in logged  # the tasks' output is here ...
    assert "XCom not found" not in logged  # ... and no error of reading the parts' results


def test_a_sealed_credential_goes_to_the_vault_and_its_plaintext_nowhere(dags, fake, capfd, caplog,
                                                                          airfleet_home):
    from airfleet import crypto
    from airfleet.vault import Vault

    crypto.init_keys(airfleet_home / "keys")
    canary = "canary-" + secrets.token_hex(12)
    envelope = crypto.seal(crypto.load_public_key(airfleet_home / "keys"), canary.encode())
    cluster = copy.deepcopy(SSH_CLUSTER)
    cluster["spec"]["config"]["ssh"]["credential"] = {"sealed": envelope}

    dr = run(dags, "airfleet_cluster_create", {"cluster": cluster})
    assert str(dr.state) == "success"
    again = run(dags, "airfleet_cluster_create", {"cluster": cluster})
    assert str(again.state) == "success"

    ref = Store().require_cluster("llm-a").cluster.spec.config.ssh.credential
    assert ref.kind == "vault_id" and ref.sealed is None
    assert Vault.default().get(ref.vault_id) == canary.encode()
    assert len(Store().secret_ids()) == 1  # the re-run stored no duplicate

    assert canary not in output(capfd, caplog)
    airflow_home = Path(__import__("os").environ["AIRFLOW_HOME"])
    for path in [*airfleet_home.rglob("*"), *airflow_home.rglob("*")]:
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), f"canary found in {path}"


def _asset_events(uri: str) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                               .where(AssetModel.uri == uri).order_by(AssetEvent.id))
        return [dict(row.extra) for row in rows]


def test_each_flow_announces_running_failed_and_deleted_as_cluster_asset_events(dags, fake):
    uri = "airfleet://cluster/llm-a"
    before = len(_asset_events(uri))  # Airflow's DB is the session's: earlier tests add theirs
    assert str(run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER}).state) == "success"
    fake.instruct(fail_at={"llm-a": "apply"})
    update = json.loads(json.dumps(SSH_CLUSTER))
    update["spec"]["config"]["ssh"]["workers"].append("10.0.0.9")
    assert str(run(dags, "airfleet_cluster_update", {"cluster": update}).state) == "failed"
    fake.instruct()
    assert str(run(dags, "airfleet_cluster_delete", {"name": "llm-a"}).state) == "success"

    events = _asset_events(uri)[before:]
    assert [e["phase"] for e in events] == ["Running", "Failed", "Deleted"], events
    assert events[0]["cluster"] == "llm-a" and events[0]["run"].startswith("airfleet_cluster_create/")
    # A dry run changes nothing and announces nothing.
    run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER, "dry_run": True})
    assert len(_asset_events(uri)) == before + 3


def _note(dag_run) -> str | None:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return session.scalar(select(DagRun).where(DagRun.dag_id == dag_run.dag_id,
                                                   DagRun.run_id == dag_run.run_id)).note


def test_each_run_ends_with_a_run_note_saying_what_it_changed(dags, fake):
    create = run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})
    assert _note(create) == "llm-a: Pending → Provisioning → Running"

    fake.instruct(fail_at={"llm-a": "apply"})
    update = json.loads(json.dumps(SSH_CLUSTER))
    update["spec"]["config"]["ssh"]["workers"].append("10.0.0.9")
    failed = run(dags, "airfleet_cluster_update", {"cluster": update})
    assert _note(failed) == (
        "Failed at apply: fake backend told to fail at apply\nllm-a: Running → Updating → Failed "
        "(apply failed: fake backend told to fail at apply); SpecChanged")
    fake.instruct()

    delete = run(dags, "airfleet_cluster_delete", {"name": "llm-a"})
    assert _note(delete) == "llm-a: Failed → Deleting → Deleted (every component removed)"
    # Last: dag.test() keeps a run's conf in the DAG's Params, dry_run included.
    dry = run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER, "dry_run": True})
    assert _note(dry) == "Nothing changed (dry run)."


def test_a_note_someone_wrote_stands(dags, fake, airflow_db):
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    from airfleet_airflow import listener

    created = run(dags, "airfleet_cluster_create", {"cluster": SSH_CLUSTER})
    with create_session() as session:
        dag_run = session.get(DagRun, created.id)
        dag_run.note = "mine"
        listener.on_dag_run_success(dag_run=dag_run, msg="success")
    assert _note(created) == "mine"
