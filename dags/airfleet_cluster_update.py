"""
### Update a cluster to a desired spec

Conf: `{"cluster": <the whole desired cluster>}`; the cluster must be registered and keep its
type and provider.

validate -> lease -> policy `update_cluster` (and `scale_nodegroup` for each node pool whose
size or bounds change) -> record the desired spec (generation + 1 when it changed) -> Updating
-> node pools to the spec (eks/aks; each wait in the triggerer) -> detect accelerators -> drain
the removed workers (`ray drain-node`, waiting in the triggerer up to the spec's
`drain_deadline_seconds`, then a forced stop) -> converge (new workers join; kubernetes:
objects patched to the spec) -> wait until ready -> Running. A changed head is refused.
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
    flow.guarded(
        lease,
        flow.policy_precheck(checked, "update_cluster"),
        flow.record_desired(checked, lease),
        flow.begin.override(task_id="updating")(lease, "Updating", "Update"),
        CloudReconcileOperator(task_id="scale_node_pools", lease=lease, verb="scale"),
        DetectAcceleratorsOperator(task_id="detect_accelerators", lease=lease),
        RayDrainNodesOperator(task_id="drain_removed_workers", lease=lease),
        flow.backend_step.override(task_id="apply")(lease, "apply"),
        WaitReadyOperator(task_id="wait_ready", lease=lease),
        flow.finish.override(task_id="running")(lease, "Running", "Updated"),
    )


airfleet_cluster_update()
