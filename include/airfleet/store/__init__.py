"""Durable state: clusters, their event history, per-cluster leases, vault secrets, policy
bindings and the governance audit trail.

SQLAlchemy 2 on a SQLite file by default (``config.database_url``), PostgreSQL when
``AIRFLEET_DATABASE_URL`` says so. Safety under concurrency comes from the database:

- cluster rows carry a ``version``; a write names the version it read and fails with
  :class:`Conflict` when another writer got there first;
- a lease is one row per cluster taken with a single atomic upsert; its fencing token grows on
  every takeover, and a write carrying a token older than the lease's is refused
  (:class:`StaleFencingToken`). The lease row is locked (``FOR UPDATE`` on PostgreSQL,
  ``BEGIN IMMEDIATE`` on SQLite) for the whole write, so a takeover cannot slip in between
  the check and the write.

Lease times come from the workers' clocks (UTC): run them with NTP, as any lease system needs.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, delete, event, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value

from airfleet import config, lifecycle
from airfleet.errors import (
    AirfleetError,
    Conflict,
    IllegalTransition,
    LeaseHeld,
    NotFound,
    StaleFencingToken,
)
from airfleet.policy import Binding, Decision
from airfleet.resources import Cluster, ClusterRequest, ClusterStatus, Phase
from airfleet.store.endpoints import EndpointEvent, EndpointRecord, EndpointStore
from airfleet.store.tables import (
    ClusterRow,
    EventRow,
    LeaseRow,
    PolicyAuditRow,
    PolicyBindingRow,
    SecretRow,
)

__all__ = ["ClusterRecord", "EndpointEvent", "EndpointRecord", "Event", "Lease", "StatusWrite",
           "Store", "now"]

GLOBAL_SCOPE = "*"  # the scope of bindings that hold for every cluster


def now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we write is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True)
class Lease:
    name: str
    holder: str | None
    token: int
    acquired_at: datetime | None
    expires_at: datetime | None

    @property
    def held(self) -> bool:
        return self.holder is not None and self.expires_at is not None and self.expires_at > now()


@dataclass(frozen=True)
class ClusterRecord:
    uid: str
    cluster: Cluster
    generation: int
    observed_generation: int
    version: int
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None

    @property
    def name(self) -> str:
        return self.cluster.name

    @property
    def phase(self) -> Phase:
        return self.cluster.status.phase


@dataclass(frozen=True)
class StatusWrite:
    """One cluster's status for :meth:`Store.set_statuses`, and the row version it was
    judged from."""

    name: str
    status: ClusterStatus
    expected_version: int


@dataclass(frozen=True)
class Event:
    cluster: str
    at: datetime
    kind: str
    from_phase: str | None
    to_phase: str | None
    reason: str
    message: str
    run_id: str | None
    token: int | None = None  # the fencing token the write carried (None: written unfenced)


def engine_for(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and serialized writers."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    path = url.split("///", 1)[1] if "///" in url else ""
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # let us issue BEGIN ourselves
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA busy_timeout=30000")

    @event.listens_for(engine, "begin")
    def _begin(conn):
        # IMMEDIATE takes the write lock at the start: read-check-write is one atomic step.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class Store(EndpointStore):
    """Every read and write of Airfleet's durable state goes through here (endpoints: see
    :class:`~airfleet.store.endpoints.EndpointStore`)."""

    def __init__(self, url: str | None = None):
        self.url = url or config.database_url()
        self.engine = engine_for(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    # ---- plumbing ------------------------------------------------------------------------

    def migrate(self) -> str:
        """Bring the schema to the newest revision (idempotent); return that revision."""
        from airfleet.store.migrations import upgrade

        return upgrade(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()

    # ---- leases --------------------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, ttl: float | None = None) -> Lease:
        """Take the lease of ``name`` for ``holder``: free or expired -> taken with a new
        fencing token; already ours -> renewed with the same token; else :class:`LeaseHeld`.
        ``ttl``: seconds (default ``AIRFLEET_LEASE_SECONDS``, 3600)."""
        t = now()
        expires = t + timedelta(seconds=config.lease_seconds() if ttl is None else ttl)
        insert = self._insert(LeaseRow).values(name=name, holder=holder, token=1, acquired_at=t,
                                                expires_at=expires)
        row = LeaseRow.__table__.c
        taken_over = (row.holder.is_(None)) | (row.expires_at <= t)
        upsert = insert.on_conflict_do_update(
            index_elements=[row.name],
            set_={"holder": holder,
                  # A takeover gets a new token; the same holder renewing keeps its token.
                  "token": _case(taken_over & (row.holder.is_distinct_from(holder)),
                                 row.token + 1, row.token),
                  "acquired_at": _case(row.holder == holder, row.acquired_at, t),
                  "expires_at": expires},
            where=taken_over | (row.holder == holder),
        ).returning(row.token, row.acquired_at)
        with self.session() as s:
            got = s.execute(upsert).first()
            if got is None:
                current = s.get(LeaseRow, name)
                raise LeaseHeld(
                    f"cluster {name} is held by run {current.holder} until "
                    f"{_utc(current.expires_at).isoformat()}; wait for it to finish, or break "
                    f"the lease with `airfleet lease break {name}` if that run is gone")
            return Lease(name, holder, got.token, _utc(got.acquired_at), expires)

    def renew_lease(self, name: str, holder: str, token: int,
                    ttl: float | None = None) -> Lease:
        with self.session() as s:
            lease = self._fence(s, name, token, holder=holder)
            lease.expires_at = now() + timedelta(
                seconds=config.lease_seconds() if ttl is None else ttl)
            return _lease(lease)

    def release_lease(self, name: str, holder: str, token: int) -> bool:
        """Release if we still hold it; False when another run took it over meanwhile."""
        with self.session() as s:
            lease = _locked_lease(s, name)
            if lease is None or lease.token != token or lease.holder != holder:
                return False
            lease.holder, lease.expires_at = None, None
            return True

    def break_lease(self, name: str) -> Lease | None:
        """Free the lease whoever holds it (an operator's escape hatch). The next holder gets a
        higher token, so the old holder's writes are refused."""
        with self.session() as s:
            lease = _locked_lease(s, name)
            if lease is None:
                return None
            previous = _lease(lease)
            lease.holder, lease.expires_at = None, None
            return previous

    def get_lease(self, name: str) -> Lease | None:
        with self.session() as s:
            row = s.get(LeaseRow, name)
            return _lease(row) if row else None

    def leases(self) -> list[Lease]:
        """Every cluster's lease row (held or not): one read for a whole fleet."""
        with self.session() as s:
            return [_lease(row) for row in s.scalars(select(LeaseRow))]

    def _fence(self, s: Session, name: str, token: int, holder: str | None = None) -> LeaseRow:
        lease = _locked_lease(s, name)
        if lease is None:
            raise StaleFencingToken(f"cluster {name} has no lease; acquire it before writing")
        if lease.holder is None:
            raise StaleFencingToken(
                f"write to cluster {name} refused: its lease (token {lease.token}) was released "
                "or broken; acquire it again before writing")
        if token != lease.token or (holder is not None and lease.holder != holder):
            raise StaleFencingToken(
                f"write to cluster {name} refused: fencing token {token} is stale (the lease "
                f"is now at token {lease.token}, held by {lease.holder or 'nobody'})")
        return lease

    def _insert(self, table):
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    # ---- clusters ------------------------------------------------------------------------

    def get_cluster(self, name: str) -> ClusterRecord | None:
        with self.session() as s:
            row = _live(s, name)
            return _record(row) if row else None

    def require_cluster(self, name: str) -> ClusterRecord:
        record = self.get_cluster(name)
        if record is None:
            raise NotFound(f"cluster {name} is not registered; list clusters with "
                           "`airfleet clusters list`")
        return record

    def list_clusters(self, phase: Phase | None = None, include_deleted: bool = False, *,
                      where_name: Callable[[str], bool] | None = None) -> list[ClusterRecord]:
        """The clusters, by name; ``where_name`` picks some by name before their records are
        built (building costs most of reading a large fleet)."""
        query = select(ClusterRow).order_by(ClusterRow.name, ClusterRow.created_at)
        if not include_deleted:
            query = query.where(ClusterRow.deleted_at.is_(None))
        if phase is not None:
            query = query.where(ClusterRow.phase == Phase(phase).value)
        with self.session() as s:
            return [_record(r) for r in s.scalars(query)
                    if where_name is None or where_name(r.name)]

    def register_cluster(self, request: ClusterRequest, *, run_id: str | None,
                         token: int | None) -> tuple[ClusterRecord, bool]:
        """Record a new cluster as Pending; return ``(record, created)``.

        A live cluster of that name with the same spec is adopted (a re-run converges); one with
        another spec is a :class:`Conflict` (that is what the update flow is for)."""
        spec = request.spec.model_dump(mode="json")
        with self.session() as s:
            if token is not None:
                self._fence(s, request.name, token)
            row = _live(s, request.name)
            if row is not None:
                if row.spec != spec:
                    raise Conflict(
                        f"cluster {request.name} exists with another spec (generation "
                        f"{row.generation}); change it with airfleet_cluster_update")
                return _record(row), False
            t = now()
            status = ClusterStatus(phase=Phase.PENDING, observed_at=t, message="registered",
                                   last_run_id=run_id)
            row = ClusterRow(uid=uuid.uuid4().hex, name=request.name, phase=Phase.PENDING.value,
                             spec=spec, labels=dict(request.metadata.labels),
                             status=status.model_dump(mode="json"), generation=1,
                             observed_generation=0, version=1, observed_at=t, created_at=t,
                             updated_at=t)
            s.add(row)
            s.add(EventRow(cluster=row.name, cluster_uid=row.uid, at=t, kind="Normal",
                           from_phase=None, to_phase=Phase.PENDING.value, reason="Registered",
                           message="cluster registered", run_id=run_id, token=token))
            try:
                s.flush()
            except IntegrityError:
                raise Conflict(f"cluster {request.name} was registered by another writer at "
                               "the same moment; re-read it and try again") from None
            return _record(row), True

    def update_spec(self, request: ClusterRequest, *, run_id: str | None, token: int | None,
                    expected_version: int | None = None) -> ClusterRecord:
        """Record a new desired spec; the generation grows when it differs."""
        spec = request.spec.model_dump(mode="json")
        with self.session() as s:
            if token is not None:
                self._fence(s, request.name, token)
            row = self._require_live(s, request.name)
            if row.spec == spec and row.labels == request.metadata.labels:
                return _record(row)
            values = {"spec": spec, "labels": dict(request.metadata.labels),
                      "generation": row.generation + (row.spec != spec)}
            self._write(s, row, values, expected_version)
            s.add(_event(row, "Normal", None, None, "SpecChanged",
                         f"desired spec is now generation {values['generation']}", run_id,
                         token))
            return _record(row)

    def set_status(self, name: str, status: ClusterStatus, *, reason: str, run_id: str | None,
                   token: int | None = None, expected_version: int | None = None,
                   observed_generation: int | None = None,
                   only_if_newer: bool = False) -> ClusterRecord | None:
        """Write a cluster's observed status; a phase change must be legal and is appended to
        the history in the same transaction.

        ``only_if_newer`` (health checks): skip, returning None, when the recorded status was
        observed at or after this one, so an older observation never overwrites a newer one."""
        with self.session() as s:
            if token is not None:
                self._fence(s, name, token)
            row = self._require_live(s, name)
            if not self._put_status(s, row, status, reason, run_id, expected_version,
                                    observed_generation, only_if_newer, token):
                return None
            return _record(row)

    def set_statuses(self, writes: list[StatusWrite], *, reason: str, run_id: str | None,
                     only_if_newer: bool = False) -> list[bool | AirfleetError]:
        """:meth:`set_status` for many clusters (no lease: health checks) in one transaction,
        so one commit instead of one per cluster. Each write keeps its own terms (the version
        it read, a legal transition, ``only_if_newer``) and one that fails does not stop the
        others: in its place comes True (written), False (a newer status is recorded) or the
        error (:class:`Conflict`, :class:`NotFound`, :class:`IllegalTransition`)."""
        results: list[bool | AirfleetError] = []
        with self.session() as s:
            names = [w.name for w in writes]
            rows = {row.name: row for row in s.scalars(
                select(ClusterRow).where(ClusterRow.name.in_(names),
                                         ClusterRow.deleted_at.is_(None)))}
            for w in writes:
                row = rows.get(w.name)
                try:
                    if row is None:
                        raise NotFound(f"cluster {w.name} is not registered")
                    results.append(self._put_status(s, row, w.status, reason, run_id,
                                                    w.expected_version, None, only_if_newer))
                except (Conflict, NotFound, IllegalTransition) as exc:
                    results.append(exc)
        return results

    def _put_status(self, s: Session, row: ClusterRow, status: ClusterStatus, reason: str,
                    run_id: str | None, expected_version: int | None,
                    observed_generation: int | None, only_if_newer: bool,
                    token: int | None = None) -> bool:
        """One cluster's status write (:meth:`set_status`) inside ``s``; False when skipped
        because a newer status is recorded. Writes nothing when it raises."""
        # In UTC: SQLite keeps a datetime's wall clock but not its offset.
        observed_at = _utc(status.observed_at or now()).astimezone(UTC)
        status = status.model_copy(update={"observed_at": observed_at, "last_run_id": run_id})
        if only_if_newer and row.observed_at and _utc(row.observed_at) >= status.observed_at:
            return False
        current = Phase(row.phase)
        values: dict[str, Any] = {"status": status.model_dump(mode="json"),
                                  "phase": status.phase.value,
                                  "observed_at": status.observed_at}
        if observed_generation is not None:
            values["observed_generation"] = observed_generation
        if status.phase is Phase.DELETED:
            values["deleted_at"] = now()
        # Failed -> Failed is history only when the reason changed (a health check that
        # sees the same failure every 5 minutes adds nothing).
        step = None
        if status.phase != current or (status.phase is Phase.FAILED
                                       and status.message != row.status.get("message")):
            step = lifecycle.transition(row.name, current, status.phase, reason=reason,
                                        run_id=run_id)
        self._write(s, row, values, expected_version)
        if step is not None:
            s.add(_event(row, "Transition", step.from_phase, step.to_phase, reason,
                         status.message, run_id, token))
        return True

    def transition(self, name: str, phase: Phase, *, reason: str, message: str = "",
                   run_id: str | None, token: int | None = None) -> ClusterRecord:
        """Move a cluster to ``phase`` keeping the rest of its status."""
        record = self.require_cluster(name)
        status = record.cluster.status.model_copy(
            update={"phase": Phase(phase), "message": message, "observed_at": now()})
        return self.set_status(name, status, reason=reason, run_id=run_id, token=token,
                               expected_version=record.version)

    def record_event(self, name: str, reason: str, message: str, *, run_id: str | None,
                     kind: str = "Normal", token: int | None = None) -> None:
        """A note in the cluster's history that is no phase change (a node drained, ...)."""
        with self.session() as s:
            if token is not None:
                self._fence(s, name, token)
            s.add(_event(self._require_live(s, name), kind, None, None, reason, message,
                         run_id, token))

    def events(self, name: str) -> list[Event]:
        """The history of every incarnation of ``name``, oldest first."""
        query = select(EventRow).where(EventRow.cluster == name).order_by(EventRow.id)
        with self.session() as s:
            return [_as_event(e) for e in s.scalars(query)]

    def run_events(self, run_id: str) -> list[Event]:
        """What one run (``<dag_id>/<run_id>``) wrote into any cluster's history, oldest first."""
        query = select(EventRow).where(EventRow.run_id == run_id).order_by(EventRow.id)
        with self.session() as s:
            return [_as_event(e) for e in s.scalars(query)]

    def _require_live(self, s: Session, name: str) -> ClusterRow:
        row = _live(s, name)
        if row is None:
            raise NotFound(f"cluster {name} is not registered")
        return row

    def _write(self, s: Session, row: ClusterRow, values: dict[str, Any],
               expected_version: int | None) -> None:
        read = row.version if expected_version is None else expected_version
        values = {**values, "version": read + 1, "updated_at": now()}
        done = s.execute(update(ClusterRow)
                         .where(ClusterRow.uid == row.uid, ClusterRow.version == read)
                         .values(**values)
                         .execution_options(synchronize_session=False))
        if done.rowcount != 1:
            raise Conflict(f"cluster {row.name} changed since version {read}; re-read it and "
                           "try again")
        for key, value in values.items():  # already written: not dirty, no second UPDATE
            set_committed_value(row, key, value)

    # ---- vault secrets (ciphertext only; see airfleet.vault) -----------------------------

    def put_secret(self, secret_id: str, key_id: str, envelope: str, description: str) -> bool:
        """Store a secret; False (and nothing written) when that id is already stored."""
        insert = self._insert(SecretRow).values(
            id=secret_id, key_id=key_id, envelope=envelope, description=description,
            created_at=now()).on_conflict_do_nothing(index_elements=["id"])
        with self.session() as s:
            return s.execute(insert).rowcount == 1

    def get_secret(self, secret_id: str) -> SecretRow:
        with self.session() as s:
            row = s.get(SecretRow, secret_id)
            if row is None:
                raise NotFound(f"vault secret {secret_id} does not exist")
            return row

    def delete_secret(self, secret_id: str) -> bool:
        """Forget a secret; False when it was already gone."""
        with self.session() as s:
            return s.execute(delete(SecretRow).where(SecretRow.id == secret_id)).rowcount == 1

    def secret_ids(self) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(SecretRow.id).order_by(SecretRow.id)))

    def replace_envelope(self, secret_id: str, key_id: str, envelope: str) -> None:
        with self.session() as s:
            row = s.get(SecretRow, secret_id)
            row.key_id, row.envelope, row.rotated_at = key_id, envelope, now()

    # ---- policy bindings and the governance audit trail ---------------------------------

    def bindings(self, cluster: str | None = None, *, every_scope: bool = False,
                 ) -> list[Binding]:
        """The bindings of one scope (``cluster`` None: the global one), or of every scope."""
        query = select(PolicyBindingRow).order_by(
            PolicyBindingRow.scope, PolicyBindingRow.action, PolicyBindingRow.position)
        if not every_scope:
            query = query.where(PolicyBindingRow.scope == (cluster or GLOBAL_SCOPE))
        with self.session() as s:
            return [_binding(row) for row in s.scalars(query)]

    def bindings_for(self, cluster: str, action: str) -> list[Binding]:
        """The policies that judge ``action`` on ``cluster``: its own, else the global ones."""
        own = [b for b in self.bindings(cluster) if b.action == action]
        return own or [b for b in self.bindings() if b.action == action]

    def set_bindings(self, changes: dict[str, list[Binding]], *, cluster: str | None,
                     actor: str | None) -> None:
        """Seed semantics: each action given gets exactly its list (empty: unbound); actions
        not given keep theirs. Every change goes to the audit trail."""
        scope = cluster or GLOBAL_SCOPE
        with self.session() as s:
            for action, bound in changes.items():
                old = {r.policy: r for r in s.scalars(select(PolicyBindingRow).where(
                    PolicyBindingRow.scope == scope, PolicyBindingRow.action == action))}
                for row in old.values():
                    s.delete(row)
                s.flush()
                for position, b in enumerate(bound):
                    s.add(PolicyBindingRow(
                        scope=scope, action=action, position=position, policy=b.policy,
                        version=b.version, mode=b.mode, timeout_seconds=b.timeout_seconds,
                        memory_mb=b.memory_mb, url=b.url, fail_open=b.fail_open,
                        params=dict(b.params), updated_at=now()))
                    s.add(_audit("bind", cluster, action, b.policy, b.version, b.mode,
                                 reason=_describe(b), actor=actor))
                for policy in sorted(set(old) - {b.policy for b in bound}):
                    s.add(_audit("unbind", cluster, action, policy, old[policy].version,
                                 old[policy].mode, reason="unbound", actor=actor))

    def record_decisions(self, cluster: str, decisions: list[Decision], *,
                         run_id: str | None) -> None:
        with self.session() as s:
            for d in decisions:
                s.add(_audit("decision", cluster, d.action, d.policy, d.version, d.mode,
                             allowed=d.allowed, reason=d.reason, run_id=run_id))

    def policy_audit(self, cluster: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` audit entries (of one cluster, when given), oldest first."""
        query = select(PolicyAuditRow).order_by(PolicyAuditRow.id.desc()).limit(limit)
        if cluster:
            query = query.where(PolicyAuditRow.cluster == cluster)
        with self.session() as s:
            rows = list(s.scalars(query))
        return [{"at": _utc(r.at).isoformat(), "kind": r.kind, "cluster": r.cluster,
                 "action": r.action, "policy": r.policy, "version": r.version, "mode": r.mode,
                 "allowed": r.allowed, "reason": r.reason, "run_id": r.run_id,
                 "actor": r.actor} for r in reversed(rows)]


def _binding(row: PolicyBindingRow) -> Binding:
    return Binding(action=row.action, policy=row.policy,
                   cluster=None if row.scope == GLOBAL_SCOPE else row.scope,
                   version=row.version, mode=row.mode, timeout_seconds=row.timeout_seconds,
                   memory_mb=row.memory_mb, url=row.url, fail_open=row.fail_open,
                   params=dict(row.params or {}))


def _describe(b: Binding) -> str:
    how = f"mode {b.mode}, timeout {b.timeout_seconds:g} s"
    if b.mode == "http":
        how += f", {b.url}" + (", fail-open" if b.fail_open else "")
    return f"bound ({how}" + (f", params {b.params}" if b.params else "") + ")"


def _audit(kind: str, cluster: str | None, action: str, policy: str | None,
           version: str | None, mode: str | None, *, reason: str, allowed: bool | None = None,
           run_id: str | None = None, actor: str | None = None) -> PolicyAuditRow:
    return PolicyAuditRow(at=now(), kind=kind, cluster=cluster, action=action, policy=policy,
                          version=version, mode=mode, allowed=allowed, reason=reason,
                          run_id=run_id, actor=actor)


def _case(condition, then, otherwise):
    from sqlalchemy import case

    return case((condition, then), else_=otherwise)


def _locked_lease(s: Session, name: str) -> LeaseRow | None:
    return s.scalars(select(LeaseRow).where(LeaseRow.name == name).with_for_update()).first()


def _live(s: Session, name: str) -> ClusterRow | None:
    return s.scalars(select(ClusterRow).where(ClusterRow.name == name,
                                              ClusterRow.deleted_at.is_(None))).first()


def _lease(row: LeaseRow) -> Lease:
    return Lease(row.name, row.holder, row.token, _utc(row.acquired_at), _utc(row.expires_at))


def _event(row: ClusterRow, kind: str, from_phase, to_phase, reason: str, message: str,
           run_id: str | None, token: int | None = None) -> EventRow:
    return EventRow(cluster=row.name, cluster_uid=row.uid, at=now(), kind=kind,
                    from_phase=from_phase and str(from_phase), to_phase=to_phase and str(to_phase),
                    reason=reason, message=message or "", run_id=run_id, token=token)


def _as_event(e: EventRow) -> Event:
    return Event(e.cluster, _utc(e.at), e.kind, e.from_phase, e.to_phase, e.reason, e.message,
                 e.run_id, e.token)


def _record(row: ClusterRow) -> ClusterRecord:
    cluster = Cluster.model_validate({"metadata": {"name": row.name, "labels": row.labels},
                                      "spec": row.spec, "status": row.status})
    return ClusterRecord(row.uid, cluster, row.generation, row.observed_generation, row.version,
                         _utc(row.created_at), _utc(row.updated_at), _utc(row.deleted_at))
