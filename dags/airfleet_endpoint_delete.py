"""
### Delete an endpoint, or one of its versions

Conf: `{"name": "..."}` (every version) or `{"name": "...", "version": "v1"}`.

`admit` (validate -> the cluster's lease -> policy `delete_endpoint`) -> `delete`: route the
model away from the versions (the ones that stay take their share) -> remove their engines -> verify they are
gone -> Deleted; `release_lease` (teardown, whatever happened) and `watcher`. What cannot be removed fails the run, each item named, and the version stays
recorded (Failed). Deleting an endpoint that is not registered is already done.

`"dry_run": true`: the action and the policies' decisions are reported by `admit`; nothing
else runs.
"""

from __future__ import annotations

from airflow.sdk import dag

from airfleet_airflow import deadlines, flow
from airfleet_airflow import endpoint_flow as ep


@dag(dag_id="airfleet_endpoint_delete", schedule=None, catchup=False, tags=flow.TAGS,
     params=ep.endpoint_params("endpoint_delete"), default_args=flow.DEFAULT_ARGS,
     deadline=deadlines.alerts("endpoint_delete"),
     doc_md=__doc__)
def airfleet_endpoint_delete():
    admitted = ep.admit("endpoint_delete")
    ep.guarded(admitted, ep.delete(admitted))


airfleet_endpoint_delete()
