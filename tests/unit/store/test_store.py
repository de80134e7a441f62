"""The store (airfleet.store.Store) on SQLite and on PostgreSQL: schema, clusters, history.

Every test runs twice through the ``store`` fixture: on a SQLite file and on a fresh
PostgreSQL database.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, func, inspect, select

from airfleet import lifecycle
from airfleet.errors import Conflict, IllegalTransition, NotFound
from airfleet.resources import ClusterRequest, ClusterStatus, Phase
from airfleet.store import StatusWrite, Store
from airfleet.store.migrations import VERSION_TABLE, current_revision
from airfleet.store.tables import Base, ClusterRow, EventRow

TABLES = {"airfleet_clusters", "airfleet_events", "airfleet_leases", "airfleet_vault_secrets",
          "airfleet_policy_bindings", "airfleet_policy_audit", "airfleet_endpoints",
          "airfleet_endpoint_events"}


def request(name: str = "alpha", head: str = "10.0.0.1",
            labels: dict[str, str] | None = None) -> ClusterRequest:
    return ClusterRequest.model_validate({
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"type": "ssh", "provider": "static",
                 "config": {"ssh": {"head": head,
                                    "credential": {"airflow_conn_id": f"ssh_{name}"}}}},
    })


def status(phase: Phase, message: str = "", observed_at: datetime | None = None) -> ClusterStatus:
    return ClusterStatus(phase=phase, message=message, observed_at=observed_at)


def row_counts(store: Store) -> dict[str, int]:
    with store.session() as s:
        return {"clusters": s.scalar(select(func.count()).select_from(ClusterRow)),
                "events": s.scalar(select(func.count()).select_from(EventRow))}


def transitions(store: Store, name: str) -> list[tuple[str | None, str | None, str, str | None]]:
    return [(e.from_phase, e.to_phase, e.reason, e.run_id) for e in store.events(name)
            if e.kind == "Transition"]


def drive(store: Store, name: str, *phases: Phase) -> None:
    """Walk a registered cluster through legal transitions."""
    for phase in phases:
        store.set_status(name, status(phase), reason=f"To{phase}", run_id="setup")


# ---- schema -----------------------------------------------------------------------------------

def test_migrate_is_idempotent_and_returns_head(store: Store):
    assert store.migrate() == "0005"
    assert store.migrate() == "0005"
    assert current_revision(store.engine) == "0005"
    names = set(inspect(store.engine).get_table_names())
    assert TABLES | {VERSION_TABLE} <= names
    assert "alembic_version" not in names  # Airflow's own version table stays untouched


def test_alembic_migration_matches_the_orm_models(store: Store):
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={
            "version_table": VERSION_TABLE, "compare_type": True,
            "compare_server_default": True})
        diff = compare_metadata(context, Base.metadata)
        # The comparison does look at this database: against no models it sees every table.
        removed = {d[1].name for d in compare_metadata(context, MetaData())
                   if d[0] == "remove_table"}
    assert diff == []
    assert removed == TABLES


# ---- register ---------------------------------------------------------------------------------

def test_register_creates_a_pending_cluster_and_an_event(store: Store):
    before = datetime.now(UTC)
    record, created = store.register_cluster(request(labels={"team": "ml"}), run_id="run-1",
                                             token=None)
    after = datetime.now(UTC)

    assert created is True
    assert record.name == "alpha"
    assert record.phase is Phase.PENDING
    assert (record.generation, record.observed_generation, record.version) == (1, 0, 1)
    assert record.deleted_at is None
    assert before <= record.created_at <= after
    assert record.cluster.status.last_run_id == "run-1"
    assert record.cluster.metadata.labels == {"team": "ml"}
    assert record.cluster.spec == request().spec

    stored = store.get_cluster("alpha")
    assert stored.uid == record.uid
    assert stored.phase is Phase.PENDING
    [event] = store.events("alpha")
    assert (event.from_phase, event.to_phase, event.reason, event.run_id) == (
        None, "Pending", "Registered", "run-1")
    assert before <= event.at <= after


def test_register_again_with_the_same_spec_adopts(store: Store):
    first, _ = store.register_cluster(request(), run_id="run-1", token=None)

    again, created = store.register_cluster(request(), run_id="run-2", token=None)

    assert created is False
    assert again.uid == first.uid
    assert again.version == first.version
    assert again.cluster.status.last_run_id == "run-1"
    assert row_counts(store) == {"clusters": 1, "events": 1}


def test_register_with_another_spec_is_a_conflict(store: Store):
    first, _ = store.register_cluster(request(head="10.0.0.1"), run_id="run-1", token=None)

    with pytest.raises(Conflict, match="cluster alpha exists with another spec"):
        store.register_cluster(request(head="10.0.0.2"), run_id="run-2", token=None)

    kept = store.get_cluster("alpha")
    assert kept.cluster.spec.config.ssh.head == "10.0.0.1"
    assert (kept.uid, kept.version) == (first.uid, first.version)
    assert row_counts(store) == {"clusters": 1, "events": 1}


# ---- update_spec -------------------------------------------------------------------------------

def test_update_spec_bumps_the_generation_only_when_the_spec_changes(store: Store):
    store.register_cluster(request(), run_id="run-1", token=None)

    same = store.update_spec(request(), run_id="run-2", token=None)
    assert (same.generation, same.version) == (1, 1)
    assert len(store.events("alpha")) == 1

    relabelled = store.update_spec(request(labels={"tier": "gold"}), run_id="run-3", token=None)
    assert (relabelled.generation, relabelled.version) == (1, 2)
    assert relabelled.cluster.metadata.labels == {"tier": "gold"}

    changed = store.update_spec(request(head="10.0.0.9", labels={"tier": "gold"}),
                                run_id="run-4", token=None)
    assert (changed.generation, changed.version) == (2, 3)
    assert changed.cluster.spec.config.ssh.head == "10.0.0.9"
    assert changed.observed_generation == 0

    again = store.update_spec(request(head="10.0.0.9", labels={"tier": "gold"}),
                              run_id="run-5", token=None)
    assert (again.generation, again.version) == (2, 3)

    stored = store.get_cluster("alpha")
    assert (stored.generation, stored.version) == (2, 3)
    assert stored.cluster.spec.config.ssh.head == "10.0.0.9"
    spec_events = [(e.reason, e.run_id) for e in store.events("alpha") if e.reason == "SpecChanged"]
    assert spec_events == [("SpecChanged", "run-3"), ("SpecChanged", "run-4")]


def test_update_spec_with_a_stale_version_is_a_conflict(store: Store):
    store.register_cluster(request(), run_id="run-1", token=None)
    drive(store, "alpha", Phase.RUNNING)  # version 2

    with pytest.raises(Conflict, match="changed since version 1"):
        store.update_spec(request(head="10.0.0.9"), run_id="run-2", token=None,
                          expected_version=1)

    stored = store.get_cluster("alpha")
    assert (stored.generation, stored.version) == (1, 2)
    assert stored.cluster.spec.config.ssh.head == "10.0.0.1"


def test_update_spec_of_an_unknown_cluster_is_not_found(store: Store):
    with pytest.raises(NotFound, match="cluster ghost is not registered"):
        store.update_spec(request("ghost"), run_id="run-1", token=None)
    assert row_counts(store) == {"clusters": 0, "events": 0}


# ---- set_status: optimistic concurrency and the state machine -----------------------------------

def test_set_status_with_a_stale_expected_version_is_a_conflict_and_writes_nothing(store: Store):
    record, _ = store.register_cluster(request(), run_id="run-1", token=None)
    moved = store.set_status("alpha", status(Phase.PROVISIONING, "provisioning"),
                             reason="Create", run_id="run-2", expected_version=record.version)
    assert moved.version == record.version + 1
    counts = row_counts(store)

    with pytest.raises(Conflict, match=f"cluster alpha changed since version {record.version}"):
        store.set_status("alpha", status(Phase.RUNNING, "late writer"), reason="Ready",
                         run_id="run-3", expected_version=record.version)

    stored = store.get_cluster("alpha")
    assert stored.phase is Phase.PROVISIONING
    assert stored.version == moved.version
    assert stored.cluster.status.message == "provisioning"
    assert stored.cluster.status.last_run_id == "run-2"
    assert row_counts(store) == counts
    assert transitions(store, "alpha")[-1] == ("Pending", "Provisioning", "Create", "run-2")


@pytest.mark.parametrize("path, illegal", [
    ((Phase.RUNNING,), Phase.PENDING),
    ((Phase.PROVISIONING,), Phase.PENDING),
    ((), Phase.UPDATING),
    ((Phase.PROVISIONING, Phase.DELETING), Phase.RUNNING),
    ((Phase.RUNNING, Phase.UPDATING), Phase.DELETED),
])
def test_an_illegal_transition_raises_and_changes_nothing(store: Store, path, illegal):
    store.register_cluster(request(), run_id="run-1", token=None)
    drive(store, "alpha", *path)
    before = store.get_cluster("alpha")
    events_before = store.events("alpha")

    with pytest.raises(IllegalTransition, match=f"cannot go from {before.phase} to {illegal}"):
        store.set_status("alpha", status(illegal, "not allowed"), reason="Bad", run_id="run-x",
                         expected_version=before.version)

    after = store.get_cluster("alpha")
    assert (after.phase, after.version, after.cluster.status) == (
        before.phase, before.version, before.cluster.status)
    assert after.deleted_at is None
    assert store.events("alpha") == events_before


@pytest.mark.parametrize("target", list(Phase))
def test_nothing_follows_deleted(store: Store, target: Phase):
    # The state machine refuses every step out of Deleted ...
    with pytest.raises(IllegalTransition, match="from Deleted a cluster may go to nothing"):
        lifecycle.transition("alpha", Phase.DELETED, target, reason="Revive")

    # ... and the store cannot even address a deleted incarnation by its name any more.
    store.register_cluster(request(), run_id="run-1", token=None)
    drive(store, "alpha", Phase.DELETED)
    [gone] = store.list_clusters(include_deleted=True)
    events_before = store.events("alpha")

    with pytest.raises(NotFound, match="cluster alpha is not registered"):
        store.set_status("alpha", status(target), reason="Revive", run_id="run-x")

    [still] = store.list_clusters(include_deleted=True)
    assert (still.uid, still.phase, still.version, still.deleted_at) == (
        gone.uid, Phase.DELETED, gone.version, gone.deleted_at)
    assert store.events("alpha") == events_before


def test_every_transition_is_appended_to_the_history(store: Store):
    start = datetime.now(UTC)
    store.register_cluster(request(), run_id="run-0", token=None)
    steps = [(Phase.PROVISIONING, "Create", "run-1"), (Phase.RUNNING, "Ready", "run-1"),
             (Phase.FAILED, "HealthCheck", "health-1"), (Phase.FAILED, "HealthCheck", "health-2"),
             (Phase.RUNNING, "HealthCheck", "health-3"), (Phase.DELETING, "Delete", "run-2"),
             (Phase.DELETED, "Deleted", "run-2")]
    for phase, reason, run_id in steps:
        if phase is Phase.DELETING:
            # A write that keeps the phase is no transition and adds no event.
            store.set_status("alpha", status(Phase.RUNNING, "still fine"), reason="Progress",
                             run_id=run_id)
        written = store.set_status("alpha", status(phase, f"now {phase} ({run_id})"),
                                   reason=reason, run_id=run_id)
        assert written.phase is phase
        assert written.cluster.status.last_run_id == run_id
        assert written.cluster.status.observed_at is not None
    end = datetime.now(UTC)

    assert transitions(store, "alpha") == [
        ("Pending", "Provisioning", "Create", "run-1"),
        ("Provisioning", "Running", "Ready", "run-1"),
        ("Running", "Failed", "HealthCheck", "health-1"),
        ("Failed", "Failed", "HealthCheck", "health-2"),
        ("Failed", "Running", "HealthCheck", "health-3"),
        ("Running", "Deleting", "Delete", "run-2"),
        ("Deleting", "Deleted", "Deleted", "run-2"),
    ]
    events = store.events("alpha")
    assert len(events) == 1 + len(steps)  # Registered + one per transition, none for "Progress"
    stamps = [e.at for e in events]
    assert stamps == sorted(stamps)
    assert all(start <= at <= end and at.utcoffset() == timedelta(0) for at in stamps)
    assert [e.message for e in events if e.kind == "Transition"][:2] == [
        "now Provisioning (run-1)", "now Running (run-1)"]


def test_deleted_sets_deleted_at_and_frees_the_name(store: Store):
    first, _ = store.register_cluster(request(head="10.0.0.1"), run_id="run-1", token=None)
    drive(store, "alpha", Phase.RUNNING)
    before = datetime.now(UTC)
    deleted = store.set_status("alpha", status(Phase.DELETED, "gone"), reason="Deleted",
                               run_id="run-2")
    after = datetime.now(UTC)

    assert deleted.phase is Phase.DELETED
    assert deleted.deleted_at is not None and before <= deleted.deleted_at <= after
    assert store.get_cluster("alpha") is None
    assert store.list_clusters() == []
    with pytest.raises(NotFound, match="cluster alpha is not registered"):
        store.require_cluster("alpha")

    # The name is free: another spec is no conflict, it is a new incarnation.
    second, created = store.register_cluster(request(head="10.0.0.2"), run_id="run-3",
                                             token=None)
    assert created is True
    assert second.uid != first.uid
    assert (second.phase, second.generation, second.version) == (Phase.PENDING, 1, 1)
    assert store.get_cluster("alpha").uid == second.uid

    everything = store.list_clusters(include_deleted=True)
    assert [(r.uid, r.phase) for r in everything] == [(first.uid, Phase.DELETED),
                                                     (second.uid, Phase.PENDING)]
    assert everything[0].deleted_at == deleted.deleted_at

    assert [(e.from_phase, e.to_phase, e.run_id) for e in store.events("alpha")] == [
        (None, "Pending", "run-1"), ("Pending", "Running", "setup"),
        ("Running", "Deleted", "run-2"), (None, "Pending", "run-3")]
    with store.session() as s:
        uids = list(s.scalars(select(EventRow.cluster_uid).order_by(EventRow.id)))
    assert uids == [first.uid] * 3 + [second.uid]


# ---- health checks: older observations never win ---------------------------------------------

def test_only_if_newer_skips_an_older_observation(store: Store):
    store.register_cluster(request(), run_id="run-1", token=None)
    t1 = datetime.now(UTC).replace(microsecond=0)
    recorded = store.set_status("alpha", status(Phase.RUNNING, "healthy", t1), reason="Ready",
                                run_id="run-1")

    for observed in (t1 - timedelta(seconds=5), t1):
        skipped = store.set_status("alpha", status(Phase.FAILED, "stale probe", observed),
                                   reason="HealthCheck", run_id="health-1",
                                   expected_version=recorded.version, only_if_newer=True)
        assert skipped is None
    stored = store.get_cluster("alpha")
    assert (stored.phase, stored.version) == (Phase.RUNNING, recorded.version)
    assert stored.cluster.status.message == "healthy"
    assert stored.cluster.status.observed_at == t1
    assert [t[1] for t in transitions(store, "alpha")] == ["Running"]

    newer = store.set_status("alpha", status(Phase.FAILED, "probe failed", t1 + timedelta(seconds=5)),
                             reason="HealthCheck", run_id="health-2",
                             expected_version=recorded.version, only_if_newer=True)
    assert newer is not None and newer.phase is Phase.FAILED
    assert store.get_cluster("alpha").cluster.status.observed_at == t1 + timedelta(seconds=5)


def test_only_if_newer_compares_instants_not_wall_clocks(store: Store):
    """An observation stamped in another time zone is ordered by the instant it names."""
    store.register_cluster(request(), run_id="run-1", token=None)
    t1 = datetime.now(UTC).replace(microsecond=0)
    east = timezone(timedelta(hours=2))
    store.set_status("alpha", status(Phase.RUNNING, "healthy", t1.astimezone(east)),
                     reason="Ready", run_id="run-1")

    # One minute later in UTC, although its wall clock reads earlier than the +02:00 stamp.
    later = store.set_status("alpha", status(Phase.FAILED, "probe failed", t1 + timedelta(minutes=1)),
                             reason="HealthCheck", run_id="health-1", only_if_newer=True)
    assert later is not None and later.phase is Phase.FAILED

    # One hour earlier in UTC (a later wall clock in +02:00) stays skipped.
    older = store.set_status(
        "alpha", status(Phase.RUNNING, "old probe", (t1 - timedelta(hours=1)).astimezone(east)),
        reason="HealthCheck", run_id="health-2", only_if_newer=True)
    assert older is None
    assert store.get_cluster("alpha").phase is Phase.FAILED


def test_set_statuses_writes_each_on_its_own_terms_in_one_transaction(store: Store):
    """A health check's statuses go in groups: each keeps its version check, its legal
    transition and only_if_newer, and one that fails leaves the others written."""
    t1 = datetime.now(UTC).replace(microsecond=0)
    read = {}
    for name in ("alpha", "bravo", "charlie", "delta", "echo"):
        store.register_cluster(request(name), run_id="run-1", token=None)
        read[name] = store.set_status(name, status(Phase.RUNNING, "healthy", t1),
                                      reason="Ready", run_id="run-1")
    store.set_status("bravo", status(Phase.RUNNING, "a flow wrote", t1 + timedelta(seconds=1)),
                     reason="Ready", run_id="flow")  # bravo's read version is now stale
    store.set_status("delta", status(Phase.DELETING), reason="Delete", run_id="flow")
    store.set_status("delta", status(Phase.DELETED), reason="Deleted", run_id="flow")
    probe = t1 + timedelta(seconds=10)
    writes = [StatusWrite("alpha", status(Phase.FAILED, "GCS down", probe), read["alpha"].version),
              StatusWrite("bravo", status(Phase.FAILED, "GCS down", probe), read["bravo"].version),
              StatusWrite("charlie", status(Phase.RUNNING, "old", t1 - timedelta(seconds=5)),
                          read["charlie"].version),
              StatusWrite("delta", status(Phase.FAILED, "GCS down", probe), read["delta"].version),
              StatusWrite("echo", status(Phase.RUNNING, "healthy again", probe),
                          read["echo"].version)]

    results = store.set_statuses(writes, reason="HealthCheck", run_id="health-1",
                                 only_if_newer=True)

    assert results[0] is True and results[2] is False and results[4] is True
    assert isinstance(results[1], Conflict) and isinstance(results[3], NotFound)
    alpha = store.get_cluster("alpha")
    assert (alpha.phase, alpha.version) == (Phase.FAILED, read["alpha"].version + 1)
    assert alpha.cluster.status.last_run_id == "health-1"
    assert transitions(store, "alpha")[-1] == ("Running", "Failed", "HealthCheck", "health-1")
    assert store.get_cluster("bravo").cluster.status.message == "a flow wrote"
    assert store.get_cluster("charlie").cluster.status.message == "healthy"
    assert store.get_cluster("echo").cluster.status.message == "healthy again"
    assert [t[1] for t in transitions(store, "echo")] == ["Running"]  # no new history


def test_set_statuses_returns_an_illegal_transition_and_writes_the_rest(store: Store):
    store.register_cluster(request("alpha"), run_id="run-1", token=None)
    store.register_cluster(request("bravo"), run_id="run-1", token=None)
    drive(store, "alpha", Phase.RUNNING, Phase.DELETING)
    running = store.set_status("bravo", status(Phase.RUNNING), reason="Ready", run_id="run-1")
    deleting = store.get_cluster("alpha")

    results = store.set_statuses(
        [StatusWrite("alpha", status(Phase.RUNNING, "up"), deleting.version),
         StatusWrite("bravo", status(Phase.FAILED, "down"), running.version)],
        reason="HealthCheck", run_id="health-1")

    assert isinstance(results[0], IllegalTransition) and results[1] is True
    assert store.get_cluster("alpha").version == deleting.version
    assert store.get_cluster("bravo").phase is Phase.FAILED


# ---- listing ------------------------------------------------------------------------------------

def test_list_clusters_filters_by_phase_and_hides_deleted(store: Store):
    for name in ("delta", "alpha", "charlie", "bravo"):
        store.register_cluster(request(name), run_id="run-1", token=None)
    drive(store, "alpha", Phase.RUNNING)
    drive(store, "bravo", Phase.RUNNING, Phase.FAILED)
    drive(store, "charlie", Phase.RUNNING, Phase.DELETED)

    def names(**kwargs) -> list[str]:
        return [r.name for r in store.list_clusters(**kwargs)]

    assert names() == ["alpha", "bravo", "delta"]
    assert names(phase=Phase.RUNNING) == ["alpha"]
    assert names(phase="Failed") == ["bravo"]
    assert names(phase=Phase.PENDING) == ["delta"]
    assert names(phase=Phase.DELETED) == []
    assert names(phase=Phase.DELETED, include_deleted=True) == ["charlie"]
    assert names(include_deleted=True) == ["alpha", "bravo", "charlie", "delta"]
    with pytest.raises(ValueError):
        store.list_clusters(phase="Exploded")


def test_the_same_failure_again_adds_no_history(store: Store):
    store.register_cluster(request(), run_id="run-0", token=None)
    store.set_status("alpha", status(Phase.FAILED, "head unreachable"), reason="HealthCheck",
                     run_id="health-1")
    store.set_status("alpha", status(Phase.FAILED, "head unreachable"), reason="HealthCheck",
                     run_id="health-2")
    store.set_status("alpha", status(Phase.FAILED, "worker 2 down"), reason="HealthCheck",
                     run_id="health-3")
    assert [(f, t, run) for f, t, _, run in transitions(store, "alpha")] == [
        ("Pending", "Failed", "health-1"), ("Failed", "Failed", "health-3")]
