"""The steps every flow shares, free of Airflow so they can be tested on their own.

Shape of a mutating flow (the DAGs in ``dags/`` wire these as tasks)::

    admit (validate -> acquire lease -> policy pre-check -> first writes, in one task)
        -> backend steps -> finish -> release lease (teardown, runs whatever happened)
        ; watcher

- ``validate`` only reads: a bad request fails here, before any lease or row exists.
- Every write after it carries the lease's fencing token, so a run whose lease was taken over
  can no longer change the cluster.
- A backend step that fails records Failed with its reason before it re-raises; ``release``
  also turns a transient phase this run left behind (the task was killed) into Failed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from airfleet import config, lifecycle, policy
from airfleet.backends import BackendContext, Observation, get_backend
from airfleet.endpoints import EndpointPhase
from airfleet.errors import (
    ClusterUnhealthy,
    Conflict,
    InvalidRequest,
    LeaseHeld,
    NotFound,
    StaleFencingToken,
    TeardownIncomplete,
)
from airfleet.policy import Binding, plan
from airfleet.resources import (
    FLOW_CONF,
    CloudResource,
    Cluster,
    ClusterRequest,
    ClusterStatus,
    Condition,
    NodeStatus,
    Phase,
    Provider,
    format_errors,
    parse_conf,
)
from airfleet.store import ClusterRecord, StatusWrite, Store, now
from airfleet.vault import Vault

log = logging.getLogger(__name__)
T = TypeVar("T")

# Builds the clients a backend needs for a cluster (from Airflow hooks, in the plugin layer).
ClientsFor = Callable[[Cluster], Mapping[str, Any]]


@dataclass(frozen=True)
class LeaseRef:
    """What the lease setup task hands to the others (through XCom): no secret in it."""

    name: str
    holder: str
    token: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "holder": self.holder, "token": self.token}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LeaseRef:
        return cls(data["name"], data["holder"], int(data["token"]))


# ---- validate (read-only) ----------------------------------------------------------------

def validate(action: str, conf: dict[str, Any], store: Store | None = None,
             clients_for: ClientsFor | None = None) -> dict[str, Any]:
    """Parse and check a flow's conf. Returns ``{"name", "request", "actions", "dry_run"}``
    (request: the cluster as JSON, None for delete; actions: what policies will judge).
    With ``clients_for``, the request's credentials must resolve and the backend's
    :meth:`~airfleet.backends.Backend.preflight` pass. Raises :class:`InvalidRequest` (or
    another AirfleetError naming the field) and changes nothing."""
    parsed = parse_conf(FLOW_CONF[action], conf)
    if action == "delete":
        store = store or Store()
        record = store.get_cluster(parsed.name)
        if record is not None:
            get_backend(record.cluster.spec.type)
            _check_no_endpoints(store, parsed.name, force=parsed.force)
        return {"name": parsed.name, "request": None, "force": parsed.force,
                "dry_run": parsed.dry_run,
                "actions": plan.flow_actions("delete", None, None, force=parsed.force)}
    request: ClusterRequest = parsed.cluster
    backend = get_backend(request.spec.type)
    backend.validate(request.spec)
    desired, recorded = request.model_dump(mode="json"), None
    if action == "update":
        record = (store or Store()).get_cluster(request.name)
        if record is None:
            raise InvalidRequest(f"cluster.metadata.name: cluster {request.name} is not "
                                 "registered; create or onboard it first")
        if record.cluster.spec.type != request.spec.type or \
                record.cluster.spec.provider != request.spec.provider:
            raise InvalidRequest("cluster.spec.type: a cluster's type and provider cannot "
                                 "change; delete it and create a new one")
        backend.validate_update(record.cluster, request.spec)
        recorded = record.cluster.model_dump(mode="json", include={"metadata", "spec"})
    if clients_for is not None:
        cluster = Cluster.model_validate(desired)
        backend.preflight(cluster, BackendContext(f"validate/{action}",
                                                  clients=clients_for(cluster), log=log))
    return {"name": request.name, "request": desired, "dry_run": parsed.dry_run,
            "actions": plan.flow_actions(action, desired, recorded)}


# ---- policy pre-check -----------------------------------------------------------------------

def precheck(store: Store, checked: dict[str, Any], *, run: str | None,
             directory: Path | None = None) -> dict[str, Any]:
    """Every bound policy's decision on each action of the run (recorded in the audit trail,
    except in a dry run). Returns ``checked`` with ``decisions`` and ``denied`` added and the
    request as the policies changed it (checked again: a change must still be valid)."""
    name, dry_run = checked["name"], bool(checked.get("dry_run"))
    record = store.get_cluster(name)
    served = store.list_endpoints(cluster=name)
    decisions, changes, bound = [], [], {}
    for action in checked["actions"]:
        kind = action["action"]
        if kind not in bound:  # an update may hold many add_node: read their bindings once
            bound[kind] = store.bindings_for(name, kind)
        request = plan.policy_request(action, checked["request"], name, record, now=now(),
                                      run=run, dry_run=dry_run, endpoints=served)
        decided = policy.decide(bound[kind], kind, request, directory)
        decisions += decided
        if decided[-1].input != action["input"]:
            changes.append((action, decided[-1].input))
    if not dry_run:
        store.record_decisions(name, decisions, run_id=run)
    judged = policy.verdict(decisions)
    request = checked["request"]
    if changes and not judged["denied"]:
        request = _checked_change(plan.apply_inputs(request, changes), decisions)
    return {**checked, **judged, "request": request}


def _checked_change(request: dict[str, Any], decisions: list[policy.Decision],
                    ) -> dict[str, Any]:
    by = ", ".join(sorted({d.policy for d in decisions if d.changed}))
    try:
        cluster = ClusterRequest.model_validate(request)
        get_backend(cluster.spec.type).validate(cluster.spec)
    except (ValidationError, InvalidRequest) as exc:
        reason = format_errors(exc) if isinstance(exc, ValidationError) else str(exc)
        raise InvalidRequest(f"the change policy {by} made is not a valid cluster: "
                             f"{reason}") from None
    return cluster.model_dump(mode="json")


# ---- lease --------------------------------------------------------------------------------

def acquire(store: Store, name: str, holder: str) -> LeaseRef:
    lease = store.acquire_lease(name, holder)
    log.info("lease on cluster %s taken by %s (fencing token %s)", name, holder, lease.token)
    return LeaseRef(name, holder, lease.token)


def release(store: Store, lease: LeaseRef) -> None:
    """Teardown: never leave a transient phase behind, then free the lease."""
    record = store.get_cluster(lease.name)
    if record and record.phase in lifecycle.TRANSIENT and \
            record.cluster.status.last_run_id == lease.holder:
        _set_phase(store, lease, Phase.FAILED, "RunEnded",
                   f"run {lease.holder} ended while the cluster was {record.phase}; "
                   "see that run's task logs")
    if store.release_lease(lease.name, lease.holder, lease.token):
        log.info("lease on cluster %s released by %s", lease.name, lease.holder)
    else:
        log.warning("lease on cluster %s was no longer ours (taken over); nothing to release",
                    lease.name)


def held_by(store: Store, holder: str) -> list[LeaseRef]:
    """The leases ``holder`` (a run) holds now, whatever it managed to tell before it ended:
    the teardown frees them even when the task that took one failed right after."""
    return [LeaseRef(lease.name, holder, lease.token) for lease in store.leases()
            if lease.holder == holder]


ANNOUNCED_PHASES = (Phase.RUNNING, Phase.FAILED, Phase.DELETED)


def ended_in(store: Store, lease: LeaseRef) -> Phase | None:
    """The phase this run left the cluster in, when it is one downstream DAGs hear about
    (Running, Failed, Deleted); None when the run moved it to none of them."""
    moves = [e for e in store.events(lease.name) if e.to_phase]
    if not moves or moves[-1].run_id != lease.holder:
        return None
    phase = Phase(moves[-1].to_phase)
    return phase if phase in ANNOUNCED_PHASES else None


# ---- mutating steps -----------------------------------------------------------------------

# The transient phase each flow shows from its first write on (onboard shows none).
BEGIN = {"create": (Phase.PROVISIONING, "Create"), "update": (Phase.UPDATING, "Update"),
         "delete": (Phase.DELETING, "Delete")}


def admit(action: str, store: Store, lease: LeaseRef, approved: dict[str, Any],
          vault_put: Callable[[str, str], str] | None = None) -> bool:
    """The run's first writes, once it holds the lease and the policies allowed it: record
    the cluster (create, onboard) or the desired spec (update), then show the flow's
    transient phase. Returns False when there is nothing to do (a delete of a cluster that is
    not registered: already gone)."""
    if action in ("create", "onboard"):
        register(store, lease, approved["request"], vault_put)
    elif action == "update":
        record_desired(store, lease, approved["request"], vault_put)
    elif store.get_cluster(lease.name) is None:
        return False
    if action in BEGIN:
        begin(store, lease, *BEGIN[action])
    return True


def register(store: Store, lease: LeaseRef, request: dict[str, Any],
             vault_put: Callable[[str, str], str] | None = None) -> ClusterRecord:
    """Record the cluster (create/onboard): sealed credentials go to the vault first, so the
    store and the history only ever see vault ids."""
    req = ClusterRequest.model_validate(request)
    req = store_sealed_credentials(req, vault_put)
    record, created = store.register_cluster(req, run_id=lease.holder, token=lease.token)
    log.info("cluster %s %s (generation %s)", req.name,
             "registered" if created else "already registered: adopting it", record.generation)
    return record


def record_desired(store: Store, lease: LeaseRef, request: dict[str, Any],
                   vault_put: Callable[[str, str], str] | None = None) -> ClusterRecord:
    """Update flow: record the desired spec (generation grows when it changed)."""
    req = store_sealed_credentials(ClusterRequest.model_validate(request), vault_put)
    return as_holder(lambda: store.update_spec(req, run_id=lease.holder, token=lease.token))


def begin(store: Store, lease: LeaseRef, phase: Phase, reason: str) -> ClusterRecord:
    """Show the transient phase of the flow (Provisioning, Updating, Deleting)."""
    return _set_phase(store, lease, phase, reason, f"{reason} by {lease.holder}")


def run_verb(store: Store, lease: LeaseRef, verb: str, clients_for: ClientsFor | None = None,
             **kwargs: Any) -> Any:
    """Call one backend verb on the recorded cluster. On failure the cluster is recorded
    Failed with the reason, then the error propagates (the task fails)."""
    call = _prepare(store, lease, verb, clients_for, kwargs)
    try:
        result = call()
        if isinstance(result, Observation):
            _record_observation(store, lease, result)
        elif verb == "detect_accelerators":
            _update_status(store, lease, accelerators=result)
    except Exception as exc:
        _set_phase(store, lease, Phase.FAILED, f"{verb.title().replace('_', '')}Failed",
                   f"{verb} failed: {exc}")
        raise
    return result


def probe(store: Store, lease: LeaseRef, verb: str, clients_for: ClientsFor | None = None,
          **kwargs: Any) -> Any:
    """Call a read-only backend verb under the lease and return what it saw, recording
    nothing: a look taken while a wait goes on (the wait's last look is a :func:`run_verb`)."""
    return _prepare(store, lease, verb, clients_for, kwargs)()


def _prepare(store: Store, lease: LeaseRef, verb: str, clients_for: ClientsFor | None,
             kwargs: dict[str, Any]) -> Callable[[], Any]:
    """The backend call of ``verb`` on the recorded cluster, ready to run."""
    # Renewing first keeps the lease alive through a long flow, and stops at once a run
    # whose lease was taken over (StaleFencingToken).
    store.renew_lease(lease.name, lease.holder, lease.token)
    record = store.require_cluster(lease.name)
    method = getattr(get_backend(record.cluster.spec.type), verb)
    ctx = _context(store, lease, clients_for(record.cluster) if clients_for else {})
    return lambda: method(record.cluster, ctx, **kwargs)


def finish(store: Store, lease: LeaseRef, phase: Phase, reason: str,
           message: str = "") -> ClusterRecord:
    """The flow's outcome; marks the recorded spec generation as observed."""
    def write() -> ClusterRecord:
        record = store.require_cluster(lease.name)
        status = record.cluster.status.model_copy(
            update={"phase": phase, "message": message or reason, "observed_at": now()})
        return store.set_status(lease.name, status, reason=reason, run_id=lease.holder,
                                token=lease.token, observed_generation=record.generation,
                                expected_version=record.version)
    return as_holder(write)


MANAGED = (Provider.EKS, Provider.AKS)  # clusters a delete removes whole (deprovision)
FORCE_HINT = ('run the delete again once that is fixed, or with "force": true to record the '
              "cluster Deleted anyway (what is left stays where it is, listed in the cluster's "
              "history, for you to remove)")


def teardown_left(store: Store, lease: LeaseRef, left: list[str], *, force: bool) -> None:
    """After the teardown and its wait: record what is left behind, each item. Not forced,
    something left fails the cluster (:class:`TeardownIncomplete`, naming each item and what
    ``force`` does); forced, the delete goes on and the cluster ends Deleted with the list."""
    if not left:
        return
    for item in left:
        log.warning("cluster %s: left behind: %s", lease.name, item)
        store.record_event(lease.name, "LeftBehind", item, run_id=lease.holder, kind="Warning",
                           token=lease.token)
    if not force:
        _set_phase(store, lease, Phase.FAILED, "TeardownIncomplete",
                   f"left behind: {'; '.join(left)}. {FORCE_HINT[0].upper()}{FORCE_HINT[1:]}")
        raise TeardownIncomplete(f"left behind: {'; '.join(left)}; {FORCE_HINT}")
    log.warning("force: the cluster will be recorded Deleted although %d item(s) remain "
                "(manual cleanup required)", len(left))
    _update_status(store, lease, left_behind=left)


def _check_no_endpoints(store: Store, name: str, *, force: bool) -> None:
    serving = sorted({r.name for r in store.list_endpoints(cluster=name)})
    if serving and not force:
        raise InvalidRequest(
            f"name: cluster {name} serves endpoints {', '.join(serving)}; delete them first "
            '(airfleet_endpoint_delete), or delete with "force": true to remove them with the '
            "cluster")


def delete_done(store: Store, lease: LeaseRef) -> ClusterRecord:
    """Deleted: every component removed, or (forced) what was left named. A managed cluster
    (eks, aks) is gone by now (deprovision ran): what was left in it went with it. The
    endpoints it served (a forced delete) went with it too."""
    cluster = store.require_cluster(lease.name).cluster
    status = cluster.status
    _endpoints_gone(store, lease, status.left_behind)
    if status.kubeconfig_vault_id:  # the cluster is gone, and with it what that opened
        store.delete_secret(status.kubeconfig_vault_id)
    if status.left_behind and cluster.spec.provider in MANAGED:
        _update_status(store, lease, left_behind=[])
        return finish(store, lease, Phase.DELETED, "Deleted", (
            f"every component removed: what was left in it went with the "
            f"{cluster.spec.provider.value} cluster ({'; '.join(status.left_behind)})"))
    if status.left_behind:
        return finish(store, lease, Phase.DELETED, "DeletedByForce",
                      f"deleted by force; left behind: {'; '.join(status.left_behind)}")
    return finish(store, lease, Phase.DELETED, "Deleted", "every component removed")


def _endpoints_gone(store: Store, lease: LeaseRef, left_behind: list[str]) -> None:
    message = f"removed with cluster {lease.name}" + (
        f", which was deleted by force and left behind: {'; '.join(left_behind)}"
        if left_behind else "")

    def gone(name: str, version: str) -> None:
        record = store.require_endpoint(name, version)
        status = record.endpoint.status.model_copy(update={
            "phase": EndpointPhase.DELETED, "message": message, "ready_replicas": 0,
            "observed_at": now()})
        store.set_endpoint_status(name, version, status, reason="ClusterDeleted",
                                  run_id=lease.holder, token=lease.token,
                                  expected_version=record.row_version)

    for record in store.list_endpoints(cluster=lease.name):
        as_holder(partial(gone, record.name, record.version))


def fail(store: Store, lease: LeaseRef, reason: str, message: str) -> ClusterRecord:
    """Record Failed with the reason (a step that failed outside a backend verb)."""
    return _set_phase(store, lease, Phase.FAILED, reason, message)


def note(store: Store, lease: LeaseRef, reason: str, message: str,
         kind: str = "Normal") -> bool:
    """A note in the history of the cluster the run holds, when it is registered (a create's
    is not, before its first writes). Returns whether it was noted."""
    if store.get_cluster(lease.name) is None:
        return False
    store.record_event(lease.name, reason, message, run_id=lease.holder, kind=kind,
                       token=lease.token)
    return True


def note_cleanup(store: Store, lease: LeaseRef, note: str,
                 removed: list[str]) -> ClusterRecord:
    """After a failed create: what the cleanup removed (it leaves ``status.resources``), or
    kept, joins the Failed message."""
    status = store.require_cluster(lease.name).cluster.status
    store.record_event(lease.name, "CleanupAfterFailure", note, run_id=lease.holder,
                       kind="Normal", token=lease.token)
    return _update_status(store, lease, message=f"{status.message}; {note}",
                          resources=[r for r in status.resources if r.name not in removed])


def created_by_run(store: Store, lease: LeaseRef) -> list[str]:
    """The cloud resources this run created (not those it adopted), as recorded."""
    record = store.get_cluster(lease.name)
    return [r.name for r in (record.cluster.status.resources if record else [])
            if r.created_by == lease.holder]


# ---- health (no lease) --------------------------------------------------------------------

# A Running cluster turns Failed only after this many failed probes in a row, so one missed
# probe of a flapping node does not flip it (a probe runs every 5 minutes: Failed within 10).
# One good probe brings a Failed cluster back to Running.
FAILED_PROBES_TO_FAIL = 2


def in_shard(name: str, shard: tuple[int, int]) -> bool:
    """Whether cluster ``name`` is in part ``shard = (index, parts)`` of the fleet. crc32, not
    ``hash()``: every process (each part runs in its own) must split the fleet the same way,
    so each cluster is in exactly one part."""
    index, parts = shard
    return zlib.crc32(name.encode()) % parts == index


def health_check(store: Store, run_id: str, names: list[str] | None = None,
                 clients_for: ClientsFor | None = None, *, concurrency: int | None = None,
                 timeout: float | None = None,
                 shard: tuple[int, int] = (0, 1)) -> dict[str, str]:
    """Probe every managed cluster (or ``names``) of part ``shard`` (see :func:`in_shard`)
    concurrently and apply Running <-> Failed.

    At most ``concurrency`` probes run at once, each for at most ``timeout`` seconds (a probe
    still running then is a failed check), and each status is written as its probe ends, so
    a slow cluster delays no other. Clusters held by a running flow or in a transient phase are
    skipped; an observation older than the recorded status never overwrites it. Returns
    ``{name: outcome}``."""
    index, parts = shard
    if not 0 <= index < parts:
        raise ValueError(f"shard {shard}: the index must be from 0 to parts - 1")
    wanted = {n for n in names or [] if in_shard(n, shard)}
    records = store.list_clusters(
        where_name=lambda name: (not names or name in wanted) and in_shard(name, shard))
    leases = {lease.name: lease for lease in store.leases()}
    suites = _bindings_of(store, "check_stability")
    # What lives already (the records: 10,000 clusters are a few hundred thousand objects)
    # is left out of the collector's full passes while the probes allocate: those passes
    # scan every live object each time and cost a third of a large fleet's CPU otherwise.
    gc.freeze()
    try:
        outcomes = asyncio.run(_check_all(
            store, records, leases, suites, run_id, clients_for,
            concurrency or config.health_concurrency(), timeout or config.health_timeout()))
    finally:
        gc.unfreeze()
    for missing in sorted(wanted - set(outcomes)):
        outcomes[missing] = "not registered"
    return outcomes


async def _check_all(store: Store, records: list[ClusterRecord], leases: dict[str, Any],
                     suites: Callable[[str], list[Binding]], run_id: str,
                     clients_for: ClientsFor | None, concurrency: int,
                     timeout: float) -> dict[str, str]:
    # asyncio's own pool has min(32, cpus + 4) threads (6 here): sync probes (the default
    # health_async) and clients_for would queue behind each other and time out waiting.
    # A sync probe past its timeout keeps its thread until its call returns.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(concurrency, thread_name_prefix="airfleet-health"))
    outcomes: dict[str, str] = {}
    writes, queue = _ProbeWrites(store, run_id, outcomes), iter(records)

    async def prober() -> None:
        # ``concurrency`` of these, each taking the next cluster when done with one: as many
        # tasks as slots, not one per cluster (10,000 waiting tasks cost memory and GC time).
        for record in queue:
            skipped = _skip_reason(record, leases.get(record.name))
            if skipped:
                outcomes[record.name] = skipped
                continue
            started = now()
            seen = await _probe(record, run_id, clients_for, timeout)
            status, flipped = await _judged(suites(record.name), record,
                                            _probed_status(record, seen, started), run_id)
            writes.add(record, status, flipped)  # not awaited: the next probe starts now

    await asyncio.gather(*(prober() for _ in range(min(concurrency, len(records)))))
    await writes.finished()
    return outcomes


class _ProbeWrites:
    """Probe results written in groups (group commit): a status that arrives while a write is
    in progress waits for it and goes with the others that arrived meanwhile, in one
    transaction (:meth:`Store.set_statuses`), off the event loop. So a status is written one
    write after its probe ends, never later, a slow cluster delays no other, and a fleet
    pays one commit per group instead of one per cluster (with SQLite, each commit syncs its
    file). Outcomes go into ``outcomes``; :meth:`finished` raises the first error."""

    MAX_GROUP = 500  # rows in one transaction: bounds how long the writer holds the lock

    def __init__(self, store: Store, run_id: str, outcomes: dict[str, str]):
        self.store, self.run_id, self.outcomes = store, run_id, outcomes
        self.pending: list[tuple[ClusterRecord, ClusterStatus, Condition | None]] = []
        self.errors: list[Exception] = []
        self.writer: asyncio.Task | None = None

    def add(self, record: ClusterRecord, status: ClusterStatus,
            flipped: Condition | None) -> None:
        self.pending.append((record, status, flipped))
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self._drain())

    async def finished(self) -> None:
        if self.writer is not None:
            await self.writer
        if self.errors:
            raise self.errors[0]

    async def _drain(self) -> None:
        while self.pending:
            group = self.pending[:self.MAX_GROUP]
            del self.pending[:self.MAX_GROUP]
            try:
                # Off the loop: probes go on while the database writes and syncs.
                outcomes = await asyncio.to_thread(self._write, group)
            except Exception as exc:  # noqa: BLE001 - health_check raises it when done
                self.errors.append(exc)
                continue
            for (record, *_), outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    self.errors.append(outcome)
                else:
                    self.outcomes[record.name] = outcome

    def _write(self, group: list[tuple[ClusterRecord, ClusterStatus, Condition | None]],
               ) -> list[str | Exception]:
        results = self.store.set_statuses(
            [StatusWrite(record.name, status, record.version) for record, status, *_ in group],
            reason="HealthCheck", run_id=self.run_id, only_if_newer=True)
        outcomes: list[str | Exception] = []
        for (record, status, flipped), result in zip(group, results, strict=True):
            try:  # one cluster's error does not stop the others' outcomes
                outcomes.append(_probe_outcome(self.store, record, status, flipped, result,
                                               self.run_id))
            except Exception as exc:  # noqa: BLE001 - raised by the check that waits for it
                outcomes.append(exc)
        return outcomes


