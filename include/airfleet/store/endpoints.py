"""Endpoint versions and their history, in the same store as clusters.

An endpoint flow holds its *cluster's* lease, so every write here that carries a fencing token
is checked against the lease of the endpoint's cluster: an endpoint flow never races a cluster
update or delete. Rows carry ``row_version`` for optimistic concurrency, as cluster rows do.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from airfleet import lifecycle
from airfleet.endpoints import EndpointPhase, EndpointRequest, EndpointStatus, EndpointVersion
from airfleet.errors import Conflict, NotFound
from airfleet.store.tables import EndpointEventRow, EndpointRow


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True)
class EndpointRecord:
    uid: str
    endpoint: EndpointVersion
    generation: int
    observed_generation: int
    row_version: int
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def version(self) -> str:
        return self.endpoint.spec.version

    @property
    def cluster(self) -> str:
        return self.endpoint.spec.cluster

    @property
    def phase(self) -> EndpointPhase:
        return self.endpoint.status.phase


@dataclass(frozen=True)
class EndpointEvent:
    endpoint: str
    version: str
    cluster: str
    at: datetime
    kind: str
    from_phase: str | None
    to_phase: str | None
    reason: str
    message: str
    run_id: str | None


class EndpointStore:
    """The endpoint half of :class:`airfleet.store.Store` (mixed into it)."""

    def get_endpoint(self, name: str, version: str) -> EndpointRecord | None:
        with self.session() as s:
            row = _live(s, name, version)
            return _record(row) if row else None

    def require_endpoint(self, name: str, version: str) -> EndpointRecord:
        record = self.get_endpoint(name, version)
        if record is None:
            raise NotFound(f"endpoint {name} has no version {version}; list its versions with "
                           f"`airfleet endpoints get {name}`")
        return record

    def endpoint_versions(self, name: str) -> list[EndpointRecord]:
        """The live versions of endpoint ``name``, oldest first."""
        query = select(EndpointRow).where(EndpointRow.name == name,
                                          EndpointRow.deleted_at.is_(None))
        with self.session() as s:
            return [_record(r) for r in s.scalars(query.order_by(EndpointRow.created_at))]

    def list_endpoints(self, cluster: str | None = None,
                       include_deleted: bool = False) -> list[EndpointRecord]:
        query = select(EndpointRow).order_by(EndpointRow.name, EndpointRow.version,
                                             EndpointRow.created_at)
        if cluster is not None:
            query = query.where(EndpointRow.cluster == cluster)
        if not include_deleted:
            query = query.where(EndpointRow.deleted_at.is_(None))
        with self.session() as s:
            return [_record(r) for r in s.scalars(query)]

    def put_endpoint(self, request: EndpointRequest, *, run_id: str | None,
                     token: int | None) -> tuple[EndpointRecord, bool]:
        """Record the desired spec of one version: a new version is Pending (``created``
        True); a known one keeps its status and its generation grows when the spec changed.
        ``token``: the fencing token of the cluster's lease."""
        spec = request.spec.model_dump(mode="json")
        with self.session() as s:
            if token is not None:
                self._fence(s, request.spec.cluster, token)
            row = _live(s, request.name, request.spec.version)
            if row is not None:
                if row.cluster != request.spec.cluster:
                    raise Conflict(
                        f"endpoint {request.name} {row.version} runs on cluster {row.cluster}; "
                        "delete it there before deploying it on another cluster")
                if row.spec != spec or row.labels != request.metadata.labels:
                    values = {"spec": spec, "labels": dict(request.metadata.labels),
                              "served_model": request.spec.model.served,
                              "generation": row.generation + (row.spec != spec)}
                    self._write_endpoint(s, row, values, None)
                    s.add(_event(row, "Normal", None, None, "SpecChanged",
                                 f"desired spec is now generation {row.generation}", run_id))
                return _record(row), False
            t = _now()
            status = EndpointStatus(observed_at=t, message="registered", last_run_id=run_id,
                                    replicas=request.spec.replicas)
            row = EndpointRow(
                uid=uuid.uuid4().hex, name=request.name, version=request.spec.version,
                cluster=request.spec.cluster, served_model=request.spec.model.served,
                phase=EndpointPhase.PENDING.value, spec=spec,
                labels=dict(request.metadata.labels), status=status.model_dump(mode="json"),
                generation=1, observed_generation=0, row_version=1, observed_at=t,
                created_at=t, updated_at=t)
            s.add(row)
            s.add(_event(row, "Normal", None, EndpointPhase.PENDING.value, "Registered",
                         f"version {row.version} registered", run_id))
            try:
                s.flush()
            except IntegrityError:
                raise Conflict(f"endpoint {request.name} {request.spec.version} was registered "
                               "by another writer at the same moment; try again") from None
            return _record(row), True

    def set_endpoint_spec(self, name: str, version: str, changes: dict[str, Any], *,
                          reason: str, message: str, run_id: str | None,
                          token: int | None) -> EndpointRecord:
        """Change top-level spec fields of a recorded version (a scale's replicas, the weight
        a rebalance gives it), as one history entry."""
        with self.session() as s:
            row = self._require_live_endpoint(s, name, version)
            if token is not None:
                self._fence(s, row.cluster, token)
            spec = {**row.spec, **changes}
            if spec != row.spec:
                self._write_endpoint(s, row, {"spec": spec, "generation": row.generation + 1},
                                     None)
                s.add(_event(row, "Normal", None, None, reason, message, run_id))
            return _record(row)

    def set_endpoint_status(self, name: str, version: str, status: EndpointStatus, *,
                            reason: str, run_id: str | None, token: int | None = None,
                            expected_version: int | None = None,
                            observed_generation: int | None = None,
                            only_if_newer: bool = False) -> EndpointRecord | None:
        """Write a version's observed status; a phase change must be legal and joins the
        history in the same transaction. ``only_if_newer``: as for clusters (health checks)."""
        observed_at = _utc(status.observed_at or _now()).astimezone(UTC)
        status = status.model_copy(update={"observed_at": observed_at, "last_run_id": run_id})
        with self.session() as s:
            row = self._require_live_endpoint(s, name, version)
            if token is not None:
                self._fence(s, row.cluster, token)
            if only_if_newer and row.observed_at and _utc(row.observed_at) >= observed_at:
                return None
            current, target = row.phase, status.phase.value
            values: dict[str, Any] = {"status": status.model_dump(mode="json"),
                                      "phase": target, "observed_at": observed_at}
            if observed_generation is not None:
                values["observed_generation"] = observed_generation
            if target == EndpointPhase.DELETED:
                values["deleted_at"] = _now()
            if target != current or (target == EndpointPhase.FAILED
                                     and status.message != row.status.get("message")):
                lifecycle.check_endpoint(current, target)
                s.add(_event(row, "Transition", current, target, reason, status.message,
                             run_id))
            self._write_endpoint(s, row, values, expected_version)
            return _record(row)

    def record_endpoint_event(self, name: str, version: str, reason: str, message: str, *,
                              run_id: str | None, kind: str = "Normal",
                              token: int | None = None) -> None:
        with self.session() as s:
            row = self._require_live_endpoint(s, name, version)
            if token is not None:
                self._fence(s, row.cluster, token)
            s.add(_event(row, kind, None, None, reason, message, run_id))

    def endpoint_events(self, name: str) -> list[EndpointEvent]:
        """The history of every version and incarnation of endpoint ``name``, oldest first."""
        query = select(EndpointEventRow).where(EndpointEventRow.endpoint == name)
        with self.session() as s:
            return [_as_event(e) for e in s.scalars(query.order_by(EndpointEventRow.id))]

    def run_endpoint_events(self, run_id: str) -> list[EndpointEvent]:
        query = select(EndpointEventRow).where(EndpointEventRow.run_id == run_id)
        with self.session() as s:
            return [_as_event(e) for e in s.scalars(query.order_by(EndpointEventRow.id))]

    def _require_live_endpoint(self, s: Session, name: str, version: str) -> EndpointRow:
        row = _live(s, name, version)
        if row is None:
            raise NotFound(f"endpoint {name} has no version {version}")
        return row

    def _write_endpoint(self, s: Session, row: EndpointRow, values: dict[str, Any],
                        expected_version: int | None) -> None:
        read = row.row_version if expected_version is None else expected_version
        values = {**values, "row_version": read + 1, "updated_at": _now()}
        done = s.execute(update(EndpointRow)
                         .where(EndpointRow.uid == row.uid, EndpointRow.row_version == read)
                         .values(**values)
                         .execution_options(synchronize_session=False))
        if done.rowcount != 1:
            raise Conflict(f"endpoint {row.name} {row.version} changed since it was read; "
                           "re-read it and try again")
        for key, value in values.items():
            setattr(row, key, value)


