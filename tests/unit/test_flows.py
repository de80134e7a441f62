"""The shared flow steps of ``airfleet.flows`` without Airflow: what happens when a run dies
mid-way, loses its lease, or races a health check."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from airfleet import endpoint_flows, flows
from airfleet.backends import EndpointObservation, Observation
from airfleet.endpoints import EndpointPhase, EndpointRequest, example_endpoint
from airfleet.errors import Conflict, StaleFencingToken, TeardownIncomplete
from airfleet.resources import ClusterRequest, ClusterStatus, Phase
from airfleet.store import StatusWrite, Store, now
from tests.fakes.recording_backend import RecordingBackend

REQUEST = {"metadata": {"name": "llm-a"},
           "spec": {"type": "ssh", "provider": "static",
                    "config": {"ssh": {"head": "10.0.0.1",
                                       "credential": {"airflow_conn_id": "ssh"}}}}}


class RacingBackend(RecordingBackend):
    """Its health probe is overtaken by a flow that writes the cluster meanwhile."""

    def health(self, cluster, ctx):
        store = Store()
        record = store.require_cluster(cluster.name)
        store.set_status(cluster.name, record.cluster.status.model_copy(
            update={"message": "written by a flow during the probe"}),
            reason="Progress", run_id="someone")
        return Observation(healthy=False, message="probe says down")


class SleepyBackend(RecordingBackend):
    """A sync probe (the default ``health_async`` runs it in a thread) that takes 0.5 s."""

    def health(self, cluster, ctx):
        time.sleep(0.5)
        return super().health(cluster, ctx)


class HangingBackend(RecordingBackend):
    """An async probe: cluster ``stuck`` never answers, ``slow`` answers once every other
    cluster's status is written (so it sees whether writes wait for the slowest probe)."""

    async def health_async(self, cluster, ctx):
        if cluster.name == "stuck":
            await asyncio.sleep(3600)
        if cluster.name == "slow":
            for _ in range(40):
                others = [r for r in Store().list_clusters() if r.name not in ("slow", "stuck")]
                if all(r.cluster.status.last_run_id == ctx.run_id for r in others):
                    return Observation(healthy=True, message="the others were written first")
                await asyncio.sleep(0.05)
            return Observation(healthy=False, message="the others waited for this probe")
        return self.health(cluster, ctx)


class DeletingBackend(RecordingBackend):
    """Its cluster is deleted by a flow while the probe runs."""

    def health(self, cluster, ctx):
        store = Store()
        store.set_status(cluster.name, ClusterStatus(phase=Phase.DELETED), reason="Deleted",
                         run_id="delete/1")
        return Observation(healthy=True, message="was fine")


@pytest.fixture
def store(airfleet_home, monkeypatch):
    monkeypatch.setenv("AIRFLEET_BACKENDS", "ssh=tests.fakes.recording_backend:RecordingBackend")
    s = Store()
    s.migrate()
    return s


def _running(store: Store, name: str = "llm-a") -> None:
    lease = flows.acquire(store, name, "create/1")
    flows.register(store, lease, {**REQUEST, "metadata": {"name": name}})
    flows.finish(store, lease, Phase.RUNNING, "Created")
    flows.release(store, lease)


def test_release_turns_a_transient_phase_left_by_a_dead_run_into_failed(store):
    lease = flows.acquire(store, "llm-a", "create/1")
    flows.register(store, lease, REQUEST)
    flows.begin(store, lease, Phase.PROVISIONING, "Create")
    # ... the task running the backend was killed here; the teardown still runs:
    flows.release(store, lease)

    record = store.require_cluster("llm-a")
    assert record.phase is Phase.FAILED
    assert "run create/1 ended while the cluster was Provisioning" in record.cluster.status.message
    assert store.get_lease("llm-a").holder is None


def test_a_run_whose_lease_was_taken_over_changes_nothing(store):
    old = flows.acquire(store, "llm-a", "create/1")
    flows.register(store, old, REQUEST)
    store.break_lease("llm-a")
    new = flows.acquire(store, "llm-a", "delete/2")
    assert new.token > old.token

    with pytest.raises(StaleFencingToken):
        flows.begin(store, old, Phase.PROVISIONING, "Create")
    with pytest.raises(StaleFencingToken):
        flows.run_verb(store, old, "apply")
    flows.release(store, old)  # not ours any more: frees nothing

    assert store.require_cluster("llm-a").phase is Phase.PENDING
    assert store.get_lease("llm-a").holder == "delete/2"