def _skip_reason(record: ClusterRecord, lease: Any) -> str | None:
    if record.phase in lifecycle.TRANSIENT or record.phase is Phase.PENDING:
        return f"skipped: {record.phase}"
    if lease is not None and lease.held:
        return f"skipped: held by {lease.holder}"
    return None


async def _probe(record: ClusterRecord, run_id: str, clients_for: ClientsFor | None,
                 timeout: float) -> Observation:
    """One cluster's probe, read-only; a probe that breaks or overruns is a failed check."""
    async def observe() -> Observation:
        clients = await asyncio.to_thread(clients_for, record.cluster) if clients_for else {}
        ctx = BackendContext(run_id, clients=clients)
        return await get_backend(record.cluster.spec.type).health_async(record.cluster, ctx)

    try:
        return await asyncio.wait_for(observe(), timeout)
    except TimeoutError:
        return Observation(healthy=False, message=f"health probe timed out after {timeout:g}s")
    except Exception as exc:  # a probe that breaks is a failed check, not a failed run
        return Observation(healthy=False, message=f"health probe failed: {exc}")


def _probed_status(record: ClusterRecord, seen: Observation, started: datetime,
                   ) -> ClusterStatus:
    phase, misses, message = _verdict(record, seen)
    return record.cluster.status.model_copy(update={
        "phase": phase, "message": message, "observed_at": started, "failed_probes": misses,
        "health_checked_at": started,
        "nodes": seen.nodes or record.cluster.status.nodes,
        "conditions": _keep_stable(seen.conditions or record.cluster.status.conditions,
                                   record.cluster.status)})


