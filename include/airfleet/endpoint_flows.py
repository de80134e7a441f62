"""The steps of the endpoint flows (deploy, scale, delete), free of Airflow.

Shape, as for clusters (airfleet.flows)::

    validate -> lease of the endpoint's *cluster* -> policy pre-check -> record
             -> backend (deploy_endpoint | delete_endpoint) -> wait for the engine -> finish
             -> release the lease (teardown)

An endpoint flow holds its cluster's lease, so it never races a cluster update or delete.
``validate`` only reads: a bad request fails there, before any lease or row exists. A deploy
sets the weight of its version; the endpoint's other versions share the rest
(:func:`airfleet.endpoints.rebalanced`), recorded and handed to the router in the same step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from typing import Any

from airfleet import config, policy
from airfleet.backends import BackendContext, EndpointObservation, get_backend
from airfleet.endpoints import (
    ENDPOINT_CONF,
    DeployConf,
    EndpointDeleteConf,
    EndpointPhase,
    EndpointRequest,
    EndpointStatus,
    EndpointVersion,
    ScaleConf,
    check_placement,
    rebalanced,
)
from airfleet.errors import InvalidRequest
from airfleet.flows import LeaseRef, as_holder
from airfleet.policy import plan
from airfleet.resources import Cluster, parse_conf
from airfleet.store import EndpointRecord, Store, now

log = logging.getLogger(__name__)

ClientsFor = Callable[[Cluster], Mapping[str, Any]]
ACTIONS = {"endpoint_deploy": "deploy_endpoint", "endpoint_scale": "scale_endpoint",
           "endpoint_delete": "delete_endpoint"}


# ---- validate (read-only) -------------------------------------------------------------------

def validate(flow: str, conf: dict[str, Any], store: Store) -> dict[str, Any]:
    """Parse and check an endpoint flow's conf against the store. Returns ``{"name",
    "cluster", "flow", "versions": {version: endpoint JSON, as it will be recorded},
    "deleting": [versions], "actions", "dry_run"}``; ``cluster`` None when a delete finds
    nothing to delete. Raises :class:`InvalidRequest` naming the field; changes nothing."""
    parsed = parse_conf(ENDPOINT_CONF[flow], conf)
    if isinstance(parsed, DeployConf):
        return _validate_deploy(parsed, store)
    if isinstance(parsed, ScaleConf):
        return _validate_scale(parsed, store)
    return _validate_delete(parsed, store)


def _validate_deploy(parsed: DeployConf, store: Store) -> dict[str, Any]:
    request = parsed.endpoint
    spec, name = request.spec, request.name
    existing = {r.version: r for r in store.endpoint_versions(name)}
    elsewhere = [r.cluster for r in existing.values() if r.cluster != spec.cluster]
    if elsewhere:
        raise InvalidRequest(
            f"endpoint.spec.cluster: endpoint {name} runs on cluster {elsewhere[0]}; all its "
            "versions share one cluster (delete it there first, or use another name)")
    served = {r.endpoint.spec.model.served for v, r in existing.items() if v != spec.version}
    if served and served != {spec.model.served}:
        raise InvalidRequest(
            f"endpoint.spec.model.served_name: the endpoint's other versions serve "
            f"{sorted(served)[0]!r}, and versions split one model's traffic; serve the same "
            "name, or deploy a new endpoint")
    for other in store.list_endpoints(cluster=spec.cluster):
        if other.name != name and other.endpoint.spec.model.served == spec.model.served:
            raise InvalidRequest(
                f"endpoint.spec.model.served_name: endpoint {other.name} already serves "
                f"{spec.model.served!r} on cluster {spec.cluster}; clients could not tell the "
                "two apart: give this one another served_name, or deploy it as a version of "
                f"{other.name}")
    cluster = store.get_cluster(spec.cluster)
    others = [r.endpoint for r in store.list_endpoints(cluster=spec.cluster)
              if (r.name, r.version) != (name, spec.version)]
    check_placement(spec, cluster.cluster if cluster else None, others)
    get_backend(cluster.cluster.spec.type).validate_endpoint(cluster.cluster, spec)
    weights = rebalanced({v: r.endpoint.spec.traffic_weight for v, r in existing.items()},
                         spec.version, spec.traffic_weight)
    versions = {v: _with(r.endpoint, traffic_weight=weights[v]) for v, r in existing.items()}
    versions[spec.version] = {"metadata": request.metadata.model_dump(mode="json"),
                              "spec": spec.model_dump(mode="json")}
    action = {"action": "deploy_endpoint", "input": {
        "endpoint": {"name": name, **versions[spec.version]}, "weights": weights,
        "created": spec.version not in existing}}
    return _checked("endpoint_deploy", name, spec.cluster, versions, [], [action],
                    parsed.dry_run, target=spec.version)


def _validate_scale(parsed: ScaleConf, store: Store) -> dict[str, Any]:
    record = _one_version(store, parsed.name, parsed.version)
    spec = record.endpoint.spec.model_copy(update={"replicas": parsed.replicas})
    cluster = store.get_cluster(record.cluster)
    others = [r.endpoint for r in store.list_endpoints(cluster=record.cluster)
              if (r.name, r.version) != (record.name, record.version)]
    try:
        check_placement(spec, cluster.cluster if cluster else None, others)
    except InvalidRequest as exc:  # the conf names replicas, not endpoint.spec.replicas
        raise InvalidRequest(str(exc).replace("endpoint.spec.replicas", "replicas")) from None
    versions = {r.version: _with(r.endpoint) for r in store.endpoint_versions(parsed.name)}
    versions[record.version]["spec"]["replicas"] = parsed.replicas
    action = {"action": "scale_endpoint", "input": {
        "name": parsed.name, "version": record.version,
        "from": record.endpoint.spec.replicas, "to": parsed.replicas}}
    return _checked("endpoint_scale", parsed.name, record.cluster, versions, [], [action],
                    parsed.dry_run, target=record.version)


def _validate_delete(parsed: EndpointDeleteConf, store: Store) -> dict[str, Any]:
    existing = {r.version: r for r in store.endpoint_versions(parsed.name)}
    doomed = [parsed.version] if parsed.version else sorted(existing)
    doomed = [v for v in doomed if v in existing]
    if not doomed:  # already gone: done (the run's note says so)
        return _checked("endpoint_delete", parsed.name, None, {}, [], [], parsed.dry_run)
    cluster = next(iter(existing.values())).cluster
    kept = {v: r.endpoint.spec.traffic_weight for v, r in existing.items() if v not in doomed}
    weights = _shared(kept)
    versions = {v: _with(existing[v].endpoint, traffic_weight=w) for v, w in weights.items()}
    action = {"action": "delete_endpoint", "input": {
        "name": parsed.name, "versions": doomed, "weights_after": weights}}
    return _checked("endpoint_delete", parsed.name, cluster, versions, doomed, [action],
                    parsed.dry_run)


def _shared(weights: dict[str, int]) -> dict[str, int]:
    """What is left of the weights once some versions go: scaled back to 100."""
    if not weights:
        return {}
    first = sorted(weights)[0]
    rest = {v: w for v, w in weights.items() if v != first}
    total = sum(weights.values())
    share = round(100 * weights[first] / total) if total else round(100 / len(weights))
    return rebalanced(rest, first, min(share, 100)) if rest else {first: 100}


def _one_version(store: Store, name: str, version: str | None) -> EndpointRecord:
    versions = store.endpoint_versions(name)
    if not versions:
        raise InvalidRequest(f"name: endpoint {name} is not registered; deploy it first "
                             "(airfleet_endpoint_deploy)")
    if version is None:
        if len(versions) > 1:
            raise InvalidRequest(f"version: endpoint {name} has versions "
                                 f"{', '.join(r.version for r in versions)}; say which to scale")
        return versions[0]
    record = next((r for r in versions if r.version == version), None)
    if record is None:
        raise InvalidRequest(f"version: endpoint {name} has no version {version} (it has "
                             f"{', '.join(r.version for r in versions)})")
    return record


def _with(endpoint: EndpointVersion, **spec: Any) -> dict[str, Any]:
    data = endpoint.model_dump(mode="json", include={"metadata", "spec"})
    data["spec"].update(spec)
    return data


def _checked(flow: str, name: str, cluster: str | None, versions: dict[str, Any],
             deleting: list[str], actions: list[dict[str, Any]], dry_run: bool, *,
             target: str | None = None) -> dict[str, Any]:
    return {"flow": flow, "name": name, "cluster": cluster, "versions": versions,
            "target": target, "deleting": deleting, "actions": actions, "dry_run": dry_run}


# ---- policy pre-check -----------------------------------------------------------------------

def precheck(store: Store, checked: dict[str, Any], *, run: str | None) -> dict[str, Any]:
    """Every bound policy's decision on the run's action, with the cluster as context
    (recorded in the audit trail, except in a dry run). An endpoint's request is judged, not
    rewritten: a policy that changes it is refused, naming the policy."""
    cluster, dry_run = checked["cluster"], bool(checked["dry_run"])
    record = store.get_cluster(cluster) if cluster else None
    served = store.list_endpoints(cluster=cluster) if cluster else []
    decisions = []
    for action in checked["actions"]:
        request = plan.policy_request(action, None, cluster, record, now=now(), run=run,
                                      dry_run=dry_run, endpoints=served)
        decided = policy.decide(store.bindings_for(cluster, action["action"]),
                                action["action"], request)
        changed = [d.policy for d in decided if d.changed]
        if changed:
            raise InvalidRequest(f"policy {', '.join(changed)} changed the {action['action']} "
                                 "request; endpoint policies may allow or deny, not change")
        decisions += decided
    if decisions and not dry_run:
        store.record_decisions(cluster, decisions, run_id=run)
    return {**checked, **policy.verdict(decisions)}


# ---- mutating steps -------------------------------------------------------------------------

def record(store: Store, lease: LeaseRef, checked: dict[str, Any]) -> None:
    """Record the versions' desired specs (a deploy's new or changed version, a scale's
    replicas, the weights a rebalance gave the others) and show Deploying on the version the
    run deploys."""
    for version, data in checked["versions"].items():
        request = EndpointRequest.model_validate(data)
        current = store.get_endpoint(checked["name"], version)
        if current is None or version == checked["target"]:
            as_holder(partial(store.put_endpoint, request, run_id=lease.holder,
                              token=lease.token))
        elif current.endpoint.spec.traffic_weight != request.spec.traffic_weight:
            _shift_weight(store, lease, current, request.spec.traffic_weight)
    if checked["target"]:
        _phase(store, lease, checked["name"], checked["target"], EndpointPhase.DEPLOYING,
               "Deploying", f"{checked['flow'].removeprefix('endpoint_')} by {lease.holder}")


def _shift_weight(store: Store, lease: LeaseRef, current: EndpointRecord, weight: int) -> None:
    as_holder(lambda: store.set_endpoint_spec(
        current.name, current.version, {"traffic_weight": weight}, reason="TrafficShifted",
        message=f"weight {current.endpoint.spec.traffic_weight} -> {weight}",
        run_id=lease.holder, token=lease.token))


def deploy(store: Store, lease: LeaseRef, checked: dict[str, Any],
           clients_for: ClientsFor | None = None) -> None:
    """Hand the target version, and the weights of every endpoint version on the cluster (the
    router's routes), to the backend; Failed (with the reason) when it refuses."""
    cluster, ctx = _cluster_and_context(store, lease, clients_for)
    target = store.require_endpoint(checked["name"], checked["target"]).endpoint
    routed = [r.endpoint for r in store.list_endpoints(cluster=cluster.name)]
    try:
        get_backend(cluster.spec.type).deploy_endpoint(cluster, target, routed, ctx)
    except Exception as exc:
        _phase(store, lease, checked["name"], checked["target"], EndpointPhase.FAILED,
               "DeployFailed", f"deploy failed: {exc}")
        raise


def look(store: Store, lease: LeaseRef, name: str, version: str,
         clients_for: ClientsFor | None = None) -> EndpointObservation:
    """Read-only: whether the version's engines are ready (renews the lease first)."""
    store.renew_lease(lease.name, lease.holder, lease.token)
    cluster, ctx = _cluster_and_context(store, lease, clients_for)
    endpoint = store.require_endpoint(name, version).endpoint
    return get_backend(cluster.spec.type).endpoint_ready(cluster, endpoint, ctx)


def ready_timeout(store: Store, lease: LeaseRef) -> float:
    cluster = store.require_cluster(lease.name).cluster
    return get_backend(cluster.spec.type).endpoint_ready_timeout(cluster)


def finish(store: Store, lease: LeaseRef, name: str, version: str,
           seen: EndpointObservation) -> None:
    """The deploy's outcome from the last look: Running with the ready replicas and URL, or
    Failed with what was not ready."""
    def write() -> None:
        record_ = store.require_endpoint(name, version)
        phase = EndpointPhase.RUNNING if seen.healthy else EndpointPhase.FAILED
        store.set_endpoint_status(name, version, _observed(record_, phase, seen),
                                  reason="Ready" if seen.healthy else "NotReady",
                                  run_id=lease.holder, token=lease.token,
                                  expected_version=record_.row_version,
                                  observed_generation=record_.generation)

    as_holder(write)


def delete(store: Store, lease: LeaseRef, checked: dict[str, Any],
           clients_for: ClientsFor | None = None) -> list[str]:
    """Remove the doomed versions from the cluster and give their traffic to the versions that
    stay; returns what could not be removed (the versions stay recorded, Failed)."""
    cluster, ctx = _cluster_and_context(store, lease, clients_for)
    doomed = [store.require_endpoint(checked["name"], v).endpoint for v in checked["deleting"]]
    record(store, lease, {**checked, "target": None})
    remaining = [r.endpoint for r in store.list_endpoints(cluster=cluster.name)
                 if (r.name, r.version) not in {(checked["name"], v) for v in checked["deleting"]}]
    left = get_backend(cluster.spec.type).delete_endpoint(cluster, doomed, remaining, ctx)
    for endpoint in doomed:
        mine = [item for item in left if endpoint.spec.version in item]
        version = endpoint.spec.version
        if mine:
            _phase(store, lease, checked["name"], version, EndpointPhase.FAILED,
                   "DeleteIncomplete", f"left behind: {'; '.join(mine)}")
        else:
            _phase(store, lease, checked["name"], version, EndpointPhase.DELETED, "Deleted",
                   "engine removed; verified gone")
    return left


def release(store: Store, lease: LeaseRef, checked: dict[str, Any]) -> dict[str, str]:
    """Before the lease goes: a version this run left Deploying (its task was killed) is
    Failed. Returns the phase this run left each version in, from its own history."""
    target = checked.get("target")
    current = store.get_endpoint(checked["name"], target) if target else None
    if current is not None and current.phase is EndpointPhase.DEPLOYING and \
            current.endpoint.status.last_run_id == lease.holder:
        _phase(store, lease, checked["name"], target, EndpointPhase.FAILED, "RunEnded",
               f"run {lease.holder} ended while the version was Deploying; see its task logs")
    ended: dict[str, str] = {}
    for event in store.run_endpoint_events(lease.holder):
        if event.endpoint == checked["name"] and event.to_phase in ANNOUNCED:
            ended[event.version] = event.to_phase
        elif event.endpoint == checked["name"] and event.to_phase:
            ended.pop(event.version, None)
    return ended


ANNOUNCED = ("Running", "Failed", "Deleted")


# ---- health (no lease) ------------------------------------------------------------------------

def probe_all(store: Store, run_id: str, clients_for: ClientsFor | None = None,
              names: list[str] | None = None, *, concurrency: int | None = None,
              timeout: float | None = None) -> dict[str, str]:
    """Look at every Running or Failed endpoint version (or those of ``names``, endpoints or
    clusters) concurrently, as the cluster health check does (at most ``concurrency`` at
    once, each for at most ``timeout`` seconds), and apply Running <-> Failed. Ready replicas
    are what the engines' own ``/health`` says: Kubernetes' readiness probes and Serve's
    health checks call it. Versions whose cluster is held by a flow are skipped (the flow
    writes their status). Returns ``{"<name>/<version>": outcome}``."""
    records = [r for r in store.list_endpoints()
               if not names or r.cluster in names or r.name in names]
    clusters = {r.name: r.cluster for r in store.list_clusters()}
    leases = {lease.name: lease for lease in store.leases()}
    return asyncio.run(_probe_all(
        store, records, clusters, leases, run_id, clients_for,
        concurrency or config.health_concurrency(), timeout or config.health_timeout()))


async def _probe_all(store: Store, records: list[EndpointRecord], clusters: dict[str, Cluster],
                     leases: dict[str, Any], run_id: str, clients_for: ClientsFor | None,
                     concurrency: int, timeout: float) -> dict[str, str]:
    # Probes are sync calls: a pool the size of the concurrency (asyncio's own has 6 threads).
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(concurrency, thread_name_prefix="airfleet-endpoint-health"))
    slots, outcomes = asyncio.Semaphore(concurrency), {}

    async def check(record_: EndpointRecord) -> None:
        key = f"{record_.name}/{record_.version}"
        lease = leases.get(record_.cluster)
        if lease is not None and lease.held:
            outcomes[key] = f"skipped: cluster held by {lease.holder}"
        elif record_.phase not in (EndpointPhase.RUNNING, EndpointPhase.FAILED):
            outcomes[key] = f"skipped: {record_.phase.value}"
        elif record_.cluster not in clusters:
            outcomes[key] = f"skipped: cluster {record_.cluster} is not registered"
        else:
            async with slots:
                started = now()
                seen = await _probe(clusters[record_.cluster], record_, run_id, clients_for,
                                    timeout)
                outcomes[key] = _write_probe(store, record_, seen, started, run_id)

    await asyncio.gather(*(check(r) for r in records))
    return outcomes