def test_an_unhealthy_apply_fails_the_step_and_records_why(store, monkeypatch):
    class Unhealthy(RecordingBackend):
        def apply(self, cluster, ctx):
            return Observation(healthy=False, message="worker 10.0.0.2 never joined")

    monkeypatch.setattr(RecordingBackend, "apply", Unhealthy.apply)
    lease = flows.acquire(store, "llm-a", "create/1")
    flows.register(store, lease, REQUEST)
    flows.begin(store, lease, Phase.PROVISIONING, "Create")
    with pytest.raises(Exception, match="worker 10.0.0.2 never joined"):
        flows.run_verb(store, lease, "apply")
    record = store.require_cluster("llm-a")
    assert record.phase is Phase.FAILED
    assert record.cluster.status.message == "apply failed: worker 10.0.0.2 never joined"


def test_a_health_check_never_overwrites_what_a_flow_wrote_during_the_probe(store, monkeypatch):
    _running(store)
    monkeypatch.setenv("AIRFLEET_BACKENDS", "ssh=tests.unit.test_flows:RacingBackend")

    assert flows.health_check(store, "health/1") == {"llm-a": "skipped: changed while probing"}
    record = store.require_cluster("llm-a")
    assert record.phase is Phase.RUNNING
    assert record.cluster.status.message == "written by a flow during the probe"


def _health_writes_after_each_read(store: Store, monkeypatch, times: int) -> list[int]:
    """The next ``times`` reads of the cluster are each followed by a health check's status
    write (as ``set_statuses`` does it, on the version the check read): a lease holder's
    write after that read finds the version moved. Returns the versions the check wrote."""
    read, written = store.require_cluster, []

    def read_then_health_writes(name):
        record = read(name)
        if len(written) < times:
            seen = record.cluster.status.model_copy(update={"message": "probed",
                                                            "observed_at": now()})
            assert store.set_statuses([StatusWrite(name, seen, record.version)],
                                      reason="HealthCheck", run_id="health/1") == [True]
            written.append(record.version + 1)
        return record

    monkeypatch.setattr(store, "require_cluster", read_then_health_writes)
    return written


@pytest.mark.parametrize("step", ["begin", "update_status", "finish"])
def test_a_health_check_writing_between_a_holders_read_and_write_does_not_fail_the_run(
        store, monkeypatch, step):
    _running(store)
    lease = flows.acquire(store, "llm-a", "update/1")
    written = _health_writes_after_each_read(store, monkeypatch, times=2)
    write = {"begin": lambda: flows.begin(store, lease, Phase.UPDATING, "Update"),
             "update_status": lambda: flows._update_status(store, lease, message="applied"),
             "finish": lambda: flows.finish(store, lease, Phase.RUNNING, "Updated")}[step]

    record = write()
    assert len(written) == 2  # the holder lost the race twice, then wrote on a fresh read
    assert record.version == written[-1] + 1
    assert record.cluster.status.last_run_id == "update/1"


def test_a_holder_that_keeps_losing_the_race_fails_and_a_stale_one_is_not_retried(
        store, monkeypatch):
    _running(store)
    lease = flows.acquire(store, "llm-a", "update/1")
    written = _health_writes_after_each_read(store, monkeypatch, times=99)
    with pytest.raises(Conflict, match="changed since version"):
        flows.begin(store, lease, Phase.UPDATING, "Update")
    assert len(written) == flows.HOLDER_WRITE_ATTEMPTS

    store.break_lease("llm-a")
    flows.acquire(store, "llm-a", "delete/2")
    written.clear()
    with pytest.raises(StaleFencingToken):
        flows.begin(store, lease, Phase.UPDATING, "Update")
    assert len(written) == 1  # refused at once: no second read


