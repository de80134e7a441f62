"""Many simulated Ray dashboards on loopback, one per head address (127.x.y.z all reach lo).

One asyncio HTTP server on ``0.0.0.0:port``, in a child process of its own (as real dashboards
are other machines: it takes no CPU time from the process under test), answers Ray's
``/api/gcs_healthz`` and ``/api/v0/nodes`` (the payload shape of Ray 2.60) as the head address
it was reached on says: the address's second byte names the behaviour (:func:`head_address`),
so the server needs no table of clusters.

- ``healthy``: GCS answers, every node ALIVE;
- ``failing``: GCS answers, the worker DEAD;
- ``broken``: every request answers 500;
- ``slow``: as healthy, after ``slow_seconds``;
- ``hanging``: accepts the connection and never answers.

Real heads answer on their loopback only and are reached through SSH; these are reached by
plain HTTP, so a probe of them must be given ``clients["dashboard"] = dashboard.direct``.

``python -m tests.fakes.ray_dashboards [slow_seconds]`` serves on a free port and prints it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

BEHAVIOURS = ("healthy", "failing", "broken", "slow", "hanging")
FIRST = 20  # 127.20.x.y: healthy, 127.21.x.y: failing, ...
ROOT = Path(__file__).resolve().parents[2]


def head_address(behaviour: str, i: int) -> str:
    """The ``i``-th head (up to 62,500 a behaviour) that behaves as ``behaviour``."""
    return f"127.{FIRST + BEHAVIOURS.index(behaviour)}.{i // 250}.{i % 250 + 1}"


def worker_address(head: str) -> str:
    return "10." + head.split(".", 1)[1]


def behaviour_of(head: str) -> str | None:
    index = int(head.split(".")[1]) - FIRST
    return BEHAVIOURS[index] if head.startswith("127.") and 0 <= index < len(BEHAVIOURS) \
        else None


class RayDashboards:
    """The server as a context manager: ``port`` is set inside the ``with``."""

    def __init__(self, slow_seconds: float = 2.0):
        self.slow_seconds, self.port = slow_seconds, 0

    def __enter__(self) -> RayDashboards:
        self._child = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.ray_dashboards", str(self.slow_seconds)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.port = int(self._child.stdout.readline())
        return self

    def __exit__(self, *exc) -> None:
        self._child.kill()
        self._child.wait()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 slow_seconds: float) -> None:
    head = writer.get_extra_info("sockname")[0]
    behaviour = behaviour_of(head)
    try:
        while True:  # keep-alive: one connection may carry several requests
            request = await reader.readuntil(b"\r\n\r\n")
            path = request.split(b" ", 2)[1].decode()
            if behaviour == "hanging":
                await asyncio.sleep(3600)
            if behaviour == "slow":
                await asyncio.sleep(slow_seconds)
            status, body = _answer(path, head, behaviour)
            writer.write(b"HTTP/1.1 %d -\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _answer(path: str, head: str, behaviour: str | None) -> tuple[int, bytes]:
    if behaviour is None:
        return 404, b'{"error": "no such dashboard"}'
    if behaviour == "broken":
        return 500, b'{"error": "internal error"}'
    if path.startswith("/api/gcs_healthz"):
        return 200, b"success"
    if path.startswith("/api/v0/nodes"):
        worker = worker_address(head)
        nodes = [{"node_id": f"head-{head}", "node_ip": head, "state": "ALIVE",
                  "is_head_node": True},
                 {"node_id": f"worker-{worker}", "node_ip": worker,
                  "state": "DEAD" if behaviour == "failing" else "ALIVE",
                  "is_head_node": False}]
        return 200, json.dumps({"data": {"result": {"result": nodes}}}).encode()
    return 404, b"{}"


def register_fleet(store, count: int, port: int, mix: dict[str, float],
                   bulk: bool = False) -> dict[str, str]:
    """``count`` Running ssh clusters (head + one worker) whose heads behave in the
    proportions of ``mix``, interleaved; returns ``{cluster name: behaviour}``.

    Through the store's verbs (register, then Running: two transactions a cluster), or with
    ``bulk`` the same rows and history written in one transaction (a 10,000-cluster fleet in
    seconds instead of minutes; the health check reads them the same way)."""
    from airfleet.resources import ClusterRequest, ClusterStatus, Phase

    shares = {b: round(share * count) for b, share in mix.items()}
    behaviours = [b for _, b in sorted(((k + 0.5) / n, b) for b, n in shares.items()
                                       for k in range(n))]  # spread evenly, not in blocks
    seen: dict[str, int] = {}
    fleet, requests = {}, []
    for i in range(count):
        behaviour = behaviours[i % len(behaviours)]
        head = head_address(behaviour, seen.setdefault(behaviour, 0))
        seen[behaviour] += 1
        name = f"fleet-{i:04d}"
        fleet[name] = behaviour
        requests.append(ClusterRequest.model_validate({
            "metadata": {"name": name, "labels": {"probe": behaviour}},
            "spec": {"type": "ssh", "provider": "static", "config": {"ssh": {
                "head": head, "workers": [worker_address(head)],
                "credential": {"airflow_conn_id": "ssh"}, "ray": {"dashboard_port": port}}}}}))
    if bulk:
        _insert_running(store, requests, "create/bench")
        return fleet
    for request in requests:
        record, _ = store.register_cluster(request, run_id="create/bench", token=None)
        store.set_status(request.name, ClusterStatus(phase=Phase.RUNNING), reason="Created",
                         run_id="create/bench", expected_version=record.version)
    return fleet


def _insert_running(store, requests: list, run_id: str) -> None:
    """The rows ``register_cluster`` then ``set_status(Running)`` leave, in one transaction."""
    import uuid

    from airfleet.resources import ClusterStatus, Phase
    from airfleet.store import now
    from airfleet.store.tables import ClusterRow, EventRow

    with store.session() as s:
        for request in requests:
            t, uid = now(), uuid.uuid4().hex
            status = ClusterStatus(phase=Phase.RUNNING, observed_at=t, last_run_id=run_id)
            s.add(ClusterRow(uid=uid, name=request.name, phase=Phase.RUNNING.value,
                             spec=request.spec.model_dump(mode="json"),
                             labels=dict(request.metadata.labels),
                             status=status.model_dump(mode="json"), generation=1,
                             observed_generation=0, version=2, observed_at=t, created_at=t,
                             updated_at=t))
            s.add(EventRow(cluster=request.name, cluster_uid=uid, at=t, kind="Normal",
                           from_phase=None, to_phase=Phase.PENDING.value, reason="Registered",
                           message="cluster registered", run_id=run_id))
            s.add(EventRow(cluster=request.name, cluster_uid=uid, at=t, kind="Transition",
                           from_phase=Phase.PENDING.value, to_phase=Phase.RUNNING.value,
                           reason="Created", message="", run_id=run_id))


async def _main(slow_seconds: float) -> None:
    server = await asyncio.start_server(lambda r, w: _serve(r, w, slow_seconds),
                                        "0.0.0.0", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(float(sys.argv[1]) if len(sys.argv) > 1 else 2.0))
