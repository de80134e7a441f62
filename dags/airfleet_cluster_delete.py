"""
### Delete a cluster

Conf: `{"name": "llm-a", "force": false}`.

validate -> lease -> policy `delete_cluster` -> Deleting -> tear down (ssh: workers, then the
head, then a check that nothing is left; kubernetes: the namespace, waiting in the triggerer
until Kubernetes has removed it) -> deprovision (eks/aks: the node pools, then the managed
cluster; each wait in the triggerer) -> Deleted. What is left fails the run, each item named;
with `"force": true` it is recorded (`status.left_behind`, `LeftBehind` events) and the
cluster ends Deleted all the same. A cluster that is not registered is already gone: the run
succeeds and changes nothing.

`"dry_run": true` in the conf: the actions and the policies' decisions are reported by
`validate`, and nothing else runs.
"""

from __future__ import annotations

from airflow.sdk import dag

from airfleet_airflow import flow
from airfleet_airflow.operators import CloudReconcileOperator, TeardownOperator


@dag(dag_id="airfleet_cluster_delete", schedule=None, catchup=False, tags=flow.TAGS,
     params=flow.flow_params("delete"), default_args=flow.DEFAULT_ARGS, doc_md=__doc__)
def airfleet_cluster_delete():
    checked = flow.validate("delete")
    lease = flow.acquire_lease(checked)
    approved = flow.policy_precheck(checked)
    flow.guarded(
        lease,
        flow.is_registered(lease),
        approved,
        flow.begin.override(task_id="deleting")(lease, "Deleting", "Delete"),
        TeardownOperator(task_id="teardown", lease=lease, checked=checked),
        CloudReconcileOperator(task_id="deprovision", lease=lease, verb="deprovision"),
        flow.deleted(lease),
    )


airfleet_cluster_delete()
