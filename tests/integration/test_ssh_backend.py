"""The static-nodes backend end to end: real sshd hosts (tests/fakes/nodes.py), real Ray 2.60
with ``container_runtime: none``, driven through the DAGs with ``dag.test()``.

The head's dashboard answers on the head's loopback only: Airfleet reaches it through an SSH
forward (so does every check here that asks it, from inside the head), and no other machine
reaches it at all."""

from __future__ import annotations

import json
import threading
import time

import pytest

from airfleet.backends.ssh import commands, dashboard
from airfleet.resources import Phase
from airfleet.store import Store
from tests.fakes.nodes import NodeFarm
from tests.fakes.static_fleet import (
    alive,
    head_dashboard_get,
    ray_processes,
    static_cluster,
    tcp_connect,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def farm():
    with NodeFarm(4, name_prefix="ray") as farm:
        yield farm


def cluster(farm, workers: int, name: str = "static-a") -> dict:
    return static_cluster(farm, workers, name)


def test_create_health_delete(dags, fleet):
    farm = fleet
    dr = dags["airfleet_cluster_create"].test(run_conf={"cluster": cluster(farm, 2)})
    assert str(dr.state) == "success"
    record = Store().require_cluster("static-a")
    assert record.phase is Phase.RUNNING, record.cluster.status.message
    nodes = {n.address: n for n in record.cluster.status.nodes}
    assert set(nodes) == {n.address for n in farm.nodes[:3]}
    assert all(n.phase == "Running" and n.ray_node_id for n in nodes.values())
    assert alive(farm) == set(nodes)

    # The dashboard (and its Jobs API) answers on the head's loopback, and nowhere else.
    head, worker, outsider = farm.nodes[0], farm.nodes[1], farm.nodes[3]
    assert head_dashboard_get(farm, "/api/gcs_healthz") == "success"
    for other in (worker, outsider):  # a node of the cluster, a machine beside it
        assert tcp_connect(other, head.address, 8265) == "ECONNREFUSED", other.address
    assert tcp_connect(head, head.address, 8265) == "ECONNREFUSED"  # not even its own IP
    # What stays reachable, pinned so a Ray upgrade that changes it is noticed: the GCS (how
    # workers join), and two services Ray 2.60 binds to the node's IP with no option to bind
    # them to loopback: the Ray client server (head) and the dashboard agent's HTTP (every
    # node). Each runs code for whoever reaches it: keep Ray nodes on a private network.
    assert {p: tcp_connect(outsider, head.address, p) for p in (6379, 10001, 52365)} == \
        {6379: "open", 10001: "open", 52365: "open"}

    dr = dags["airfleet_cluster_health_check"].test(run_conf={})
    assert str(dr.state) == "success"
    assert Store().require_cluster("static-a").phase is Phase.RUNNING

    dr = dags["airfleet_cluster_delete"].test(run_conf={"name": "static-a"})
    assert str(dr.state) == "success"
    assert Store().get_cluster("static-a") is None
    for node in farm.nodes[:3]:
        assert ray_processes(node) == [], node.address


DRIVER = """
import sys, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address="auto")

@ray.remote(num_cpus=1)
def work(seconds):
    open("/tmp/task-running", "w").close()
    time.sleep(seconds)
    return ray.get_runtime_context().get_node_id()

strategy = NodeAffinitySchedulingStrategy(node_id=sys.argv[1], soft=False)
print("RESULT", ray.get(work.options(scheduling_strategy=strategy).remote(float(sys.argv[2]))),
      flush=True)
"""


def start_busy_task(farm, worker, node_id: str, seconds: float) -> None:
    """A Ray task pinned to ``worker`` that runs ``seconds``, driven from the head."""
    head = farm.nodes[0]
    worker.run("rm -f /tmp/task-running")  # a marker left by an earlier test must not count
    head.run(["sh", "-c", f"rm -f /tmp/driver.out; cat > /tmp/driver.py <<'EOF'\n{DRIVER}\nEOF"])
    farm.ssh(head, f"nohup python /tmp/driver.py {node_id} {seconds} > /tmp/driver.out 2>&1 &",
             check=True)
    deadline = time.monotonic() + 60
    while worker.run("test -f /tmp/task-running", check=False).returncode != 0:
        assert time.monotonic() < deadline, head.run("cat /tmp/driver.out").stdout
        time.sleep(0.5)


class Contender:
    """Another flow trying to take the cluster's lease every half second while ``during()``
    holds (the drain): what it took (``taken``: it should be nothing) and how often it was
    refused."""

    def __init__(self, name: str, during) -> None:
        self.name, self.during, self.refusals, self.taken = name, during, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._try, daemon=True)

    def _try(self) -> None:
        from airfleet.errors import LeaseHeld

        store = Store()
        while not self._stop.wait(0.5):
            if not self.during():
                continue
            try:
                lease = store.acquire_lease(self.name, "airfleet_cluster_update/contender")
            except LeaseHeld:
                self.refusals += 1
                continue
            self.taken.append(lease.token)
            store.release_lease(self.name, lease.holder, lease.token)
        store.dispose()

    def __enter__(self) -> Contender:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def driver_output(farm, settle: float = 30) -> str:
    deadline = time.monotonic() + settle
    while True:
        out = farm.nodes[0].run("cat /tmp/driver.out", check=False).stdout
        if "RESULT" in out or "Error" in out or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def node_status(name: str) -> dict:
    return {n.address: n for n in Store().require_cluster(name).cluster.status.nodes}


