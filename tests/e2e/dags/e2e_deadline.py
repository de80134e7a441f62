"""A flow that overruns: Airfleet's deadline alerts (airfleet_airflow.deadlines, as on every
lifecycle DAG) with a 3 s ceiling, on a task that takes 20 s. The scheduler sees the deadline
pass and the triggerer runs Airfleet's callback, which notes it in the cluster's history."""

from __future__ import annotations

import time

from airflow.sdk import Param, dag, task

from airfleet_airflow import deadlines


@task
def overrun() -> None:
    time.sleep(20)


@dag(dag_id="e2e_deadline", schedule=None, catchup=False, tags=["e2e"],
     params={"name": Param("e2e-deadline", type="string")},
     deadline=deadlines.alerts("update", ceiling=3))
def e2e_deadline():
    overrun()


e2e_deadline()