def _live(s: Session, name: str, version: str) -> EndpointRow | None:
    return s.scalars(select(EndpointRow).where(
        EndpointRow.name == name, EndpointRow.version == version,
        EndpointRow.deleted_at.is_(None))).first()


def _event(row: EndpointRow, kind: str, from_phase: str | None, to_phase: str | None,
           reason: str, message: str, run_id: str | None) -> EndpointEventRow:
    return EndpointEventRow(endpoint=row.name, version=row.version, endpoint_uid=row.uid,
                            cluster=row.cluster, at=_now(), kind=kind, from_phase=from_phase,
                            to_phase=to_phase, reason=reason, message=message or "",
                            run_id=run_id)


def _as_event(e: EndpointEventRow) -> EndpointEvent:
    return EndpointEvent(e.endpoint, e.version, e.cluster, _utc(e.at), e.kind, e.from_phase,
                         e.to_phase, e.reason, e.message, e.run_id)


def _record(row: EndpointRow) -> EndpointRecord:
    endpoint = EndpointVersion.model_validate(
        {"metadata": {"name": row.name, "labels": row.labels}, "spec": row.spec,
         "status": row.status})
    return EndpointRecord(row.uid, endpoint, row.generation, row.observed_generation,
                          row.row_version, _utc(row.created_at), _utc(row.updated_at),
                          _utc(row.deleted_at))
