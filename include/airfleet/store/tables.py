"""The store's tables. Alembic migrations under ``airfleet/migrations`` create them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ClusterRow(Base):
    """One incarnation of a cluster. A deleted cluster keeps its row (deleted_at set), so its
    name can be used again while its history stays."""

    __tablename__ = "airfleet_clusters"

    uid: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    phase: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict] = mapped_column(JSON)
    labels: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[dict] = mapped_column(JSON)
    # generation counts spec changes; observed_generation is the one a flow last applied.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    observed_generation: Mapped[int] = mapped_column(Integer, default=0)
    # Optimistic concurrency: every write bumps version and names the one it read.
    version: Mapped[int] = mapped_column(Integer, default=1)
    observed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # One live cluster per name.
        Index("uq_airfleet_clusters_live_name", "name", unique=True,
              sqlite_where=text("deleted_at IS NULL"),
              postgresql_where=text("deleted_at IS NULL")),
    )


class EventRow(Base):
    __tablename__ = "airfleet_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cluster: Mapped[str] = mapped_column(String(63), index=True)
    cluster_uid: Mapped[str] = mapped_column(String(32), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(16))  # Transition | Normal | Warning
    from_phase: Mapped[str | None] = mapped_column(String(16))
    to_phase: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text, default="")
    run_id: Mapped[str | None] = mapped_column(String(250), index=True)  # a run's note
    # The fencing token of the lease the write was made under (None: no lease, e.g. a health
    # check). Per cluster, tokens in id order never go down: two runs never interleave.
    token: Mapped[int | None] = mapped_column(Integer, nullable=True)


class LeaseRow(Base):
    """A per-cluster lease. The row outlives releases so the fencing token only grows."""

    __tablename__ = "airfleet_leases"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(250))
    token: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SecretRow(Base):
    """A vault secret: only the envelope (ciphertext) is stored."""

    __tablename__ = "airfleet_vault_secrets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(16), index=True)
    envelope: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(String(250), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PolicyBindingRow(Base):
    """One policy bound to one action, for every cluster (scope ``*``) or for one cluster."""

    __tablename__ = "airfleet_policy_bindings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    scope: Mapped[str] = mapped_column(String(63))  # a cluster name, or "*" for all
    action: Mapped[str] = mapped_column(String(32))
    position: Mapped[int] = mapped_column(Integer)  # evaluation order within the action
    policy: Mapped[str] = mapped_column(String(63))
    version: Mapped[str | None] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(16))
    timeout_seconds: Mapped[float] = mapped_column(Float)
    memory_mb: Mapped[int] = mapped_column(Integer)
    url: Mapped[str | None] = mapped_column(Text)
    fail_open: Mapped[bool] = mapped_column(Boolean)
    params: Mapped[dict] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("scope", "action", "policy",
                                       name="uq_airfleet_policy_bindings"),)


class PolicyAuditRow(Base):
    """The audit trail of governance: every binding change and every decision."""

    __tablename__ = "airfleet_policy_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(16))  # bind | unbind | decision
    cluster: Mapped[str | None] = mapped_column(String(63), index=True)  # None: global scope
    action: Mapped[str] = mapped_column(String(32))
    policy: Mapped[str | None] = mapped_column(String(63))
    version: Mapped[str | None] = mapped_column(String(16))
    mode: Mapped[str | None] = mapped_column(String(16))
    allowed: Mapped[bool | None] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text)
    run_id: Mapped[str | None] = mapped_column(String(250))
    actor: Mapped[str | None] = mapped_column(String(250))


class EndpointRow(Base):
    """One version of an endpoint (airfleet.endpoints), in one incarnation: a deleted version
    keeps its row (deleted_at set) and its history."""

    __tablename__ = "airfleet_endpoints"

    uid: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    version: Mapped[str] = mapped_column(String(20))
    cluster: Mapped[str] = mapped_column(String(63), index=True)
    served_model: Mapped[str] = mapped_column(String(256))
    phase: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict] = mapped_column(JSON)
    labels: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[dict] = mapped_column(JSON)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    observed_generation: Mapped[int] = mapped_column(Integer, default=0)
    # Optimistic concurrency, as on clusters ("version" is the endpoint's own).
    row_version: Mapped[int] = mapped_column(Integer, default=1)
    observed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("uq_airfleet_endpoints_live_version", "name", "version", unique=True,
              sqlite_where=text("deleted_at IS NULL"),
              postgresql_where=text("deleted_at IS NULL")),
    )


class EndpointEventRow(Base):
    __tablename__ = "airfleet_endpoint_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    endpoint: Mapped[str] = mapped_column(String(63), index=True)
    version: Mapped[str] = mapped_column(String(20))
    endpoint_uid: Mapped[str] = mapped_column(String(32), index=True)
    cluster: Mapped[str] = mapped_column(String(63))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(16))  # Transition | Normal | Warning
    from_phase: Mapped[str | None] = mapped_column(String(16))
    to_phase: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text, default="")
    run_id: Mapped[str | None] = mapped_column(String(250), index=True)