async def _judged(suite: list[Binding], record: ClusterRecord, status: ClusterStatus,
                  run_id: str) -> tuple[ClusterStatus, Condition | None]:
    """:func:`_with_stability` off the event loop (a suite's policies may run in
    subprocesses), and without a thread hop when no suite is bound."""
    if not suite:
        return status, None
    return await asyncio.to_thread(_with_stability, suite, record, status, run_id)


def _probe_outcome(store: Store, record: ClusterRecord, status: ClusterStatus,
                   flipped: Condition | None, result: bool | Exception, run_id: str) -> str:
    """What writing one probe's status came to (``result``: from :meth:`Store.set_statuses`)."""
    if isinstance(result, Conflict):  # a flow wrote meanwhile: its status is newer
        return "skipped: changed while probing"
    if isinstance(result, NotFound):  # deleted meanwhile (its lease was free when we looked)
        return "skipped: deleted while probing"
    if isinstance(result, Exception):
        raise result
    if result and flipped:
        _record_stability(store, record.name, flipped, run_id)
    return status.phase.value if result else "skipped: a newer status is recorded"


def _bindings_of(store: Store, action: str) -> Callable[[str], list[Binding]]:
    """``store.bindings_for(name, action)`` for every cluster, from one read of the store."""
    scopes: dict[str | None, list[Binding]] = {}
    for binding in store.bindings(every_scope=True):
        if binding.action == action:
            scopes.setdefault(binding.cluster, []).append(binding)
    return lambda name: scopes.get(name) or scopes.get(None, [])


