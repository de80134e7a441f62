"""
### Onboard an existing cluster

Conf: `{"cluster": {"metadata": {"name": ...}, "spec": {...}}}` describing a cluster that
already runs.

Tasks: `admit` (validate -> lease -> policy `onboard_cluster` -> register, sealed credentials
into the vault) -> `discover` it read-only (nodes, health; kubernetes: access and
permissions) -> `detect_accelerators` -> `install_missing` (only what is missing; kubernetes:
namespace, router, metrics, ...) -> `wait_ready` (then Running); `release_lease` (teardown,
whatever happened) and `watcher`. Nothing that runs is restarted or changed.

`"dry_run": true` in the conf: the actions and the policies' decisions are reported by
`admit`, and nothing else runs.
"""

from __future__ import annotations

from airflow.sdk import dag

from airfleet_airflow import deadlines, flow
from airfleet_airflow.operators import DetectAcceleratorsOperator, WaitReadyOperator


@dag(dag_id="airfleet_cluster_onboard", schedule=None, catchup=False, tags=flow.TAGS,
     params=flow.flow_params("onboard"), default_args=flow.DEFAULT_ARGS,
     deadline=deadlines.alerts("onboard"), doc_md=__doc__)
def airfleet_cluster_onboard():
    lease = flow.admit("onboard")
    flow.guarded(
        lease,
        flow.backend_step.override(task_id="discover")(lease, "query"),
        DetectAcceleratorsOperator(task_id="detect_accelerators", lease=lease),
        flow.backend_step.override(task_id="install_missing")(lease, "install_missing"),
        WaitReadyOperator(task_id="wait_ready", lease=lease, finish=("Running", "Onboarded")),
    )


airfleet_cluster_onboard()
