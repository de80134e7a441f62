"""
### Create a cluster

Conf: `{"cluster": {"metadata": {"name": ...}, "spec": {...}}}` (see README).

validate -> lease -> policy `create_cluster` -> register -> Provisioning -> provision
(eks/aks: the cluster and its node pools, each wait in the triggerer) -> detect accelerators (Ray nodes start with the GPUs found) -> set up (ssh: Ray head,
then the workers; kubernetes: access and permission check, namespace, pull secret, router,
metrics, model caches) -> wait until ready (kubernetes: the Deployments Available; a long wait
moves to the triggerer) -> Running. Re-running converges: what exists is adopted. When a step
fails, `cleanup_on_failure` removes the cloud resources this run created (eks/aks, unless
`delete_on_failure` is false; never what it adopted).

`"dry_run": true` in the conf: the actions and the policies' decisions are reported by
`validate`, and nothing else runs.
"""

from __future__ import annotations

from airflow.sdk import dag

from airfleet_airflow import flow
from airfleet_airflow.operators import (
    CleanupFailedRunOperator,
    CloudReconcileOperator,
    DetectAcceleratorsOperator,
    WaitReadyOperator,
)


@dag(dag_id="airfleet_cluster_create", schedule=None, catchup=False, tags=flow.TAGS,
     params=flow.flow_params("create"), default_args=flow.DEFAULT_ARGS, doc_md=__doc__)
def airfleet_cluster_create():
    checked = flow.validate("create")
    lease = flow.acquire_lease(checked)
    approved = flow.policy_precheck(checked)
    flow.guarded(
        lease,
        approved,
        flow.register(approved, lease),
        flow.begin.override(task_id="provisioning")(lease, "Provisioning", "Create"),
        CloudReconcileOperator(task_id="provision", lease=lease, verb="provision"),
        DetectAcceleratorsOperator(task_id="detect_accelerators", lease=lease),
        flow.backend_step.override(task_id="apply")(lease, "apply"),
        WaitReadyOperator(task_id="wait_ready", lease=lease),
        flow.finish.override(task_id="running")(lease, "Running", "Created"),
        CleanupFailedRunOperator(task_id="cleanup_on_failure"),
    )


airfleet_cluster_create()
