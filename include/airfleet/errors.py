"""Typed errors of the core. Each says what went wrong and what to do about it."""

from __future__ import annotations


class AirfleetError(Exception):
    """Base class for every error Airfleet raises on purpose."""


class InvalidRequest(AirfleetError):
    """The request (DAG conf, CLI input) is malformed; nothing was changed."""


class BackendUnavailable(AirfleetError):
    """No backend is registered for a cluster type."""


class IllegalTransition(AirfleetError):
    """A lifecycle transition the state machine does not allow."""


class ClusterUnhealthy(AirfleetError):
    """A backend observed the cluster and found it not ready or not healthy."""


class NotFound(AirfleetError):
    """A cluster, lease or secret that does not exist."""


class Conflict(AirfleetError):
    """A write lost a race: stale version, or the name is taken."""


class LeaseHeld(Conflict):
    """Another run holds the cluster's lease."""


class StaleFencingToken(Conflict):
    """A write carried a fencing token older than the lease's current one."""


class VaultError(AirfleetError):
    """Sealing or unsealing failed; the vault fails closed."""


class TeardownIncomplete(AirfleetError):
    """A delete left something behind (and was not forced); the message lists each item."""
