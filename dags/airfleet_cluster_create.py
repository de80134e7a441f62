"""
### Create a cluster

Conf: `{"cluster": {"metadata": {"name": ...}, "spec": {...}}}` (see README).

Tasks: `admit` -> `set_up` -> `wait_ready`; `release_lease` (teardown), `cleanup_on_failure`
and `watcher` when something fails.

- `admit`: validate (reads only: a bad conf fails here, before anything changes) -> the
  cluster's lease -> policy `create_cluster` (a deny fails the run, the cluster untouched) ->
  register -> Provisioning.
- `set_up`: provision (eks/aks: the cluster and its node pools, each wait in the triggerer)
  -> detect accelerators (Ray nodes start with the GPUs found) -> set up (ssh: Ray head, then
  the workers; kubernetes: access and permission check, namespace, pull secret, router,
  metrics, model caches).
- `wait_ready`: wait until ready (kubernetes: the Deployments Available; a long wait moves to
  the triggerer) -> Running.
- `release_lease` frees the lease whatever happened (even when `admit` failed after taking
  it) and announces the phase on the cluster's asset.

Re-running converges: what exists is adopted. When a step fails, `cleanup_on_failure` removes
the cloud resources this run created (eks/aks, unless `delete_on_failure` is false; never what
it adopted).

`"dry_run": true` in the conf: the actions and the policies' decisions are reported by
`admit`, and nothing else runs.
"""

from __future__ import annotations

from airflow.sdk import dag

from airfleet_airflow import deadlines, flow
from airfleet_airflow.operators import (
    CleanupFailedRunOperator,
    CloudReconcileOperator,
    WaitReadyOperator,
)


@dag(dag_id="airfleet_cluster_create", schedule=None, catchup=False, tags=flow.TAGS,
     params=flow.flow_params("create"), default_args=flow.DEFAULT_ARGS,
     deadline=deadlines.alerts("create"), doc_md=__doc__)
def airfleet_cluster_create():
    lease = flow.admit("create")
    flow.guarded(
        lease,
        CloudReconcileOperator(task_id="set_up", lease=lease, verb="provision",
                               then=["detect_accelerators", "apply"]),
        WaitReadyOperator(task_id="wait_ready", lease=lease, finish=("Running", "Created")),
        CleanupFailedRunOperator(task_id="cleanup_on_failure"),
    )


airfleet_cluster_create()
