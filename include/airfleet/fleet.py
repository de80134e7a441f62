"""The fleet as people read it: one summary per cluster, a detail page, filters; the same for
the endpoints the clusters serve (one item per endpoint, its versions inside).

What the plugin API returns (and the fleet view shows). Credentials appear as references only:
a sealed envelope in a spec is shown as ``"<sealed>"``, never its text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any
from urllib.parse import quote

from airfleet.endpoints import EndpointPhase
from airfleet.errors import InvalidRequest
from airfleet.policy.plan import redact_sealed
from airfleet.resources import ClusterType, Phase, Provider
from airfleet.store import ClusterRecord, EndpointEvent, EndpointRecord, Event, Lease, now

HEALTH_DAG = "airfleet_cluster_health_check"


def parse_filters(phase: str | None = None, type: str | None = None,  # noqa: A002 - the field
                  provider: str | None = None, label: list[str] | None = None,
                  name: str | None = None) -> dict[str, Any]:
    """Query parameters -> filters; a bad one raises InvalidRequest naming it and the fix."""
    filters: dict[str, Any] = {"name": name or None, "labels": {}}
    for key, value, enum in (("phase", phase, Phase), ("type", type, ClusterType),
                             ("provider", provider, Provider)):
        if value is None:
            continue
        try:
            filters[key] = enum(value)
        except ValueError:
            raise InvalidRequest(f"{key}: {value!r} is not one of "
                                 f"{', '.join(e.value for e in enum)}") from None
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"label: {item!r} is not KEY=VALUE (e.g. label=team=search)")
        filters["labels"][key] = value
    return filters


def matches(record: ClusterRecord, filters: dict[str, Any]) -> bool:
    spec, labels = record.cluster.spec, record.cluster.metadata.labels
    return all([
        filters.get("phase") in (None, record.phase),
        filters.get("type") in (None, spec.type),
        filters.get("provider") in (None, spec.provider),
        not filters.get("name") or filters["name"] in record.name,
        all(labels.get(k) == v for k, v in filters.get("labels", {}).items()),
    ])


def summary(record: ClusterRecord, lease: Lease | None = None,
            endpoint_count: int = 0) -> dict[str, Any]:
    """One line of the fleet: phase, nodes ready of desired, GPUs by model, health age, and how
    many endpoints it serves (``endpoint_count``: see :func:`endpoint_counts`)."""
    status, spec = record.cluster.status, record.cluster.spec
    checked = status.health_checked_at
    return {
        "name": record.name, "labels": dict(record.cluster.metadata.labels),
        "type": spec.type.value, "provider": spec.provider.value,
        "phase": status.phase.value, "message": status.message,
        "nodes": {"ready": sum(_ready(n.phase) for n in status.nodes),
                  "desired": desired_nodes(record)},
        "gpus": {"count": status.accelerators.get("count", 0),
                 "models": dict(status.accelerators.get("models") or {})},
        "stable": next((c.status for c in status.conditions if c.type == "Stable"), None),
        "observed_at": _iso(status.observed_at),
        "health_checked_at": _iso(checked),
        "health_age_seconds": round((now() - checked).total_seconds(), 1) if checked else None,
        "last_run": run_link(status.last_run_id),
        "held_by": lease.holder if lease is not None and lease.held else None,
        "generation": record.generation, "observed_generation": record.observed_generation,
        "left_behind": list(status.left_behind),
        "endpoint_count": endpoint_count,
    }


def visible(records: Sequence[ClusterRecord]) -> list[ClusterRecord]:
    """The fleet as people see it (``records`` include the deleted): every live cluster, and a
    cluster deleted by force that left something behind, until its name is used again: what
    it left is still there for someone to remove."""
    live = {r.name for r in records if r.deleted_at is None}
    last_deleted: dict[str, ClusterRecord] = {}
    for r in records:
        if r.deleted_at is not None and r.name not in live and r.cluster.status.left_behind:
            if r.name not in last_deleted or r.deleted_at > last_deleted[r.name].deleted_at:
                last_deleted[r.name] = r
    return sorted([r for r in records if r.deleted_at is None] + list(last_deleted.values()),
                  key=lambda r: r.name)


def detail(record: ClusterRecord, lease: Lease | None = None,
           endpoint_records: Iterable[EndpointRecord] = ()) -> dict[str, Any]:
    """The cluster page: the summary plus its spec, nodes, accelerators and conditions, and the
    endpoints it serves (``endpoint_records``: the live versions on it, as
    :func:`endpoint_items` shapes them)."""
    status = record.cluster.status.model_dump(mode="json")
    served = endpoint_items(r for r in endpoint_records if r.cluster == record.name)
    return {**summary(record, lease, len(served)), "endpoints": served, "uid": record.uid,
            "created_at": _iso(record.created_at), "updated_at": _iso(record.updated_at),
            "dashboard": dashboard_access(record),
            "spec": redact_sealed(record.cluster.spec.model_dump(mode="json")),
            "status": {k: status[k] for k in ("phase", "message", "observed_at", "nodes",
                                             "accelerators", "conditions", "failed_probes",
                                             "resources", "health_checked_at")}}


def dashboard_access(record: ClusterRecord) -> dict[str, str] | None:
    """How a person reaches a static-nodes cluster's Ray dashboard: it answers on the head's
    loopback only, so through an SSH forward (``ssh``), then in a browser (``url``)."""
    ssh = record.cluster.spec.config.ssh
    if ssh is None:
        return None
    port = ssh.ray.dashboard_port
    return {"ssh": f"ssh -N -L {port}:127.0.0.1:{port} -p {ssh.port} {ssh.user}@{ssh.head}",
            "url": f"http://127.0.0.1:{port}"}


def event(e: Event | EndpointEvent) -> dict[str, Any]:
    return {**asdict(e), "at": _iso(e.at), "run": run_link(e.run_id)}


def run_link(run_id: str | None) -> dict[str, str] | None:
    """``<dag_id>/<run_id>`` (how Airfleet names the run that wrote) -> the run's UI page."""
    if not run_id or "/" not in run_id:
        return None
    dag_id, _, run = run_id.partition("/")
    return {"dag_id": dag_id, "run_id": run, "url": f"/dags/{dag_id}/runs/{quote(run, safe='')}"}


