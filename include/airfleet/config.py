"""Airfleet's own settings, read from environment variables with documented defaults.

- ``AIRFLEET_DATABASE_URL``: the store. Default: ``sqlite:///$AIRFLOW_HOME/airfleet.db``
  (``AIRFLOW_HOME`` defaults to ``~/airflow``, as in Airflow).
- ``AIRFLEET_KEYS_DIR``: the vault's key pair. Default: ``$AIRFLOW_HOME/airfleet-keys``.
- ``AIRFLEET_POLICIES_DIR``: governance policies. Default: the repository's ``policies/``.
- ``AIRFLEET_READY_INLINE_SECONDS``: how long a readiness wait watches inside its task before
  it moves to Airflow's triggerer (freeing the worker slot). Default: 30.
- ``AIRFLEET_CLOUD_POLL_SECONDS``: how often a wait on EKS or AKS (cluster, node pool,
  operation) asks the cloud again, in the triggerer. Default: 30.
- ``AIRFLEET_LEASE_SECONDS``: how long a flow's lease on a cluster lasts unless renewed; a
  wait in Airflow's triggerer renews it every third of that. Default: 3600.
- ``AIRFLEET_HEALTH_SHARDS``: how many task instances the scheduled health check splits the
  fleet into (Airflow runs them at once, on as many worker slots). Default: 2.
"""

from __future__ import annotations

import os
from pathlib import Path


def airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")


def database_url() -> str:
    url = os.environ.get("AIRFLEET_DATABASE_URL")
    if url:
        return url
    return f"sqlite:///{airflow_home() / 'airfleet.db'}"


def keys_dir() -> Path:
    return Path(os.environ.get("AIRFLEET_KEYS_DIR") or airflow_home() / "airfleet-keys")


def policies_dir() -> Path:
    default = Path(__file__).resolve().parents[2] / "policies"
    return Path(os.environ.get("AIRFLEET_POLICIES_DIR") or default)


def ready_inline_seconds() -> float:
    return float(os.environ.get("AIRFLEET_READY_INLINE_SECONDS") or 30)


def resume_after_seconds() -> float:
    """How long after a wait began in the triggerer its task may resume at the soonest (see
    ``airfleet_airflow.triggers.LeaseKeepingTrigger``)."""
    return float(os.environ.get("AIRFLEET_RESUME_AFTER_SECONDS") or 10)


def cloud_poll_seconds() -> float:
    return float(os.environ.get("AIRFLEET_CLOUD_POLL_SECONDS") or 30)


def health_concurrency() -> int:
    """How many clusters one health check probes at once."""
    return int(os.environ.get("AIRFLEET_HEALTH_CONCURRENCY", "50"))


def health_shards() -> int:
    """How many parts the health check splits the fleet into, each a task instance of its own
    (one event loop uses one core: 10,000 clusters need more than one)."""
    raw = os.environ.get("AIRFLEET_HEALTH_SHARDS") or "2"
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise ValueError(f"AIRFLEET_HEALTH_SHARDS={raw!r}: set it to a whole number from 1 to 64 "
                         "(the task instances one health check runs at once)")
    return int(raw)


def health_timeout() -> float:
    """Seconds one cluster's health probe may take before it counts as failed."""
    return float(os.environ.get("AIRFLEET_HEALTH_TIMEOUT_SECONDS", "20"))


def lease_seconds() -> float:
    """Seconds a cluster lease lasts from its last renewal (at least 1)."""
    seconds = float(os.environ.get("AIRFLEET_LEASE_SECONDS") or 3600)
    if seconds < 1:
        raise ValueError(f"AIRFLEET_LEASE_SECONDS={seconds:g}: a lease must last at least 1 s")
    return seconds