def test_grow_then_drain_a_busy_worker_then_delete(dags, fleet):
    farm = fleet
    assert str(dags["airfleet_cluster_create"].test(
        run_conf={"cluster": cluster(farm, 2)}).state) == "success"

    grown = cluster(farm, 3)
    dr = dags["airfleet_cluster_update"].test(run_conf={"cluster": grown})
    assert str(dr.state) == "success"
    assert alive(farm) == {n.address for n in farm.nodes}
    assert Store().require_cluster("static-a").generation == 2

    leaving = farm.nodes[2]
    node_id = node_status("static-a")[leaving.address].ray_node_id
    start_busy_task(farm, leaving, node_id, seconds=15)
    shrunk = cluster(farm, 3)
    shrunk["spec"]["config"]["ssh"]["workers"].remove(leaving.address)
    started = time.monotonic()
    dr = dags["airfleet_cluster_update"].test(run_conf={"cluster": shrunk})
    assert str(dr.state) == "success"

    assert f"RESULT {node_id}" in driver_output(farm)  # the running task finished there
    assert time.monotonic() - started >= 5  # ... because the drain waited for it
    record = Store().require_cluster("static-a")
    assert record.phase is Phase.RUNNING
    assert set(node_status("static-a")) == {farm.nodes[0].address, farm.nodes[1].address,
                                            farm.nodes[3].address}
    assert leaving.address not in alive(farm)
    assert ray_processes(leaving) == []
    assert (f"worker {leaving.address}: drained, then stopped"
            in [e.message for e in Store().events("static-a")])

    dr = dags["airfleet_cluster_delete"].test(run_conf={"name": "static-a"})
    assert str(dr.state) == "success"
    for node in farm.nodes:
        assert ray_processes(node) == [], node.address


def test_a_worker_still_busy_at_the_deadline_is_stopped_by_force(dags, fleet, monkeypatch):
    """The drain outlasts the lease's TTL (12 s against 5 s): the wait renews the lease, so
    no other flow can take the cluster until the update ends."""
    farm = fleet
    monkeypatch.setenv("AIRFLEET_LEASE_SECONDS", "5")
    spec = cluster(farm, 1)
    spec["spec"]["config"]["ssh"]["drain_deadline_seconds"] = 12
    assert str(dags["airfleet_cluster_create"].test(run_conf={"cluster": spec}).state) \
        == "success"
    worker = farm.nodes[1]
    start_busy_task(farm, worker, node_status("static-a")[worker.address].ray_node_id, 120)

    spec["spec"]["config"]["ssh"]["workers"] = []
    def draining() -> bool:
        node = node_status("static-a").get(worker.address)  # gone from the list once removed
        return node is not None and node.phase == "Draining"

    with Contender("static-a", draining) as contender:
        dr = dags["airfleet_cluster_update"].test(run_conf={"cluster": spec})
    assert str(dr.state) == "success"
    assert contender.refusals >= 10 and contender.taken == [], contender.taken
    [event] = [e for e in Store().events("static-a") if e.reason == "NodeForceStopped"]
    assert event.kind == "Warning"
    assert event.message == (f"worker {worker.address}: forced stop: still busy at the drain "
                             "deadline of 12 s")
    assert ray_processes(worker) == []
    assert "RESULT" not in driver_output(farm, settle=2)


def test_a_worker_down_at_create_fails_the_cluster_and_a_rerun_fixes_only_it(dags, fleet):
    farm = fleet
    down = farm.nodes[2]
    down.stop()
    try:
        dr = dags["airfleet_cluster_create"].test(run_conf={"cluster": cluster(farm, 2)})
        assert str(dr.state) == "failed"
        record = Store().require_cluster("static-a")
        assert record.phase is Phase.FAILED
        assert f"worker {down.address}" in record.cluster.status.message
        healthy = {a: n.ray_node_id for a, n in node_status("static-a").items()
                   if n.phase == "Running"}
        assert set(healthy) == {farm.nodes[0].address, farm.nodes[1].address}
    finally:
        down.start()

    dr = dags["airfleet_cluster_create"].test(run_conf={"cluster": cluster(farm, 2)})
    assert str(dr.state) == "success"
    assert Store().require_cluster("static-a").phase is Phase.RUNNING
    after = {a: n.ray_node_id for a, n in node_status("static-a").items()}
    assert {a: after[a] for a in healthy} == healthy  # the healthy nodes were not restarted
    assert after[down.address]


