"""Deadline alerts on the lifecycle DAGs, with Airflow 3's own Deadline Alerts.

Each lifecycle DAG carries two (:func:`alerts`):

- **past its usual time**: Airflow's ``AVERAGE_RUNTIME`` reference (the mean duration of the
  DAG's last 10 ended runs, once 3 have ended), plus a slack;
- **past its ceiling**: a fixed time after the run was queued, whatever its history.

A missed deadline does not stop the run. The scheduler hands the callback to the triggerer,
which runs :func:`missed`: it logs, and writes a ``DeadlineMissed`` warning into the history of
the cluster (or endpoint) the run is about, so ``airfleet history`` and the fleet view show it.

Per flow, from the environment of the DAG processor (seconds, a positive number):
``AIRFLEET_DEADLINE_<FLOW>_SECONDS`` (the ceiling) and ``AIRFLEET_DEADLINE_<FLOW>_SLACK_SECONDS``
(the slack over the average), ``<FLOW>`` being ``CREATE``, ``UPDATE``, ``ONBOARD``,
``DELETE``, ``ENDPOINT_DEPLOY``, ``ENDPOINT_SCALE`` or ``ENDPOINT_DELETE``. A value that is not
a positive number fails the DAG's import, naming the variable.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import timedelta
from typing import Any

from airflow.sdk.definitions.callback import AsyncCallback
from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference

log = logging.getLogger(__name__)

# Defaults, in seconds: (ceiling after queued, slack over the average). An EKS or AKS create
# takes 15-25 minutes; a static-nodes create a minute or two.
DEFAULTS: dict[str, tuple[float, float]] = {
    "create": (3600, 600), "update": (3600, 600), "onboard": (1800, 300),
    "delete": (3600, 600), "endpoint_deploy": (1800, 300), "endpoint_scale": (1200, 300),
    "endpoint_delete": (1200, 300)}
AVERAGE_OF, AVERAGE_FROM = 10, 3  # the last 10 ended runs, once there are 3
CALLBACK = f"{__name__}.missed"


def alerts(flow: str, *, ceiling: float | None = None,
           slack: float | None = None) -> list[DeadlineAlert]:
    """The flow's two deadline alerts, as configured in the environment (or as given)."""
    prefix = f"AIRFLEET_DEADLINE_{flow.upper()}"
    ceiling_s = seconds(f"{prefix}_SECONDS", DEFAULTS[flow][0], ceiling)
    slack_s = seconds(f"{prefix}_SLACK_SECONDS", DEFAULTS[flow][1], slack)
    return [
        DeadlineAlert(
            name=f"{flow} past its usual time",
            reference=DeadlineReference.AVERAGE_RUNTIME(AVERAGE_OF, AVERAGE_FROM),
            interval=slack_s,
            callback=AsyncCallback(CALLBACK, kwargs={
                "flow": flow, "expected": f"usual time (the mean of its last {AVERAGE_OF} "
                                          f"runs plus {slack_s.total_seconds():g} s)"})),
        DeadlineAlert(
            name=f"{flow} past its ceiling",
            reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=ceiling_s,
            callback=AsyncCallback(CALLBACK, kwargs={
                "flow": flow,
                "expected": f"ceiling ({ceiling_s.total_seconds():g} s after it was queued)"})),
    ]


def seconds(variable: str, default: float, given: float | None = None) -> timedelta:
    raw = str(given) if given is not None else os.environ.get(variable)
    if raw is None:
        return timedelta(seconds=default)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{variable}={raw!r}: a deadline is a positive number of seconds, "
                         f"e.g. {variable}={default:g}")
    return timedelta(seconds=value)


async def missed(flow: str, expected: str, context: dict[str, Any] | None = None) -> str:
    """The triggerer's callback for a missed deadline: log it, note it in the history."""
    run = (context or {}).get("dag_run") or {}
    deadline = ((context or {}).get("deadline") or {}).get("deadline_time")
    run_id = f"{run.get('dag_id')}/{run.get('dag_run_id') or run.get('run_id')}"
    if run.get("state") not in ("queued", "running"):
        # Airflow prunes a run's deadlines only when it succeeds: a failed run's fire later,
        # and "still running" would be false. Its failure is in its own history already.
        message = (f"the {flow} run {run_id} had ended ({run.get('state')}) before its "
                   f"{expected}, deadline {deadline}: nothing to note")
        log.info("Deadline passed after the run ended: %s", message)
        return message
    message = (f"the {flow} run {run_id} is still running past its {expected}, deadline "
               f"{deadline}; it goes on: look at the run, or mark it failed to stop it")
    log.warning("Deadline missed: %s", message)
    where = await asyncio.to_thread(_record, flow, run.get("conf") or {}, run_id, message)
    return f"{message} ({where})"


def _record(flow: str, conf: dict[str, Any], run_id: str, message: str) -> str:
    from airfleet.errors import AirfleetError
    from airfleet.store import Store

    store = Store()
    try:
        if flow.startswith("endpoint_"):
            name = conf.get("name") or conf["endpoint"]["metadata"]["name"]
            versions = ([conf["version"]] if conf.get("version") else
                        [r.version for r in store.endpoint_versions(name)])
            for version in versions:
                store.record_endpoint_event(name, version, "DeadlineMissed", message,
                                            run_id=run_id, kind="Warning")
            return f"noted in the history of endpoint {name}"
        name = conf.get("name") or conf["cluster"]["metadata"]["name"]
        store.record_event(name, "DeadlineMissed", message, run_id=run_id, kind="Warning")
        return f"noted in the history of cluster {name}"
    except (KeyError, TypeError, AirfleetError) as exc:  # not registered (yet), or bad conf
        log.warning("Deadline missed, not noted in a history: %s", exc)
        return f"not noted in a history: {exc}"
