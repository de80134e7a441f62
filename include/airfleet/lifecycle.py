"""The cluster state machine: the one place that decides which phase may follow which.

Seed contract (ARCHITECTURE.md) plus the transient phases a running flow shows::

    Pending      -> Provisioning | Running | Failed | Deleting | Deleted
    Provisioning -> Running | Failed | Deleting
    Running      -> Provisioning | Updating | Failed | Deleting | Deleted
    Updating     -> Running | Failed | Deleting
    Failed       -> Failed | Provisioning | Updating | Running | Deleting | Deleted
    Deleting     -> Deleted | Failed
    Deleted is final.

Running -> Provisioning is a re-run of create converging an existing cluster. Failed -> Running
happens only when a health check or a flow observes the cluster healthy again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from airfleet.errors import IllegalTransition
from airfleet.resources import Phase

P = Phase
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    P.PENDING: frozenset({P.PROVISIONING, P.RUNNING, P.FAILED, P.DELETING, P.DELETED}),
    P.PROVISIONING: frozenset({P.RUNNING, P.FAILED, P.DELETING}),
    P.RUNNING: frozenset({P.PROVISIONING, P.UPDATING, P.FAILED, P.DELETING, P.DELETED}),
    P.UPDATING: frozenset({P.RUNNING, P.FAILED, P.DELETING}),
    P.FAILED: frozenset({P.FAILED, P.PROVISIONING, P.UPDATING, P.RUNNING, P.DELETING, P.DELETED}),
    P.DELETING: frozenset({P.DELETED, P.FAILED}),
    P.DELETED: frozenset(),
}
TRANSIENT = frozenset({P.PROVISIONING, P.UPDATING, P.DELETING})

# An endpoint version (airfleet.endpoints): Deploying while a deploy or scale flow runs;
# Running <-> Failed follows health checks, as for clusters. Deleted is final.
ENDPOINT_TRANSITIONS: dict[str, frozenset[str]] = {
    "Pending": frozenset({"Deploying", "Failed", "Deleted"}),
    "Deploying": frozenset({"Running", "Failed", "Deleted"}),
    "Running": frozenset({"Deploying", "Failed", "Deleted"}),
    "Failed": frozenset({"Deploying", "Running", "Failed", "Deleted"}),
    "Deleted": frozenset(),
}


@dataclass(frozen=True)
class Transition:
    """One step of a cluster's history: what changed, when, why, and which run did it."""

    cluster: str
    from_phase: Phase
    to_phase: Phase
    reason: str
    run_id: str | None
    at: datetime


def check(current: Phase, target: Phase) -> None:
    """Raise :class:`IllegalTransition` unless ``current -> target`` is allowed."""
    _check(TRANSITIONS, "a cluster", current, target)


def check_endpoint(current: str, target: str) -> None:
    """:func:`check` for an endpoint version's phases."""
    _check(ENDPOINT_TRANSITIONS, "an endpoint", str(current), str(target))


def _check(table: dict, what: str, current, target) -> None:
    if target not in table[current]:
        allowed = ", ".join(sorted(table[current])) or "nothing (final)"
        raise IllegalTransition(
            f"cannot go from {current} to {target}; from {current} {what} may go to {allowed}")


def transition(cluster: str, current: Phase, target: Phase, *, reason: str,
               run_id: str | None = None) -> Transition:
    """Check ``current -> target`` and return the event that records it."""
    check(Phase(current), Phase(target))
    return Transition(cluster, Phase(current), Phase(target), reason, run_id, datetime.now(UTC))