# ---- stability ----------------------------------------------------------------------------

STABLE = "Stable"


def check_stability(store: Store, name: str, *, run_id: str | None = None) -> Condition:
    """Evaluate ``name``'s stability suite now, on its recorded health data ("run now"), and
    write the Stable condition. Raises :class:`InvalidRequest` when no suite is bound."""
    record = store.require_cluster(name)
    suite = store.bindings_for(name, "check_stability")
    if not suite:
        raise InvalidRequest(f"cluster {name}: no stability suite is bound; run "
                             f"`airfleet stability enable {name}` first")
    status, flipped = _with_stability(suite, record, record.cluster.status, run_id, due=True)
    condition = _stable(status)
    store.set_status(name, status, reason="StabilityCheck", run_id=run_id,
                     expected_version=record.version)
    if flipped:
        _record_stability(store, name, flipped, run_id)
    return condition


def _with_stability(bindings: list[Binding], record: ClusterRecord, status: ClusterStatus,
                    run_id: str | None, *, due: bool = False,
                    ) -> tuple[ClusterStatus, Condition | None]:
    """``status`` with a fresh Stable condition when a suite (``bindings``) is bound and its
    interval has passed (``due``: now anyway), and that condition when the verdict changed."""
    previous, at = _stable(status), now()
    if not bindings:
        return status, None
    interval = max(float(b.params.get("interval_seconds", 0)) for b in bindings)
    if not due and previous is not None and previous.last_probe_time is not None and \
            (at - previous.last_probe_time).total_seconds() < interval:
        return status, None
    observed = replace(record, cluster=record.cluster.model_copy(update={"status": status}))
    request = plan.policy_request({"action": "check_stability", "input": {}}, None,
                                  record.name, observed, now=at, run=run_id, dry_run=False)
    decisions = policy.decide(bindings, "check_stability", request)
    stable = all(d.allowed for d in decisions)
    message = "; ".join(d.reason for d in decisions if not d.allowed) or \
        "; ".join(d.reason for d in decisions)
    changed = previous is None or (previous.status == "True") != stable
    condition = Condition(
        type=STABLE, status="True" if stable else "False",
        reason="ExpectationsMet" if stable else "ExpectationsFailed", message=message,
        last_transition_time=at if changed else previous.last_transition_time,
        last_probe_time=at)
    conditions = [c for c in status.conditions if c.type != STABLE] + [condition]
    return status.model_copy(update={"conditions": conditions}), condition if changed else None


