"""Triggers: long waits that run in Airflow's triggerer instead of holding a worker slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class RayNodesDeadTrigger(BaseTrigger):
    """Waits until draining Ray nodes are DEAD (or gone), or until their deadline passes.

    Yields one event ``{"status": "dead" | "deadline", "dead": [addresses],
    "alive": [addresses], "message": str}``: ``alive`` lists the nodes still ALIVE at the
    deadline, for the caller to stop by force. A dashboard that does not answer is asked again until the deadline: a busy
    head may be slow, and the drain itself goes on without us.

    :param dashboard_url: the head's dashboard, e.g. ``http://10.0.0.1:8265``.
    :param nodes: ``{address: Ray node id}`` of the nodes being drained.
    :param deadline: epoch seconds after which the caller escalates to a forced stop.
    :param poll_interval: seconds between probes.
    """

    def __init__(self, dashboard_url: str, nodes: dict[str, str], deadline: float,
                 poll_interval: float = 5.0):
        super().__init__()
        self.dashboard_url = dashboard_url
        self.nodes = dict(nodes)
        self.deadline = deadline
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"dashboard_url": self.dashboard_url, "nodes": self.nodes,
                 "deadline": self.deadline, "poll_interval": self.poll_interval})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airfleet.backends.ssh import dashboard

        alive, problem = list(self.nodes), ""
        while True:
            try:
                nodes = await dashboard.async_list_nodes(self.dashboard_url)
                still = {n.node_id for n in nodes if n.alive}
                alive, problem = [a for a, i in self.nodes.items() if i in still], ""
            except Exception as exc:  # noqa: BLE001 - asked again until the deadline
                problem = f"dashboard did not answer: {exc}"
            if not alive:
                yield self._event("dead", alive, "every drained node is DEAD")
                return
            if time.time() >= self.deadline:
                yield self._event("deadline", alive, problem or f"{len(alive)} node(s) still "
                                  "ALIVE at the deadline")
                return
            await asyncio.sleep(min(self.poll_interval, max(0.0, self.deadline - time.time())))

    def _event(self, status: str, alive: list[str], message: str) -> TriggerEvent:
        return TriggerEvent({"status": status, "alive": alive, "message": message,
                             "dead": [a for a in self.nodes if a not in alive]})


class ClusterReadyTrigger(BaseTrigger):
    """Looks every ``poll_interval`` seconds until the cluster's components are ready or the
    deadline passes, then yields ``{"ready": bool, "message": str}``.

    It carries only the flow's lease (cluster name, run, fencing token: no secret); each look
    builds the cluster's clients afresh from the store, the vault and Airflow's connections,
    in a thread, and renews the lease. A look that fails is retried until the deadline.
    """

    def __init__(self, lease: dict[str, Any], deadline: float, poll_interval: float = 5.0):
        super().__init__()
        self.lease = dict(lease)
        self.deadline = deadline
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"lease": self.lease, "deadline": self.deadline,
                 "poll_interval": self.poll_interval})

    def _look(self) -> tuple[bool, str]:
        from airfleet import flows
        from airfleet.store import Store
        from airfleet_airflow.clients import clients_for

        seen = flows.probe(Store(), flows.LeaseRef.from_dict(self.lease), "wait_ready",
                           clients_for, timeout=0)
        return seen.healthy, seen.message

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                ready, message = await asyncio.to_thread(self._look)
            except Exception as exc:  # noqa: BLE001 - looked at again until the deadline
                ready, message = False, f"could not look: {exc}"
            if ready or time.time() >= self.deadline:
                yield TriggerEvent({"ready": ready, "message": message})
                return
            await asyncio.sleep(min(self.poll_interval, max(0.0, self.deadline - time.time())))