def desired_nodes(record: ClusterRecord) -> int:
    """Nodes the spec asks for: head + workers (ssh), the pools' desired sizes (EKS/AKS), else
    the nodes last seen (an existing Kubernetes cluster's nodes are not ours to size)."""
    cfg = record.cluster.spec.config
    if cfg.ssh is not None:
        return 1 + len(cfg.ssh.workers)
    managed = cfg.eks or cfg.aks
    if managed is not None:
        return sum(p.desired for p in managed.node_pools)
    return len(record.cluster.status.nodes)


def _ready(phase: str) -> bool:
    return phase in ("Running", "Ready")


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at else None


# ---- endpoints ------------------------------------------------------------------------------

def parse_endpoint_filters(cluster: str | None = None, phase: str | None = None,
                           name: str | None = None) -> dict[str, Any]:
    """Query parameters of the endpoint list -> filters; a bad one raises InvalidRequest naming
    it, as :func:`parse_filters` does."""
    filters: dict[str, Any] = {"cluster": cluster or None, "name": name or None}
    if phase is not None:
        try:
            filters["phase"] = EndpointPhase(phase)
        except ValueError:
            raise InvalidRequest(f"phase: {phase!r} is not one of "
                                 f"{', '.join(e.value for e in EndpointPhase)}") from None
    return filters


def endpoint_matches(versions: Sequence[EndpointRecord], filters: dict[str, Any]) -> bool:
    """Whether an endpoint (its live versions, all on one cluster) passes ``filters``: the
    cluster exactly, the name as a substring, the phase of any one of its versions."""
    first = versions[0]
    return all([
        filters.get("cluster") in (None, first.cluster),
        not filters.get("name") or filters["name"] in first.name,
        filters.get("phase") is None or any(v.phase == filters["phase"] for v in versions),
    ])


def group_endpoints(records: Iterable[EndpointRecord]) -> list[list[EndpointRecord]]:
    """Endpoint versions -> one list per endpoint (by name), versions oldest first."""
    by_name: dict[str, list[EndpointRecord]] = {}
    for r in records:
        by_name.setdefault(r.name, []).append(r)
    return [sorted(by_name[n], key=lambda r: (r.created_at, r.version)) for n in sorted(by_name)]


