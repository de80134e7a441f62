"""
### Update a cluster to a desired spec

Conf: `{"cluster": <the whole desired cluster>}`; the cluster must be registered and keep its
type and provider.

validate -> lease -> policies on each action (`update_cluster` for config changes, `add_node` /
`remove_node` per worker, `scale_nodegroup` per node pool whose size or bounds change; a policy
may lower a size) -> record the desired spec (generation + 1 when it changed) -> Updating
-> node pools to the spec (eks/aks; each wait in the triggerer) -> detect accelerators -> drain
the removed workers (`ray drain-node`, waiting in the triggerer up to the spec's
`drain_deadline_seconds`, then a forced stop) -> converge (new workers join; kubernetes:
objects patched to the spec) -> wait until ready -> Running. A changed head is refused.

`"dry_run": true` in the conf: the actions and the policies' decisions are reported by
`validate`, and nothing else runs.
"""

from __future__ import annotations

from airflow.sdk import dag

from airfleet_airflow import flow
from airfleet_airflow.operators import (
    CloudReconcileOperator,
    DetectAcceleratorsOperator,
    RayDrainNodesOperator,
    WaitReadyOperator,
)


@dag(dag_id="airfleet_cluster_update", schedule=None, catchup=False, tags=flow.TAGS,
     params=flow.flow_params("update"), default_args=flow.DEFAULT_ARGS, doc_md=__doc__)
def airfleet_cluster_update():
    checked = flow.validate("update")
    lease = flow.acquire_lease(checked)
    approved = flow.policy_precheck(checked)
    flow.guarded(
        lease,
        approved,
        flow.record_desired(approved, lease),
        flow.begin.override(task_id="updating")(lease, "Updating", "Update"),
        CloudReconcileOperator(task_id="scale_node_pools", lease=lease, verb="scale"),
        DetectAcceleratorsOperator(task_id="detect_accelerators", lease=lease),
        RayDrainNodesOperator(task_id="drain_removed_workers", lease=lease),
        flow.backend_step.override(task_id="apply")(lease, "apply"),
        WaitReadyOperator(task_id="wait_ready", lease=lease),
        flow.finish.override(task_id="running")(lease, "Running", "Updated"),
    )


airfleet_cluster_update()
