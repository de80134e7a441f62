"""
### Create a cluster

Conf: `{"cluster": {"metadata": {"name": ...}, "spec": {...}}}` (see README).

validate -> lease -> policy `create_cluster` -> register -> Provisioning -> provision
(eks/aks) -> detect accelerators (Ray nodes start with the GPUs found) -> set up (ssh: Ray head,
then the workers; kubernetes: access and permission check, namespace, pull secret, router,
metrics, model caches) -> wait until ready (kubernetes: the Deployments Available; a long wait
moves to the triggerer) -> Running. Re-running converges: what exists is adopted.
"""

from __future__ import annotations

from airflow.sdk import dag

from airfleet_airflow import flow
from airfleet_airflow.operators import DetectAcceleratorsOperator, WaitReadyOperator


@dag(dag_id="airfleet_cluster_create", schedule=None, catchup=False, tags=flow.TAGS,
     params=flow.flow_params("create"), default_args=flow.DEFAULT_ARGS, doc_md=__doc__)
def airfleet_cluster_create():
    checked = flow.validate("create")
    lease = flow.acquire_lease(checked)
    flow.guarded(
        lease,
        flow.policy_precheck(checked, "create_cluster"),
        flow.register(checked, lease),
        flow.begin.override(task_id="provisioning")(lease, "Provisioning", "Create"),
        flow.backend_step.override(task_id="provision")(lease, "provision"),
        DetectAcceleratorsOperator(task_id="detect_accelerators", lease=lease),
        flow.backend_step.override(task_id="apply")(lease, "apply"),
        WaitReadyOperator(task_id="wait_ready", lease=lease),
        flow.finish.override(task_id="running")(lease, "Running", "Created"),
    )


airfleet_cluster_create()
