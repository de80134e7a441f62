"""Many simulated Ray dashboards on loopback, one per head address (127.x.y.z all reach lo).

One asyncio HTTP server on ``0.0.0.0:port``, in its own thread, answers Ray's
``/api/gcs_healthz`` and ``/api/v0/nodes`` (the payload shape of Ray 2.60) as the head
address it was reached on is told to behave:

- ``healthy``: GCS answers, every node ALIVE;
- ``failing``: GCS answers, the worker DEAD;
- ``slow``: as healthy, after ``slow_seconds``;
- ``hanging``: accepts the connection and never answers.
"""

from __future__ import annotations

import asyncio
import json
import threading

BEHAVIOURS = ("healthy", "failing", "slow", "hanging")


class RayDashboards:
    def __init__(self, heads: dict[str, tuple[str, str]], slow_seconds: float = 2.0):
        """``heads``: head address -> (behaviour, worker address)."""
        self.heads, self.slow_seconds = heads, slow_seconds
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> RayDashboards:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "0.0.0.0", 0, backlog=4096), self._loop).result()
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = writer.get_extra_info("sockname")[0]
        behaviour, worker = self.heads.get(head, ("unknown", ""))
        try:
            while True:  # keep-alive: one connection may carry several requests
                request = await reader.readuntil(b"\r\n\r\n")
                path = request.split(b" ", 2)[1].decode()
                if behaviour == "hanging":
                    await asyncio.sleep(3600)
                if behaviour == "slow":
                    await asyncio.sleep(self.slow_seconds)
                status, body = self._answer(path, head, behaviour, worker)
                writer.write(b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _answer(path: str, head: str, behaviour: str, worker: str) -> tuple[int, bytes]:
        if behaviour == "unknown":
            return 404, b'{"error": "no such dashboard"}'
        if path.startswith("/api/gcs_healthz"):
            return 200, b"success"
        if path.startswith("/api/v0/nodes"):
            nodes = [{"node_id": f"head-{head}", "node_ip": head, "state": "ALIVE",
                      "is_head_node": True},
                     {"node_id": f"worker-{worker}", "node_ip": worker,
                      "state": "DEAD" if behaviour == "failing" else "ALIVE",
                      "is_head_node": False}]
            return 200, json.dumps({"data": {"result": {"result": nodes}}}).encode()
        return 404, b"{}"


def register_fleet(store, count: int, port: int, mix: dict[str, float]) -> dict[str, tuple[str, str]]:
    """``count`` Running ssh clusters whose heads are distinct loopback addresses, behaving
    in the proportions of ``mix``; returns what :class:`RayDashboards` needs."""
    from airfleet.resources import ClusterRequest, ClusterStatus, Phase

    behaviours = [b for b, share in mix.items() for _ in range(round(share * count))]
    heads = {}
    for i in range(count):
        head, worker = f"127.20.{i // 250}.{i % 250 + 1}", f"10.77.{i // 250}.{i % 250 + 1}"
        behaviour = behaviours[i % len(behaviours)]
        heads[head] = (behaviour, worker)
        request = ClusterRequest.model_validate({
            "metadata": {"name": f"fleet-{i:04d}", "labels": {"probe": behaviour}},
            "spec": {"type": "ssh", "provider": "static", "config": {"ssh": {
                "head": head, "workers": [worker], "credential": {"airflow_conn_id": "ssh"},
                "ray": {"dashboard_port": port}}}}})
        record, _ = store.register_cluster(request, run_id="create/bench", token=None)
        store.set_status(record.name, ClusterStatus(phase=Phase.RUNNING), reason="Created",
                         run_id="create/bench", expected_version=record.version)
    return heads