def test_a_delete_that_cannot_reach_a_node_fails_naming_it_and_force_records_it(dags, fleet):
    farm = fleet
    assert str(dags["airfleet_cluster_create"].test(
        run_conf={"cluster": cluster(farm, 1)}).state) == "success"
    down = farm.nodes[1]
    down.stop()  # powered off: its Ray went with it, but nobody can tell from here
    try:
        dr = dags["airfleet_cluster_delete"].test(run_conf={"name": "static-a"})
        assert str(dr.state) == "failed"
        record = Store().require_cluster("static-a")
        assert record.phase is Phase.FAILED
        assert f"{down.address}: could not stop Ray" in record.cluster.status.message
        assert '"force": true' in record.cluster.status.message

        dr = dags["airfleet_cluster_delete"].test(run_conf={"name": "static-a", "force": True})
        assert str(dr.state) == "success"
        [gone] = Store().list_clusters(include_deleted=True)
        assert gone.phase is Phase.DELETED
        left = gone.cluster.status.left_behind
        assert left and all(item.startswith(f"{down.address}: ") for item in left), left
        assert gone.cluster.status.message == "deleted by force; left behind: " + "; ".join(left)
        assert [e.message for e in Store().events("static-a")
                if e.reason == "LeftBehind"][-len(left):] == left
        assert ray_processes(farm.nodes[0]) == []  # the head, reachable, was stopped
    finally:
        down.start()


def test_a_dead_head_fails_the_cluster_and_its_return_heals_it(dags, fleet):
    farm = fleet
    head = farm.nodes[0]
    assert str(dags["airfleet_cluster_create"].test(
        run_conf={"cluster": cluster(farm, 0)}).state) == "success"

    head.stop()  # power off: every process of the node dies
    try:
        for _ in range(2):  # the second failed probe in a row flips it (FAILED_PROBES_TO_FAIL)
            dr = dags["airfleet_cluster_health_check"].test(run_conf={})
            assert str(dr.state) == "success"
        record = Store().require_cluster("static-a")
        assert record.phase is Phase.FAILED, record.cluster.status
        assert record.cluster.status.message.startswith(
            f"head {head.address}: cannot reach the Ray dashboard: node {head.address}: "
            "unreachable over SSH on port 22 ("), record.cluster.status.message
    finally:
        if not head.running:
            head.start()

    farm.ssh(head, commands.ray_start_head(head.address), check=True)  # restarted by hand
    assert str(dags["airfleet_cluster_health_check"].test(run_conf={}).state) == "success"
    assert Store().require_cluster("static-a").phase is Phase.RUNNING


LSPCI = """#!/bin/sh
echo '00:02.0 VGA compatible controller [0300]: ASPEED Technology, Inc. ASPEED Graphics Family [1a03:2000] (rev 41)'
echo '01:00.0 3D controller [0302]: NVIDIA Corporation GH100 [H100 SXM5 80GB] [10de:2330] (rev a1)'
echo '02:00.0 3D controller [0302]: NVIDIA Corporation GH100 [H100 SXM5 80GB] [10de:2330] (rev a1)'
"""
NVIDIA_SMI = """#!/bin/sh
echo '0, NVIDIA H100 80GB HBM3, GPU-1c2f7b4e-0000-0000-0000-000000000001, 81559, 550.54.15'
echo '1, NVIDIA H100 80GB HBM3, GPU-1c2f7b4e-0000-0000-0000-000000000002, 81559, 550.54.15'
"""
BROKEN_NVIDIA_SMI = """#!/bin/sh
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
exit 9
"""


def install(node, name: str, script: str) -> None:
    path = node.bin_dir / name
    path.write_text(script)
    path.chmod(0o755)


def gpus_in_ray(farm) -> dict[str, float]:
    rows = json.loads(head_dashboard_get(farm, "/api/v0/nodes?detail=true"))
    return {r["node_ip"]: r.get("resources_total", {}).get("GPU", 0.0)
            for r in rows["data"]["result"]["result"] if r["state"] == "ALIVE"}


def alive_ids(farm) -> dict[str, str]:
    """Address -> Ray node id of each ALIVE node, as the head's dashboard sees them."""
    payload = json.loads(head_dashboard_get(farm, "/api/v0/nodes?limit=10000"))
    return {a: n.node_id for a, n in dashboard.alive_by_ip(dashboard.parse_nodes(payload)).items()}


