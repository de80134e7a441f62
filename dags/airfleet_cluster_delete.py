"""
### Delete a cluster

Conf: `{"name": "llm-a", "force": false}`.

Tasks: `admit` -> `teardown` -> `deprovision` -> `deleted`; `release_lease` (teardown,
whatever happened) and `watcher`.

- `admit`: validate -> lease -> policy `delete_cluster` -> Deleting.
- `teardown`: ssh: workers, then the head, then a check that nothing is left; kubernetes: the
  namespace, waiting in the triggerer until Kubernetes has removed it.
- `deprovision`: eks/aks: the node pools, then the managed cluster; each wait in the
  triggerer.
- `deleted`: Deleted.

What is left fails the run, each item named; with `"force": true` it is recorded
(`status.left_behind`, `LeftBehind` events) and the cluster ends Deleted all the same. A
cluster that is not registered is already gone: the run succeeds and changes nothing.

`"dry_run": true` in the conf: the actions and the policies' decisions are reported by
`admit`, and nothing else runs.
"""

from __future__ import annotations

from airflow.sdk import dag

from airfleet_airflow import deadlines, flow
from airfleet_airflow.operators import CloudReconcileOperator, TeardownOperator


@dag(dag_id="airfleet_cluster_delete", schedule=None, catchup=False, tags=flow.TAGS,
     params=flow.flow_params("delete"), default_args=flow.DEFAULT_ARGS,
     deadline=deadlines.alerts("delete"), doc_md=__doc__)
def airfleet_cluster_delete():
    lease = flow.admit("delete")  # also says the conf's force
    flow.guarded(
        lease,
        TeardownOperator(task_id="teardown", lease=lease, checked=lease),
        CloudReconcileOperator(task_id="deprovision", lease=lease, verb="deprovision"),
        flow.deleted(lease),
    )


airfleet_cluster_delete()
