"""Helpers shared by the static-nodes tests: the SSH connection for a NodeFarm, cluster
specs over its nodes, and what Ray shows or leaves on a node."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

from airfleet.backends.ssh import dashboard

CONN_ENV = "AIRFLOW_CONN_SSH_FLEET"  # the connection `ssh_fleet`, as Airflow reads it from env
RAY_PROCESS = ("raylet", "gcs_server", "ray::", "dashboard", "log_monitor")


def ssh_connection(farm) -> str:
    """An Airflow SSH connection (JSON) holding the farm's client key."""
    return json.dumps({"conn_type": "ssh", "login": "root",
                       "extra": {"private_key": farm.private_key_text}})


def static_cluster(farm, workers: int, name: str = "static-a", **ssh) -> dict:
    """A static-nodes cluster: the farm's first node as head, the next ``workers`` as workers,
    host keys pinned with the farm's known_hosts, Ray as host processes unless ``ssh`` says."""
    head, *rest = farm.nodes
    config = {"head": head.address, "workers": [n.address for n in rest[:workers]],
              "credential": {"airflow_conn_id": "ssh_fleet"},
              "known_hosts": farm.known_hosts_text(), "container_runtime": "none", **ssh}
    return {"metadata": {"name": name},
            "spec": {"type": "ssh", "provider": "static", "config": {"ssh": config}}}


def ray_processes(node, settle: float = 10) -> list[str]:
    """Ray processes on the node, once they had ``settle`` seconds to exit (a dashboard
    helper outlives `ray stop` by a second or two)."""
    deadline = time.monotonic() + settle
    while True:
        found = [p for p in node.processes() if any(k in p for k in RAY_PROCESS)]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


# GET argv[1] (no proxy, 5 s) and print the body; a non-2xx answer or no answer exits 1.
HTTP_GET = """
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
sys.stdout.write(opener.open(sys.argv[1], timeout=5).read().decode())
"""


def node_http_get(node, url: str, *, check: bool = True):
    """GET ``url`` from inside ``node`` (its own network namespace), with the venv's Python
    (no curl needed on the machine); the completed process."""
    return node.run(["python", "-c", HTTP_GET, url], check=check)


def head_dashboard_get(farm, path: str, port: int = 8265) -> str:
    """GET ``path`` from the head's dashboard, asked on the head itself: it answers on the
    head's loopback only. Raises CalledProcessError when it does not answer."""
    return node_http_get(farm.nodes[0], f"http://127.0.0.1:{port}{path}").stdout


def alive(farm) -> set[str]:
    """Addresses of the ALIVE Ray nodes, as the head's dashboard sees them."""
    payload = json.loads(head_dashboard_get(farm, "/api/v0/nodes?limit=10000"))
    return set(dashboard.alive_by_ip(dashboard.parse_nodes(payload)))


CONNECT = """
import errno, socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("open")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, "timeout") if exc.errno else "timeout")
"""


def tcp_connect(node, host: str, port: int) -> str:
    """Try a TCP connect to host:port from inside ``node`` (its own network namespace):
    "open", "ECONNREFUSED", "timeout", ..."""
    return node.run(["python", "-c", CONNECT, host, str(port)]).stdout.strip()


def stop_ray(farm) -> None:
    """`ray stop --force` on every node where a Ray process is left, the nodes at once. A test
    that deleted its cluster left none, and the ray CLI's start-up alone takes 2-3 s a node."""
    def stop(node) -> None:
        if any(k in p for p in node.processes() for k in (*RAY_PROCESS, "/ray/")):
            node.run("ray stop --force >/dev/null 2>&1 || true", check=False)

    running = [node for node in farm.nodes if node.running]
    with ThreadPoolExecutor(max(1, len(running))) as pool:
        list(pool.map(stop, running))
