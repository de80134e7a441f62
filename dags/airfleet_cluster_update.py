"""
### Update a cluster to a desired spec

Conf: `{"cluster": <the whole desired cluster>}`; the cluster must be registered and keep its
type and provider.

Tasks: `admit` -> `scale_node_pools` -> `detect_accelerators` -> `drain_removed_workers` ->
`apply` -> `wait_ready`; `release_lease` (teardown, whatever happened) and `watcher`.

- `admit`: validate -> lease -> policies on each action (`update_cluster` for config changes,
  `add_node` / `remove_node` per worker, `scale_nodegroup` per node pool whose size or bounds
  change; a policy may lower a size) -> record the desired spec (generation + 1 when it
  changed) -> Updating.
- `scale_node_pools`: node pools to the spec (eks/aks; each wait in the triggerer).
- `drain_removed_workers`: `ray drain-node`, waiting in the triggerer up to the spec's
  `drain_deadline_seconds`, then a forced stop.
- `apply`: converge (new workers join; kubernetes: objects patched to the spec).
- `wait_ready`: wait until ready -> Running.

A changed head is refused.

`"dry_run": true` in the conf: the actions and the policies' decisions are reported by
`admit`, and nothing else runs.
"""

from __future__ import annotations

from airflow.sdk import dag

from airfleet_airflow import deadlines, flow
from airfleet_airflow.operators import (
    CloudReconcileOperator,
    DetectAcceleratorsOperator,
    RayDrainNodesOperator,
    WaitReadyOperator,
)


@dag(dag_id="airfleet_cluster_update", schedule=None, catchup=False, tags=flow.TAGS,
     params=flow.flow_params("update"), default_args=flow.DEFAULT_ARGS,
     deadline=deadlines.alerts("update"), doc_md=__doc__)
def airfleet_cluster_update():
    lease = flow.admit("update")
    flow.guarded(
        lease,
        CloudReconcileOperator(task_id="scale_node_pools", lease=lease, verb="scale"),
        DetectAcceleratorsOperator(task_id="detect_accelerators", lease=lease),
        RayDrainNodesOperator(task_id="drain_removed_workers", lease=lease),
        flow.backend_step.override(task_id="apply")(lease, "apply"),
        WaitReadyOperator(task_id="wait_ready", lease=lease, finish=("Running", "Updated")),
    )


airfleet_cluster_update()
