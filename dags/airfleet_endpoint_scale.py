"""
### Scale an endpoint version

Conf: `{"name": "...", "replicas": N}` (and `"version"` when the endpoint has more than one).

`admit`: validate (the endpoint is registered; the cluster holds that many replicas' GPUs)
-> the cluster's lease -> policy `scale_endpoint` (input: the version, from, to) -> record the
replicas (Deploying). Then `deploy` -> `wait_ready`: every replica ready -> Running;
`release_lease` (teardown, whatever happened) and `watcher`. Scaling to 0
keeps the version (and its weight) with no engine running.

`"dry_run": true`: the action and the policies' decisions are reported by `admit`; nothing
else runs.
"""

from __future__ import annotations

from airflow.sdk import dag

from airfleet_airflow import deadlines, flow
from airfleet_airflow import endpoint_flow as ep


@dag(dag_id="airfleet_endpoint_scale", schedule=None, catchup=False, tags=flow.TAGS,
     params=ep.endpoint_params("endpoint_scale"), default_args=flow.DEFAULT_ARGS,
     deadline=deadlines.alerts("endpoint_scale"),
     doc_md=__doc__)
def airfleet_endpoint_scale():
    admitted = ep.admit("endpoint_scale")
    ep.guarded(
        admitted,
        ep.deploy(admitted),
        ep.EndpointReadyOperator(task_id="wait_ready", checked=admitted),
    )


airfleet_endpoint_scale()
