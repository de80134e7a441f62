"""
### Update a cluster to a desired spec

Conf: `{"cluster": <the whole desired cluster>}`; the cluster must be registered and keep its
type and provider.

Tasks: `admit` -> `apply` -> `wait_ready`; `release_lease` (teardown, whatever happened) and
`watcher`.

- `admit`: validate -> lease -> policies on each action (`update_cluster` for config changes,
  `add_node` / `remove_node` per worker, `scale_nodegroup` per node pool whose size or bounds
  change; a policy may lower a size) -> record the desired spec (generation + 1 when it
  changed) -> Updating.
- `apply`, in one task: node pools to the spec (eks/aks; each wait in the triggerer) ->
  detect accelerators -> drain the workers the spec no longer lists (`ray drain-node`,
  waiting in the triggerer up to the spec's `drain_deadline_seconds`, then a forced stop) ->
  converge (new workers join; kubernetes: objects patched to the spec).
- `wait_ready`: wait until ready -> Running.

A changed head is refused.

`"dry_run": true` in the conf: the actions and the policies' decisions are reported by
`admit`, and nothing else runs.
"""

from __future__ import annotations

from airflow.sdk import dag

from airfleet_airflow import deadlines, flow
from airfleet_airflow.operators import CloudReconcileOperator, WaitReadyOperator


@dag(dag_id="airfleet_cluster_update", schedule=None, catchup=False, tags=flow.TAGS,
     params=flow.flow_params("update"), default_args=flow.DEFAULT_ARGS,
     deadline=deadlines.alerts("update"), doc_md=__doc__)
def airfleet_cluster_update():
    lease = flow.admit("update")
    flow.guarded(
        lease,
        CloudReconcileOperator(task_id="apply", lease=lease, verb="scale",
                               then=["detect_accelerators", "drain_nodes", "apply"]),
        WaitReadyOperator(task_id="wait_ready", lease=lease, finish=("Running", "Updated")),
    )


airfleet_cluster_update()