def _endpoint_health_writes_after_each_read(store: Store, monkeypatch, times: int) -> list[int]:
    """As :func:`_health_writes_after_each_read`, for the endpoint version a holder reads: the
    next ``times`` reads are each followed by the endpoint probe's status write."""
    read, written = store.require_endpoint, []

    def read_then_health_writes(name, version):
        record_ = read(name, version)
        if len(written) < times:
            seen = record_.endpoint.status.model_copy(update={"message": "probed",
                                                              "observed_at": now()})
            assert store.set_endpoint_status(name, version, seen, reason="HealthCheck",
                                             run_id="health/1", only_if_newer=True)
            written.append(record_.row_version + 1)
        return record_

    monkeypatch.setattr(store, "require_endpoint", read_then_health_writes)
    return written


@pytest.mark.parametrize("step", ["deploying", "finish"])
def test_an_endpoint_probe_writing_between_a_holders_read_and_write_does_not_fail_the_run(
        store, monkeypatch, step):
    _running(store)
    lease = flows.acquire(store, "llm-a", "deploy/1")
    store.put_endpoint(EndpointRequest.model_validate(example_endpoint()), run_id=lease.holder,
                       token=lease.token)
    deploying = lambda: endpoint_flows._phase(  # noqa: E731
        store, lease, "chat", "v1", EndpointPhase.DEPLOYING, "Deploying", "deploy by deploy/1")
    if step == "finish":
        deploying()
    written = _endpoint_health_writes_after_each_read(store, monkeypatch, times=2)

    {"deploying": deploying,
     "finish": lambda: endpoint_flows.finish(store, lease, "chat", "v1", EndpointObservation(
         True, "1/1 ready", ready_replicas=1, replicas=1))}[step]()
    record_ = store.require_endpoint("chat", "v1")
    assert len(written) == 2  # the holder lost the race twice, then wrote on a fresh read
    assert record_.row_version == written[-1] + 1
    assert record_.phase is {"deploying": EndpointPhase.DEPLOYING,
                             "finish": EndpointPhase.RUNNING}[step]
    assert record_.endpoint.status.last_run_id == "deploy/1"


@pytest.mark.postgres
def test_a_probe_committing_inside_a_deploys_spec_write_does_not_fail_the_run(pg_url,
                                                                               monkeypatch):
    """On PostgreSQL (read committed) an endpoint probe's status write can commit between the
    SELECT and the UPDATE of the holder's ``put_endpoint`` (SQLite's BEGIN IMMEDIATE keeps it
    out): the holder reads and writes again instead of failing the deploy."""
    monkeypatch.setenv("AIRFLEET_BACKENDS", "ssh=tests.fakes.recording_backend:RecordingBackend")
    store, probe = Store(pg_url), Store(pg_url)
    store.migrate()
    _running(store)
    lease = flows.acquire(store, "llm-a", "deploy/1")
    data = example_endpoint()
    store.put_endpoint(EndpointRequest.model_validate(data), run_id=lease.holder,
                       token=lease.token)
    write, probed = store._write_endpoint, []

    def probe_commits_first(session, row, values, expected_version):
        if len(probed) < 2:  # the holder's first two attempts lose the race
            seen = probe.require_endpoint(row.name, row.version).endpoint.status
            assert probe.set_endpoint_status(
                row.name, row.version, seen.model_copy(update={"observed_at": now()}),
                reason="HealthCheck", run_id="health/1", only_if_newer=True)
            probed.append(row.version)
        return write(session, row, values, expected_version)

    monkeypatch.setattr(store, "_write_endpoint", probe_commits_first)
    data["spec"]["replicas"] = 2
    endpoint_flows.record(store, lease, {"name": "chat", "target": "v1", "flow": "endpoint_deploy",
                                         "versions": {"v1": data}})
    record_ = store.require_endpoint("chat", "v1")
    assert probed == ["v1", "v1"]
    assert record_.endpoint.spec.replicas == 2 and record_.generation == 2
    assert record_.phase is EndpointPhase.DEPLOYING
    store.dispose()
    probe.dispose()