def _stable(status: ClusterStatus) -> Condition | None:
    return next((c for c in status.conditions if c.type == STABLE), None)


def _keep_stable(conditions: list[Condition], recorded: ClusterStatus) -> list[Condition]:
    """A probe's conditions replace the backend's own; the Stable condition is ours."""
    previous = _stable(recorded)
    return [c for c in conditions if c.type != STABLE] + ([previous] if previous else [])


def _record_stability(store: Store, name: str, condition: Condition,
                      run_id: str | None) -> None:
    stable = condition.status == "True"
    store.record_event(name, "Stable" if stable else "Unstable", condition.message,
                       run_id=run_id, kind="Normal" if stable else "Warning")


def _verdict(record: ClusterRecord, seen: Observation) -> tuple[Phase, int, str]:
    """The phase a probe leads to, the failed probes in a row, and the message to record."""
    if seen.healthy:
        return Phase.RUNNING, 0, seen.message
    misses = record.cluster.status.failed_probes + 1
    if record.phase is Phase.RUNNING and misses < FAILED_PROBES_TO_FAIL:
        return Phase.RUNNING, misses, (f"probe failed ({misses} of {FAILED_PROBES_TO_FAIL} "
                                       f"before Failed): {seen.message}")
    return Phase.FAILED, misses, seen.message