def endpoint_items(records: Iterable[EndpointRecord],
                   filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The endpoint list: one :func:`endpoint_summary` per endpoint that passes ``filters``."""
    return [endpoint_summary(versions) for versions in group_endpoints(records)
            if endpoint_matches(versions, filters or {})]


def endpoint_counts(records: Iterable[EndpointRecord]) -> dict[str, int]:
    """Cluster name -> how many endpoints (not versions) it serves."""
    names: dict[str, set[str]] = {}
    for r in records:
        names.setdefault(r.cluster, set()).add(r.name)
    return {cluster: len(served) for cluster, served in names.items()}


def endpoint_summary(versions: Sequence[EndpointRecord]) -> dict[str, Any]:
    """One endpoint (its live versions, oldest first): where it runs, what it serves, and per
    version its phase, replicas ready of desired, share of traffic and the last run. The model
    and engine are the newest version's (a canary may try another model: each version names
    its own)."""
    newest = versions[-1].endpoint
    return {
        "name": newest.name, "labels": dict(newest.metadata.labels),
        "cluster": newest.spec.cluster,
        "model": {"name": newest.spec.model.name, "served_name": newest.spec.model.served},
        "engine": newest.spec.engine.value,
        "versions": [_endpoint_version(r) for r in versions],
    }


def endpoint_detail(versions: Sequence[EndpointRecord]) -> dict[str, Any]:
    """The endpoint page: the summary, the weights by version, and each version's spec and
    status as recorded."""
    out = endpoint_summary(versions)
    for item, r in zip(out["versions"], versions, strict=True):
        item.update({
            "uid": r.uid, "generation": r.generation,
            "observed_generation": r.observed_generation,
            "created_at": _iso(r.created_at), "updated_at": _iso(r.updated_at),
            "spec": redact_sealed(r.endpoint.spec.model_dump(mode="json")),
            "status": r.endpoint.status.model_dump(mode="json")})
    return {**out, "weights": {r.version: r.endpoint.spec.traffic_weight for r in versions}}


def _endpoint_version(record: EndpointRecord) -> dict[str, Any]:
    spec, status = record.endpoint.spec, record.endpoint.status
    return {
        "version": spec.version, "phase": status.phase.value, "model": spec.model.name,
        "ready_replicas": status.ready_replicas, "replicas": spec.replicas,
        "traffic_weight": spec.traffic_weight, "url": status.url, "message": status.message,
        "observed_at": _iso(status.observed_at),
        "last_run_id": status.last_run_id, "last_run": run_link(status.last_run_id),
    }


NOTE_LIMIT = 1000  # Airflow's dag_run_note.content
NOTE_KEY = "airfleet_note"  # the XCom key a task tells the run note with


def run_note(events: list[Event], *, failed_tasks: Sequence[str] = (),
             dry_run: bool = False, notes: Mapping[str, str] | None = None) -> str:
    """The note Airflow shows on a run. Its first line is the one that matters (the UI shows
    only that): where the run failed and why, else what it did. Then, cluster by cluster, its
    path through the phases, why it ended there, what else happened to it; then what the
    tasks said (``notes``: task id -> text, e.g. why validate refused the request).

    ``failed_tasks`` come in the order they failed: the first is the cause."""
    notes = {task: _one_line(text) for task, text in (notes or {}).items()}
    by_cluster: dict[str, list[Event]] = {}
    for e in events:
        by_cluster.setdefault(e.cluster, []).append(e)
    clusters = [_cluster_line(name, evs) for name, evs in by_cluster.items()]
    told = list(dict.fromkeys(notes.values()))
    if failed_tasks:
        why = next((notes[t] for t in failed_tasks if t in notes), None) or \
            _last_failure(events) or "see the failed task's log"
        told = [t for t in told if t != why]
        lines = [f"Failed at {', '.join(failed_tasks)}: {why}",
                 *(clusters or ["Nothing changed."]), *told]
    elif told:
        lines = [*told, *clusters]
    else:
        lines = clusters or ["Nothing changed" + (" (dry run)." if dry_run else ".")]
    kept, size = [], 0
    for line in lines:
        if size + len(line) > NOTE_LIMIT - 40:
            kept.append(f"… and {len(lines) - len(kept)} more.")
            break
        kept.append(line)
        size += len(line) + 1
    return "\n".join(kept)


def _one_line(text: str) -> str:
    """A multi-line message (e.g. one error per field) on one line, each part kept."""
    parts = [line.strip() for line in text.splitlines() if line.strip()]
    if not parts:
        return ""
    head, rest = parts[0], "; ".join(parts[1:])
    return f"{head} {rest}" if head.endswith(":") and rest else "; ".join(parts)


def _last_failure(events: list[Event]) -> str | None:
    failed = [e for e in events if e.to_phase == Phase.FAILED.value and e.message]
    return failed[-1].message if failed else None


def _cluster_line(name: str, events: list[Event]) -> str:
    moves = [e for e in events if e.to_phase]
    parts = []
    if moves:
        first, last = moves[0], moves[-1]
        path = " → ".join(([first.from_phase] if first.from_phase else []) +
                          [e.to_phase for e in moves])
        why = last.message if last.message and last.message != last.reason else ""
        parts.append(f"{path} ({why})" if why else path)
    others: dict[str, int] = {}
    for e in events:
        if not e.to_phase:
            others[e.reason] = others.get(e.reason, 0) + 1
    if others:
        parts.append(", ".join(f"{n} {reason}" if n > 1 else reason
                               for reason, n in others.items()))
    return f"{name}: {'; '.join(parts)}"