def test_a_health_check_skips_older_observations_and_unknown_names(store):
    _running(store)
    future = store.require_cluster("llm-a").cluster.status.observed_at.replace(year=2999)
    store.set_status("llm-a", ClusterStatus(phase=Phase.RUNNING, observed_at=future),
                     reason="Progress", run_id="x")

    outcome = flows.health_check(store, "health/1", ["llm-a", "nope"])
    assert outcome == {"llm-a": "skipped: a newer status is recorded", "nope": "not registered"}


def test_sealed_credentials_are_swapped_for_vault_ids():
    envelope = "afv1." + "0" * 16 + ".a.b.c"
    request = ClusterRequest.model_validate(
        {**REQUEST, "spec": {**REQUEST["spec"], "config": {"ssh": {
            "head": "10.0.0.1", "credential": {"sealed": envelope}}}}})
    stored = {}

    def vault_put(env: str, where: str) -> str:
        stored[where] = env
        return "vlt_" + "1" * 32

    out = flows.store_sealed_credentials(request, vault_put)
    assert out.spec.config.ssh.credential.vault_id == "vlt_" + "1" * 32
    assert out.spec.config.ssh.credential.sealed is None
    assert stored == {"cluster.spec.config.ssh.credential": envelope}


def test_one_missed_probe_does_not_flip_a_running_cluster(store, monkeypatch, tmp_path):
    _running(store)
    state = tmp_path / "state.json"
    monkeypatch.setenv("AIRFLEET_FAKE_BACKEND_STATE", str(state))
    state.write_text('{"unhealthy": ["llm-a"]}')

    assert flows.health_check(store, "health/1") == {"llm-a": "Running"}
    record = store.require_cluster("llm-a")
    assert record.cluster.status.failed_probes == 1
    assert record.cluster.status.message.startswith("probe failed (1 of 2 before Failed)")

    state.write_text('{"unhealthy": []}')  # the flap is over: the count starts again
    assert flows.health_check(store, "health/2") == {"llm-a": "Running"}
    assert store.require_cluster("llm-a").cluster.status.failed_probes == 0

    state.write_text('{"unhealthy": ["llm-a"]}')
    assert flows.health_check(store, "health/3") == {"llm-a": "Running"}
    assert flows.health_check(store, "health/4") == {"llm-a": "Failed"}
    assert flows.health_check(store, "health/5") == {"llm-a": "Failed"}
    state.write_text('{"unhealthy": []}')
    assert flows.health_check(store, "health/6") == {"llm-a": "Running"}
    phases = [(e.from_phase, e.to_phase) for e in store.events("llm-a") if e.kind == "Transition"]
    # the second identical failure is no news: no Failed -> Failed entry for it
    assert phases[-2:] == [("Running", "Failed"), ("Failed", "Running")]


def _fleet(store: Store, monkeypatch, backend: type, names: list[str]) -> None:
    for name in names:
        _running(store, name)
    monkeypatch.setenv("AIRFLEET_BACKENDS", f"ssh=tests.unit.test_flows:{backend.__name__}")


def _timed(store: Store, **kwargs) -> tuple[dict[str, str], float]:
    started = time.monotonic()
    outcomes = flows.health_check(store, "health/1", **kwargs)
    return outcomes, time.monotonic() - started


def test_a_fleet_is_probed_concurrently_at_most_concurrency_at_once(store, monkeypatch):
    names = [f"llm-{i}" for i in range(30)]
    _fleet(store, monkeypatch, SleepyBackend, names)

    outcomes, took = _timed(store, concurrency=30, timeout=5)
    # 30 probes of 0.5 s: about one probe's time (asyncio's own 6 threads would take 2.5 s)
    assert took < 1.5
    assert outcomes == dict.fromkeys(names, "Running")
    assert {store.require_cluster(n).cluster.status.message for n in names} == \
        {"fake probe: healthy"}
    assert _timed(store, names=names[:4], concurrency=2, timeout=5)[1] >= 1.0  # 2 rounds


