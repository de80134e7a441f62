"""
### Deploy an endpoint version (create or update)

Conf: `{"endpoint": {"metadata": {"name"}, "spec": {"cluster", "engine", "model", "replicas",
"resources", "engine_args", "max_model_len", "version", "traffic_weight"}}}`.

`admit`: validate (the cluster is registered and Running, has the model cache and the GPUs;
the version's weight and the others' share sum to 100) -> the *cluster's* lease (no cluster
flow runs meanwhile) -> policy `deploy_endpoint` -> record the version (Deploying) and the
weights. Then `deploy` (Kubernetes: a Deployment per version and the router's weights; static nodes: a Ray
Serve application) -> `wait_ready`: every replica ready -> Running, or Failed naming what is
not ready; `release_lease` (teardown, whatever happened) and `watcher`. Re-running converges; deploying a version again with another `traffic_weight`
shifts traffic without restarting anything.

`"dry_run": true`: the action and the policies' decisions are reported by `admit`; nothing
else runs. Each run announces the version's phase on the asset `airfleet://endpoint/<name>`.
"""

from __future__ import annotations

from airflow.sdk import dag

from airfleet_airflow import deadlines, flow
from airfleet_airflow import endpoint_flow as ep


@dag(dag_id="airfleet_endpoint_deploy", schedule=None, catchup=False, tags=flow.TAGS,
     params=ep.endpoint_params("endpoint_deploy"), default_args=flow.DEFAULT_ARGS,
     deadline=deadlines.alerts("endpoint_deploy"),
     doc_md=__doc__)
def airfleet_endpoint_deploy():
    admitted = ep.admit("endpoint_deploy")
    ep.guarded(
        admitted,
        ep.deploy(admitted),
        ep.EndpointReadyOperator(task_id="wait_ready", checked=admitted),
    )


airfleet_endpoint_deploy()
