"""A downstream DAG as a user would write one: scheduled on a cluster's asset, it runs each
time an Airfleet flow announces that cluster's phase (here it only prints the event)."""

from __future__ import annotations

from airflow.sdk import Asset, dag, task


@task
def deploy_endpoint(**context) -> dict:
    events = context["triggering_asset_events"]
    seen = [dict(e.extra) for evs in events.values() for e in evs]
    print(f"triggered by cluster asset events: {seen}")
    return seen[-1]


@dag(dag_id="e2e_on_cluster_running", schedule=Asset("airfleet://cluster/e2e-asset"),
     catchup=False, tags=["e2e"])
def e2e_on_cluster_running():
    deploy_endpoint()


e2e_on_cluster_running()
