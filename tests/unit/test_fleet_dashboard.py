"""The cluster page tells people how to reach a static-nodes cluster's Ray dashboard, which
answers on the head's loopback only: an SSH forward of their own, then a local URL."""

from __future__ import annotations

from airfleet import fleet
from airfleet.resources import ClusterRequest
from airfleet.store import Store


def register(store: Store, name: str, spec: dict):
    request = ClusterRequest.model_validate({"metadata": {"name": name}, "spec": spec})
    record, _ = store.register_cluster(request, run_id="create/1", token=None)
    return record


def test_a_static_nodes_cluster_page_says_how_to_reach_its_dashboard(airfleet_home):
    store = Store()
    store.migrate()
    record = register(store, "gpu-lab", {"type": "ssh", "provider": "static", "config": {"ssh": {
        "head": "10.0.0.1", "workers": ["10.0.0.2"], "port": 2222, "user": "ops",
        "credential": {"airflow_conn_id": "ssh_fleet"}, "ray": {"dashboard_port": 8266}}}})
    assert fleet.detail(record)["dashboard"] == {
        "ssh": "ssh -N -L 8266:127.0.0.1:8266 -p 2222 ops@10.0.0.1",
        "url": "http://127.0.0.1:8266"}

    other = register(store, "k8s", {"type": "kubernetes", "provider": "existing", "config": {
        "kubernetes": {"credential": {"airflow_conn_id": "k8s"}}}})
    assert fleet.detail(other)["dashboard"] is None
    store.dispose()