def test_a_hanging_cluster_times_out_and_a_slow_one_waits_for_no_write(store, monkeypatch):
    names = ["stuck", "slow", *(f"llm-{i}" for i in range(8))]
    _fleet(store, monkeypatch, HangingBackend, names)

    outcomes, took = _timed(store, concurrency=10, timeout=1.5)
    assert took < 3
    assert outcomes == dict.fromkeys(names, "Running")  # one failed probe does not flip it
    stuck = store.require_cluster("stuck").cluster.status
    assert stuck.failed_probes == 1
    assert stuck.message == ("probe failed (1 of 2 before Failed): health probe timed out "
                             "after 1.5s")
    assert store.require_cluster("slow").cluster.status.message == \
        "the others were written first"


def test_held_pending_and_deleted_clusters_are_skipped_and_never_probed(store, monkeypatch,
                                                                         tmp_path):
    for name in ("llm-a", "llm-b"):
        _running(store, name)
    flows.acquire(store, "llm-b", "update/7")
    flows.register(store, flows.acquire(store, "llm-c", "create/2"),
                   {**REQUEST, "metadata": {"name": "llm-c"}})  # Pending, its create runs
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("AIRFLEET_FAKE_BACKEND_LOG", str(calls))

    assert flows.health_check(store, "health/1") == {
        "llm-a": "Running", "llm-b": "skipped: held by update/7", "llm-c": "skipped: Pending"}
    assert [json.loads(line)["cluster"] for line in calls.read_text().splitlines()] == ["llm-a"]

    monkeypatch.setenv("AIRFLEET_BACKENDS", "ssh=tests.unit.test_flows:DeletingBackend")
    assert flows.health_check(store, "health/2", ["llm-a"]) == {
        "llm-a": "skipped: deleted while probing"}


def test_clients_that_cannot_be_built_fail_that_clusters_probe_only(store):
    for name in ("llm-a", "llm-b"):
        _running(store, name)

    def clients_for(cluster):
        if cluster.name == "llm-b":
            raise RuntimeError("connection ssh_fleet has no private key")
        return {}

    assert flows.health_check(store, "health/1", clients_for=clients_for) == {
        "llm-a": "Running", "llm-b": "Running"}
    assert store.require_cluster("llm-b").cluster.status.message == (
        "probe failed (1 of 2 before Failed): health probe failed: connection ssh_fleet has "
        "no private key")


EKS_REQUEST = {"metadata": {"name": "llm-eks"}, "spec": {
    "type": "kubernetes", "provider": "eks", "config": {"eks": {
        "credential": {"airflow_conn_id": "aws"}, "region": "us-east-1",
        "role_arn": "arn:aws:iam::123456789012:role/eks",
        "node_role_arn": "arn:aws:iam::123456789012:role/eks-node",
        "subnet_ids": ["subnet-1", "subnet-2"], "node_pools": []}}}}


@pytest.mark.parametrize("request_, name, deleted_with", [
    (REQUEST, "llm-a", None), (EKS_REQUEST, "llm-eks", "eks")], ids=["static", "eks"])
def test_a_forced_delete_keeps_what_is_left_unless_the_cluster_went_whole(store, request_,
                                                                          name, deleted_with):
    """Force records each item left and ends Deleted because it was asked; a managed cluster's
    delete removes the cluster itself after the teardown, and what was left in it with it."""
    lease = flows.acquire(store, name, "create/1")
    flows.register(store, lease, request_)
    flows.finish(store, lease, Phase.RUNNING, "Created")
    store.release_lease(name, lease.holder, lease.token)
    lease = flows.acquire(store, name, "delete/1")
    left = [f"namespace of {name} still Terminating: finalizers remaining"]
    with pytest.raises(TeardownIncomplete, match='"force": true'):
        flows.teardown_left(store, lease, left, force=False)
    flows.teardown_left(store, lease, left, force=True)
    flows.delete_done(store, lease)

    [gone] = [r for r in store.list_clusters(include_deleted=True) if r.name == name]
    assert gone.phase is Phase.DELETED
    assert [e.message for e in store.events(name) if e.reason == "LeftBehind"] == left * 2
    if deleted_with:
        assert gone.cluster.status.left_behind == []
        assert gone.cluster.status.message.startswith(
            f"every component removed: what was left in it went with the {deleted_with} cluster")
    else:
        assert gone.cluster.status.left_behind == left
        assert gone.cluster.status.message == f"deleted by force; left behind: {left[0]}"