def test_gpus_are_detected_and_ray_starts_with_them(dags, fleet):
    farm = fleet
    gpu, broken = farm.nodes[1], farm.nodes[2]
    install(gpu, "lspci", LSPCI)
    install(gpu, "nvidia-smi", NVIDIA_SMI)
    install(broken, "lspci", LSPCI)  # devices present, driver not working
    install(broken, "nvidia-smi", BROKEN_NVIDIA_SMI)
    try:
        dr = dags["airfleet_cluster_create"].test(run_conf={"cluster": cluster(farm, 2)})
        assert str(dr.state) == "success"
        found = Store().require_cluster("static-a").cluster.status.accelerators
        assert found["count"] == 2 and found["models"] == {"NVIDIA H100 80GB HBM3": 2}
        per_node = found["nodes"]
        assert per_node[gpu.address]["count"] == 2
        assert per_node[broken.address]["count"] == 0
        assert per_node[broken.address]["stages"]["device_present"]["ok"] is True
        assert per_node[broken.address]["stages"]["driver_ok"]["ok"] is False
        assert per_node[farm.nodes[0].address]["count"] == 0
        assert gpus_in_ray(farm) == {farm.nodes[0].address: 0.0, gpu.address: 2.0,
                                     broken.address: 0.0}
    finally:
        for node in (gpu, broken):
            for name in ("lspci", "nvidia-smi"):
                (node.bin_dir / name).unlink(missing_ok=True)


def test_onboard_adopts_a_running_ray_cluster_without_restarting_it(dags, fleet):
    farm = fleet
    head, worker = farm.nodes[0], farm.nodes[1]
    farm.ssh(head, commands.ray_start_head(head.address), check=True)
    farm.ssh(worker, commands.ray_start_worker(worker.address, head.address), check=True)
    deadline = time.monotonic() + 60
    while len(alive(farm)) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    before = alive_ids(farm)

    dr = dags["airfleet_cluster_onboard"].test(run_conf={"cluster": cluster(farm, 1)})
    assert str(dr.state) == "success"
    record = Store().require_cluster("static-a")
    assert record.phase is Phase.RUNNING
    assert {a: n.ray_node_id for a, n in node_status("static-a").items()} == before
    assert alive_ids(farm) == before  # nothing was restarted


def test_model_cache_directory_and_hf_home_on_every_node(dags, fleet):
    farm = fleet
    spec = cluster(farm, 1)
    spec["spec"]["model_caches"] = [{"name": "hf", "host_path": {"path": "/tmp/models/hf"}}]
    assert str(dags["airfleet_cluster_create"].test(run_conf={"cluster": spec}).state) \
        == "success"
    for node in farm.nodes[:2]:
        assert node.run("test -d /tmp/models/hf", check=False).returncode == 0
        raylet = node.run("pgrep -x raylet").stdout.split()[0]
        env = node.run(f"tr '\\0' '\\n' < /proc/{raylet}/environ").stdout.splitlines()
        assert "HF_HOME=/tmp/models/hf" in env


def test_an_unreachable_head_fails_naming_it_and_starts_nothing(dags, fleet):
    farm = fleet
    head = farm.nodes[0]
    head.stop()
    try:
        dr = dags["airfleet_cluster_create"].test(run_conf={"cluster": cluster(farm, 2)})
        assert str(dr.state) == "failed"
        record = Store().require_cluster("static-a")
        assert record.phase is Phase.FAILED
        assert f"head {head.address}: " in record.cluster.status.message
        assert "unreachable over SSH" in record.cluster.status.message
        for worker in farm.nodes[1:3]:
            assert ray_processes(worker, settle=0) == []
    finally:
        head.start()


def test_bad_credential_and_changed_head_are_refused_before_anything(dags, fleet, capfd, caplog):
    farm = fleet
    spec = cluster(farm, 1)
    spec["spec"]["config"]["ssh"]["credential"] = {"airflow_conn_id": "nope"}
    dr = dags["airfleet_cluster_create"].test(run_conf={"cluster": spec})
    assert {t.task_id: str(t.state) for t in dr.get_task_instances()}["admit"] == "failed"
    out = capfd.readouterr()
    assert ("cluster.spec.config.ssh.credential: Airflow connection 'nope' does not exist"
            in out.out + out.err + caplog.text)
    assert Store().list_clusters(include_deleted=True) == []

    assert str(dags["airfleet_cluster_create"].test(
        run_conf={"cluster": cluster(farm, 1)}).state) == "success"
    moved = cluster(farm, 0)
    moved["spec"]["config"]["ssh"]["head"] = farm.nodes[1].address
    dr = dags["airfleet_cluster_update"].test(run_conf={"cluster": moved})
    assert {t.task_id: str(t.state) for t in dr.get_task_instances()}["admit"] == "failed"
    out = capfd.readouterr()
    assert "cluster.spec.config.ssh.head: the head cannot change" in out.out + out.err + caplog.text
    assert Store().require_cluster("static-a").generation == 1
