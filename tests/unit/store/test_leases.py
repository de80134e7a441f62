"""Per-cluster leases and fencing tokens (airfleet.store.Store), on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from airfleet.errors import LeaseHeld, StaleFencingToken
from airfleet.resources import ClusterRequest, ClusterStatus, Phase
from airfleet.store import Store
from airfleet.store.tables import ClusterRow, EventRow, LeaseRow


def request(name: str = "alpha", head: str = "10.0.0.1") -> ClusterRequest:
    return ClusterRequest.model_validate({
        "metadata": {"name": name},
        "spec": {"type": "ssh", "provider": "static",
                 "config": {"ssh": {"head": head, "credential": {"airflow_conn_id": "ssh"}}}},
    })


def counts(store: Store) -> tuple[int, int]:
    with store.session() as s:
        return (s.scalar(select(func.count()).select_from(ClusterRow)),
                s.scalar(select(func.count()).select_from(EventRow)))


def lease_row(store: Store, name: str) -> tuple[str | None, int]:
    with store.session() as s:
        row = s.get(LeaseRow, name)
        return row.holder, row.token


def test_acquire_a_free_lease_gives_token_1(store: Store):
    before = datetime.now(UTC)
    lease = store.acquire_lease("alpha", "run-a", ttl=60)
    after = datetime.now(UTC)

    assert (lease.name, lease.holder, lease.token) == ("alpha", "run-a", 1)
    assert lease.held
    assert before <= lease.acquired_at <= after
    assert before + timedelta(seconds=60) <= lease.expires_at <= after + timedelta(seconds=60)
    stored = store.get_lease("alpha")
    assert (stored.holder, stored.token, stored.held) == ("run-a", 1, True)
    assert stored.expires_at == lease.expires_at
    assert store.get_lease("bravo") is None


def test_the_same_holder_reacquiring_keeps_the_token_and_extends_the_expiry(store: Store):
    first = store.acquire_lease("alpha", "run-a", ttl=30)
    time.sleep(0.05)

    again = store.acquire_lease("alpha", "run-a", ttl=600)

    assert again.token == first.token == 1
    assert again.expires_at > first.expires_at + timedelta(seconds=500)
    stored = store.get_lease("alpha")
    assert stored.token == 1
    assert stored.expires_at == again.expires_at
    assert stored.acquired_at == first.acquired_at  # still the same tenure


def test_another_holder_gets_lease_held_naming_the_holder(store: Store):
    held = store.acquire_lease("alpha", "run-a", ttl=600)

    with pytest.raises(LeaseHeld) as err:
        store.acquire_lease("alpha", "run-b", ttl=600)

    message = str(err.value)
    assert "cluster alpha is held by run run-a" in message
    assert "airfleet lease break alpha" in message
    stored = store.get_lease("alpha")
    assert (stored.holder, stored.token, stored.expires_at) == ("run-a", 1, held.expires_at)


def test_release_then_acquire_by_another_holder_grows_the_token(store: Store):
    first = store.acquire_lease("alpha", "run-a", ttl=600)

    assert store.release_lease("alpha", "run-a", first.token) is True
    released = store.get_lease("alpha")
    assert (released.holder, released.held, released.token) == (None, False, 1)

    second = store.acquire_lease("alpha", "run-b", ttl=600)
    assert (second.holder, second.token) == ("run-b", 2)
    assert store.release_lease("alpha", "run-b", second.token) is True
    # Even the first holder coming back is a new tenure with a new token.
    assert store.acquire_lease("alpha", "run-a", ttl=600).token == 3


def test_an_expired_lease_is_taken_over_and_the_old_holder_is_fenced_off(store: Store):
    old = store.acquire_lease("alpha", "run-old", ttl=600)
    store.register_cluster(request(), run_id="run-old", token=old.token)
    store.acquire_lease("alpha", "run-old", ttl=0.2)  # the old run stops renewing
    time.sleep(0.4)
    assert not store.get_lease("alpha").held

    new = store.acquire_lease("alpha", "run-new", ttl=600)
    assert new.holder == "run-new"
    assert new.token == old.token + 1
    written = store.set_status("alpha", ClusterStatus(phase=Phase.PROVISIONING), reason="Create",
                               run_id="run-new", token=new.token)
    before = (store.get_cluster("alpha"), store.events("alpha"), counts(store))

    # The old run wakes up and carries on with its old token: every write is refused.
    with pytest.raises(StaleFencingToken, match=f"fencing token {old.token} is stale .*token "
                                                f"{new.token}, held by run-new"):
        store.set_status("alpha", ClusterStatus(phase=Phase.FAILED, message="old run"),
                         reason="Late", run_id="run-old", token=old.token)
    with pytest.raises(StaleFencingToken):
        store.register_cluster(request("alpha", head="10.0.0.66"), run_id="run-old",
                               token=old.token)
    with pytest.raises(StaleFencingToken):
        store.update_spec(request("alpha", head="10.0.0.66"), run_id="run-old", token=old.token)
    with pytest.raises(StaleFencingToken):
        store.renew_lease("alpha", "run-old", old.token, ttl=600)

    after = (store.get_cluster("alpha"), store.events("alpha"), counts(store))
    assert after == before
    assert after[0].phase is Phase.PROVISIONING and after[0].version == written.version
    lease = store.get_lease("alpha")
    assert (lease.holder, lease.token, lease.expires_at) == ("run-new", new.token, new.expires_at)


def test_fencing_refuses_a_new_cluster_written_with_a_stale_token(store: Store):
    old = store.acquire_lease("beta", "run-old", ttl=0.2)
    time.sleep(0.4)
    store.acquire_lease("beta", "run-new", ttl=600)

    with pytest.raises(StaleFencingToken):
        store.register_cluster(request("beta"), run_id="run-old", token=old.token)
    assert store.get_cluster("beta") is None
    assert counts(store) == (0, 0)


def test_writing_without_a_lease_row_is_refused(store: Store):
    with pytest.raises(StaleFencingToken, match="cluster alpha has no lease"):
        store.register_cluster(request(), run_id="run-a", token=1)
    assert counts(store) == (0, 0)


def test_renew_by_the_holder_extends_the_expiry(store: Store):
    lease = store.acquire_lease("alpha", "run-a", ttl=1)
    renewed = store.renew_lease("alpha", "run-a", lease.token, ttl=900)
    assert renewed.token == lease.token
    assert renewed.expires_at >= lease.expires_at + timedelta(seconds=800)
    assert store.get_lease("alpha").expires_at == renewed.expires_at


def test_release_by_the_old_holder_does_not_free_the_new_holders_lease(store: Store):
    old = store.acquire_lease("alpha", "run-old", ttl=0.2)
    time.sleep(0.4)
    new = store.acquire_lease("alpha", "run-new", ttl=600)

    assert store.release_lease("alpha", "run-old", old.token) is False
    assert store.release_lease("alpha", "run-old", new.token) is False  # right token, not ours
    assert store.release_lease("alpha", "run-new", old.token) is False  # ours, stale token

    lease = store.get_lease("alpha")
    assert (lease.holder, lease.token, lease.held) == ("run-new", new.token, True)
    with pytest.raises(LeaseHeld, match="held by run run-new"):
        store.acquire_lease("alpha", "run-third", ttl=600)
    assert store.release_lease("nobody-leased-this", "run-new", 1) is False


def test_break_lease_frees_it_and_the_next_holder_gets_a_higher_token(store: Store):
    held = store.acquire_lease("alpha", "run-a", ttl=600)
    store.register_cluster(request(), run_id="run-a", token=held.token)

    previous = store.break_lease("alpha")

    assert (previous.holder, previous.token) == ("run-a", held.token)
    broken = store.get_lease("alpha")
    assert broken.holder is None and not broken.held
    nxt = store.acquire_lease("alpha", "run-b", ttl=600)
    assert nxt.token > held.token
    with pytest.raises(StaleFencingToken):
        store.set_status("alpha", ClusterStatus(phase=Phase.FAILED), reason="Late",
                         run_id="run-a", token=held.token)
    assert store.get_cluster("alpha").phase is Phase.PENDING
    assert store.release_lease("alpha", "run-a", held.token) is False
    assert lease_row(store, "alpha") == ("run-b", nxt.token)
    assert store.break_lease("never-leased") is None


def test_a_broken_lease_fences_off_its_holder_at_once(store: Store):
    """`airfleet lease break` promises that the run's further writes are refused: that must
    hold before anyone else takes the lease, too."""
    held = store.acquire_lease("alpha", "run-a", ttl=600)
    store.register_cluster(request(), run_id="run-a", token=held.token)
    store.break_lease("alpha")
    before = (store.get_cluster("alpha"), store.events("alpha"))

    with pytest.raises(StaleFencingToken, match="cluster alpha refused: its lease .*broken"):
        store.set_status("alpha", ClusterStatus(phase=Phase.RUNNING), reason="Ready",
                         run_id="run-a", token=held.token)
    with pytest.raises(StaleFencingToken):
        store.update_spec(request(head="10.0.0.66"), run_id="run-a", token=held.token)
    with pytest.raises(StaleFencingToken):
        store.renew_lease("alpha", "run-a", held.token)

    assert (store.get_cluster("alpha"), store.events("alpha")) == before
    assert store.get_lease("alpha").holder is None


def test_each_history_entry_keeps_the_token_it_was_written_under(store: Store):
    first = store.acquire_lease("alpha", "run-a", ttl=600)
    store.register_cluster(request(), run_id="run-a", token=first.token)
    store.set_status("alpha", ClusterStatus(phase=Phase.PROVISIONING), reason="Create",
                     run_id="run-a", token=first.token)
    store.release_lease("alpha", "run-a", first.token)
    second = store.acquire_lease("alpha", "run-b", ttl=600)
    store.record_event("alpha", "Drained", "node drained", run_id="run-b", token=second.token)
    store.update_spec(request(head="10.0.0.9"), run_id="run-b", token=second.token)
    # An unfenced write (a health check) carries no token.
    store.set_status("alpha", ClusterStatus(phase=Phase.FAILED, message="probe"),
                     reason="HealthCheck", run_id="health")

    assert [(e.run_id, e.reason, e.token) for e in store.events("alpha")] == [
        ("run-a", "Registered", 1), ("run-a", "Create", 1), ("run-b", "Drained", 2),
        ("run-b", "SpecChanged", 2), ("health", "HealthCheck", None)]