# ---- helpers ------------------------------------------------------------------------------

def store_sealed_credentials(request: ClusterRequest,
                             vault_put: Callable[[str, str], str] | None) -> ClusterRequest:
    """Replace every ``{"sealed": ...}`` reference with the vault id it is stored under."""
    data = request.model_dump(mode="json")
    found = False

    def walk(node: Any, path: str) -> Any:
        nonlocal found
        if isinstance(node, dict):
            if node.get("sealed"):
                found = True
                if vault_put is None:
                    raise InvalidRequest(f"{path}: sealed credentials need the vault")
                return {"airflow_conn_id": None, "vault_id": vault_put(node["sealed"], path),
                        "sealed": None}
            return {k: walk(v, f"{path}.{k}") for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        return node

    data = walk(data, "cluster")
    return ClusterRequest.model_validate(data) if found else request


def _context(store: Store, lease: LeaseRef, clients: Mapping[str, Any]) -> BackendContext:
    def report_node(node: NodeStatus) -> None:
        node = node.model_copy(update={"observed_at": node.observed_at or now()})
        record = store.require_cluster(lease.name)
        nodes = [n for n in record.cluster.status.nodes if n.name != node.name] + [node]
        _update_status(store, lease, nodes=nodes)

    def record_event(reason: str, message: str, kind: str) -> None:
        store.record_event(lease.name, reason, message, run_id=lease.holder, kind=kind,
                           token=lease.token)

    def record_resource(what: str, created: bool) -> None:
        # A create means it did not exist: this run is its creator, whatever was recorded
        # before (a resource an earlier cleanup removed). Found again: nothing new.
        status = store.require_cluster(lease.name).cluster.status
        if not created and any(r.name == what for r in status.resources):
            return
        entry = CloudResource(name=what, created_by=lease.holder if created else None,
                              observed_at=now())
        others = [r for r in status.resources if r.name != what]
        _update_status(store, lease, resources=[*others, entry])
        record_event("ResourceCreated" if created else "ResourceAdopted", what, "Normal")

    def store_kubeconfig(kubeconfig: bytes) -> None:
        vault = Vault(store, config.keys_dir())
        old = store.require_cluster(lease.name).cluster.status.kubeconfig_vault_id
        new = vault.put(kubeconfig, f"kubeconfig of cluster {lease.name}")
        _update_status(store, lease, kubeconfig_vault_id=new)
        if old:
            store.delete_secret(old)

    def progress(message: str) -> None:
        log.info("cluster %s: %s", lease.name, message)
        _update_status(store, lease, message=message)

    return BackendContext(run_id=lease.holder, clients=clients, report_node=report_node,
                          record_event=record_event, record_resource=record_resource,
                          store_kubeconfig=store_kubeconfig, progress=progress)


def _record_observation(store: Store, lease: LeaseRef, seen: Observation) -> None:
    changes: dict[str, Any] = {"message": seen.message}
    if seen.nodes:
        t = now()
        changes["nodes"] = [n if n.observed_at else n.model_copy(update={"observed_at": t})
                            for n in seen.nodes]
    if seen.accelerators:
        changes["accelerators"] = seen.accelerators
    if seen.conditions:
        changes["conditions"] = seen.conditions
    _update_status(store, lease, **changes)
    if not seen.healthy:
        raise ClusterUnhealthy(seen.message or "the backend reported the cluster unhealthy")


def _update_status(store: Store, lease: LeaseRef, **changes: Any) -> ClusterRecord:
    def write() -> ClusterRecord:
        record = store.require_cluster(lease.name)
        status = record.cluster.status.model_copy(update={**changes, "observed_at": now()})
        return store.set_status(lease.name, status, reason="Progress", run_id=lease.holder,
                                token=lease.token, expected_version=record.version)
    return as_holder(write)


def _set_phase(store: Store, lease: LeaseRef, phase: Phase, reason: str,
               message: str) -> ClusterRecord:
    return as_holder(lambda: store.transition(lease.name, phase, reason=reason,
                                              message=message, run_id=lease.holder,
                                              token=lease.token))


HOLDER_WRITE_ATTEMPTS = 5


def as_holder(write: Callable[[], T]) -> T:
    """A lease holder's read-then-write of its cluster (or of an endpoint on it), read and
    written again when it lost the race to a writer without the lease (a health check, or a
    stability check run now): such a writer may write a status between the holder's read and
    its write (a version conflict), and failing the run for that would fail an update because
    the fleet was being checked. Another run cannot be the writer: the lease keeps it out, and
    a holder whose lease was taken over is still refused (StaleFencingToken, never retried)."""
    for attempt in range(2, HOLDER_WRITE_ATTEMPTS + 1):
        try:
            return write()
        except (LeaseHeld, StaleFencingToken):
            raise
        except Conflict:
            log.info("written meanwhile without the lease (a health or stability check): "
                     "reading it again (attempt %d)", attempt)
    return write()
