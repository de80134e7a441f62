"""A backend written for the tests: records every verb it is asked and fails on command.

It stands in for a product backend when testing the flow machinery (validate, lease, status,
history, teardown). It works across processes (a running Airflow's task subprocesses), so its
instructions and its record live in files named by environment variables:

- ``AIRFLEET_FAKE_BACKEND_LOG``: JSON lines, one per verb call ``{"verb", "cluster", "run_id",
  "start", "end", "pid", "worker"}`` (times from ``time.time()``; ``worker``: the Celery
  worker's ``AIRFLEET_WORKER_NAME`` when set), written when the call ends;
- ``AIRFLEET_FAKE_BACKEND_STATE``: JSON ``{"fail_at": {"<cluster>": "<verb>"},
  "unhealthy": ["<cluster>"], "not_ready": {"<cluster>": ["<node>"]},
  "leftovers": {"<cluster>": ["..."]}, "delay": {"<verb>": <seconds>}}`` (``delay``: each
  call of that verb takes that long, so concurrent calls would overlap visibly).
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airfleet.backends import Backend, BackendContext, Observation
from airfleet.errors import InvalidRequest
from airfleet.resources import Cluster, ClusterSpec, NodeStatus


class FakeBackendError(RuntimeError):
    pass


def _state() -> dict[str, Any]:
    path = os.environ.get("AIRFLEET_FAKE_BACKEND_STATE")
    if path and Path(path).exists():
        return json.loads(Path(path).read_text())
    return {}


class RecordingBackend(Backend):
    cluster_type = "fake"

    def validate(self, spec: ClusterSpec) -> None:
        if spec.version == "reject-me":
            raise InvalidRequest("cluster.spec.version: the fake backend rejects 'reject-me'")

    def _call(self, verb: str, cluster: Cluster, ctx: BackendContext | None) -> None:
        state, start = _state(), time.time()
        time.sleep(state.get("delay", {}).get(verb, 0))
        log = os.environ.get("AIRFLEET_FAKE_BACKEND_LOG")
        if log:
            line = json.dumps({"verb": verb, "cluster": cluster.name,
                               "run_id": ctx.run_id if ctx else None, "start": start,
                               "end": time.time(), "pid": os.getpid(),
                               "worker": os.environ.get("AIRFLEET_WORKER_NAME")})
            with open(log, "a") as f:  # one write of one line: appends from processes interleave whole
                f.write(line + "\n")
        if state.get("fail_at", {}).get(cluster.name) == verb:
            raise FakeBackendError(f"fake backend told to fail at {verb}")

    def _nodes(self, cluster: Cluster) -> list[NodeStatus]:
        ssh = cluster.spec.config.ssh
        if ssh is None:
            return [NodeStatus(name="node-0", role="node", phase="Ready")]
        return [NodeStatus(name="head", address=ssh.head, role="head", phase="Running")] + [
            NodeStatus(name=f"worker-{i}", address=w, role="worker", phase="Running")
            for i, w in enumerate(ssh.workers)]

    def provision(self, cluster, ctx):
        self._call("provision", cluster, ctx)

    def apply(self, cluster, ctx):
        self._call("apply", cluster, ctx)
        for node in self._nodes(cluster):
            ctx.report_node(node)
        return Observation(healthy=True, message="all nodes running", nodes=self._nodes(cluster))

    def query(self, cluster, ctx):
        self._call("query", cluster, ctx)
        return Observation(healthy=True, message="discovered", nodes=self._nodes(cluster))

    def health(self, cluster, ctx):
        self._call("health", cluster, ctx)
        if cluster.name in _state().get("unhealthy", []):
            return Observation(healthy=False, message="fake probe: head unreachable")
        not_ready = _state().get("not_ready", {}).get(cluster.name, [])
        nodes = [n.model_copy(update={"phase": "NotReady" if n.name in not_ready else "Running",
                                      "observed_at": datetime.now(UTC)})
                 for n in cluster.status.nodes]
        return Observation(healthy=True, message="fake probe: healthy", nodes=nodes)

    def detect_accelerators(self, cluster, ctx):
        self._call("detect_accelerators", cluster, ctx)
        return {"nvidia.com/gpu": {"count": 0, "models": []}}

    def drain_node(self, cluster, node, ctx):
        self._call("drain_node", cluster, ctx)

    def teardown(self, cluster, ctx, *, force=False):
        self._call("teardown", cluster, ctx)
        return list(_state().get("leftovers", {}).get(cluster.name, []))
