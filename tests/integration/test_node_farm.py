"""NodeFarm (tests/fakes/nodes.py): real SSH hosts in namespaces, and real Ray across them.

One 3-node farm for the module; the last test closes it and checks nothing is left behind.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fakes.nodes import VENV_BIN, Node, NodeFarm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


@pytest.fixture(scope="module")
def farm():
    with NodeFarm(3) as farm:
        yield farm


def http_get(url: str) -> str:
    with HTTP.open(url, timeout=2) as response:
        return response.read().decode()


def wait_until(check, timeout: float, what: str) -> None:
    """Poll check() until it is true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.5)


def alive_ray_nodes(head: Node) -> list[str]:
    try:
        body = json.loads(http_get(f"http://{head.address}:8265/api/v0/nodes"))
    except (OSError, ValueError):
        return []
    return sorted(n["node_ip"] for n in body["data"]["result"]["result"] if n["state"] == "ALIVE")


def farm_pids(farm: NodeFarm) -> list[int]:
    """Host processes that belong to the farm: its sshds (config in farm.dir) and its Ray."""
    marks = [str(farm.dir), *(f"={n.address}" for n in farm.nodes)]
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    return [p for p in pids if any(m in _cmdline(p) for m in marks)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_each_node_answers_ssh_with_its_own_hostname_and_hosts_file(farm):
    for node in farm.nodes:
        done = farm.ssh(node, "hostname; getent hosts node1; ! getent hosts no-such-host.example")
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [node.hostname, farm.nodes[1].address, "node1"]


def test_nodes_see_only_their_own_processes(farm):
    node = farm.nodes[0]
    lines = farm.ssh(node, "ps -eo pid=,args=", check=True).stdout.splitlines()
    assert lines[0].split()[:2] == ["1", "sshd:"]
    assert all(("sshd" in line or "ps -eo" in line) for line in lines), lines
    # Seen from the host: the node's sshd alone, once the session's sshd has exited.
    deadline = time.monotonic() + 5
    while len(node.processes()) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    [only] = node.processes()
    assert only.startswith(f"sshd: /usr/sbin/sshd -D -e -f {node.dir}/sshd_config")
    assert node.run("hostname").stdout.strip() == node.hostname


def test_a_wrong_host_key_is_refused(farm, tmp_path):
    node0, node1 = farm.nodes[:2]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{node0.address} {node1.host_key}\n")
    done = farm.ssh(node0, "true", known_hosts=wrong)
    assert done.returncode == 255
    assert "Host key verification failed" in done.stderr


def test_stop_refuses_fast_and_start_comes_back_with_the_same_host_key(farm):
    node = farm.nodes[2]
    node.stop()
    assert node.processes() == []
    started = time.monotonic()
    done = farm.ssh(node, "true")
    assert done.returncode == 255 and "Connection refused" in done.stderr
    assert time.monotonic() - started < 2
    node.start()
    assert farm.ssh(node, "hostname", check=True).stdout.strip() == node.hostname


def test_a_script_in_bin_dir_is_on_path_of_that_node_only(farm):
    node0, node1 = farm.nodes[:2]
    script = node1.bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    script.chmod(0o755)
    assert farm.ssh(node1, "nvidia-smi -L", check=True).stdout.startswith("GPU 0: NVIDIA H100")
    assert farm.ssh(node0, "command -v nvidia-smi").returncode == 1
    for node in farm.nodes:
        assert farm.ssh(node, "command -v ray", check=True).stdout.strip() == f"{VENV_BIN}/ray"
    assert farm.ssh(node1, "bash -lc 'command -v nvidia-smi'").returncode == 0  # login shell too


def test_ray_head_and_worker_on_two_nodes(farm):
    head, worker = farm.nodes[:2]
    started = time.monotonic()
    farm.ssh(head, f"ray start --head --node-ip-address={head.address} --port=6379"
                   " --dashboard-host=0.0.0.0 --dashboard-port=8265 --num-cpus=1"
                   " --disable-usage-stats", timeout=90, check=True)
    head_s = time.monotonic() - started
    farm.ssh(worker, f"ray start --address={head.address}:6379 --node-ip-address={worker.address}"
                     " --num-cpus=1 --disable-usage-stats", timeout=90, check=True)
    both = sorted([head.address, worker.address])
    wait_until(lambda: alive_ray_nodes(head) == both, 30, "head and worker ALIVE")
    print(f"\nray head start {head_s:.1f} s, worker join {time.monotonic() - started - head_s:.1f} s")

    farm.ssh(worker, "ray stop", timeout=60, check=True)
    assert all("sshd" in p for p in worker.processes()), worker.processes()
    assert http_get(f"http://{head.address}:8265/api/gcs_healthz") == "success"
    assert any("gcs_server" in p for p in head.processes())


def test_close_leaves_nothing_behind(farm):
    pids = farm_pids(farm) + [p for node in farm.nodes for p in node.pids()]
    assert pids
    farm.close()
    assert farm.links() == [] and farm.netns() == []
    assert not farm.dir.exists()
    assert [p for p in pids if Path(f"/proc/{p}").exists()] == []
    assert farm_pids(farm) == []


@pytest.mark.parametrize("failure", ["sshd refuses its config", "second node fails to boot"])
def test_a_start_that_fails_halfway_cleans_up(failure, monkeypatch):
    farm = NodeFarm(2, sshd_extra="NoSuchOption yes" if failure.startswith("sshd") else "")
    if failure.startswith("second"):
        boot = Node.start

        def boot_first_only(node, *args, **kwargs):
            if node is farm.nodes[1]:
                raise RuntimeError("node1 failed to boot")
            boot(node, *args, **kwargs)

        monkeypatch.setattr(Node, "start", boot_first_only)
    with pytest.raises(RuntimeError, match="Bad configuration option|node1 failed to boot"):
        farm.start()
    assert farm.links() == [] and farm.netns() == []
    assert not farm.dir.exists()
    assert farm_pids(farm) == []