async def _probe(cluster: Cluster, record_: EndpointRecord, run_id: str,
                 clients_for: ClientsFor | None, timeout: float) -> EndpointObservation:
    """One endpoint version's probe, read-only; one that breaks or overruns is a failed
    check, not a failed run."""
    def observe() -> EndpointObservation:
        ctx = BackendContext(run_id, clients=clients_for(cluster) if clients_for else {},
                             log=log)
        return get_backend(cluster.spec.type).endpoint_ready(cluster, record_.endpoint, ctx)

    try:
        return await asyncio.wait_for(asyncio.to_thread(observe), timeout)
    except TimeoutError:
        return EndpointObservation(False, f"endpoint probe timed out after {timeout:g}s")
    except Exception as exc:
        return EndpointObservation(False, f"endpoint probe failed: {exc}")


def _write_probe(store: Store, record_: EndpointRecord, seen: EndpointObservation,
                 started: datetime, run_id: str) -> str:
    phase = EndpointPhase.RUNNING if seen.healthy else EndpointPhase.FAILED
    status = _observed(record_, phase, seen).model_copy(update={"observed_at": started})
    written = store.set_endpoint_status(record_.name, record_.version, status,
                                        reason="HealthCheck", run_id=run_id,
                                        only_if_newer=True)
    return phase.value if written else "skipped: a newer status is recorded"


# ---- helpers --------------------------------------------------------------------------------

def _observed(record_: EndpointRecord, phase: EndpointPhase, seen: EndpointObservation,
              ) -> EndpointStatus:
    return record_.endpoint.status.model_copy(update={
        "phase": phase, "message": seen.message, "observed_at": now(),
        "ready_replicas": seen.ready_replicas, "replicas": seen.replicas,
        "url": seen.url or record_.endpoint.status.url})


def _phase(store: Store, lease: LeaseRef, name: str, version: str, phase: EndpointPhase,
           reason: str, message: str) -> None:
    def write() -> None:
        current = store.require_endpoint(name, version)
        status = current.endpoint.status.model_copy(update={"phase": phase, "message": message,
                                                            "observed_at": now()})
        store.set_endpoint_status(name, version, status, reason=reason, run_id=lease.holder,
                                  token=lease.token, expected_version=current.row_version)

    as_holder(write)


def _cluster_and_context(store: Store, lease: LeaseRef, clients_for: ClientsFor | None,
                         ) -> tuple[Cluster, BackendContext]:
    cluster = store.require_cluster(lease.name).cluster
    clients = clients_for(cluster) if clients_for else {}
    return cluster, BackendContext(lease.holder, clients=clients, log=log)
