"""A downstream DAG as a user would write one (README, "Downstream DAGs"): scheduled on a
cluster's asset, it deploys an endpoint each time an Airfleet flow announces the cluster
Running (and does nothing on the other phases announced: Failed, Deleted)."""

from __future__ import annotations

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, dag, task

CLUSTER = "e2e-asset"
ENDPOINT = {"metadata": {"name": "chat"},
            "spec": {"cluster": CLUSTER, "engine": "mock",
                     "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct", "served_name": "chat"}}}


@task.short_circuit
def cluster_is_running(**context) -> bool:
    events = context["triggering_asset_events"]
    seen = [dict(e.extra) for evs in events.values() for e in evs]
    print(f"triggered by cluster asset events: {seen}")
    return seen[-1]["phase"] == "Running"


@dag(dag_id="e2e_on_cluster_running", schedule=Asset(f"airfleet://cluster/{CLUSTER}"),
     catchup=False, tags=["e2e"])
def e2e_on_cluster_running():
    cluster_is_running() >> TriggerDagRunOperator(
        task_id="deploy_endpoint", trigger_dag_id="airfleet_endpoint_deploy",
        conf={"endpoint": ENDPOINT})


e2e_on_cluster_running()
