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


class _CloudWaitTrigger(BaseTrigger):
    """A wait on a backend's :class:`airfleet.backends.Wait` (as a dict: kind, what, args;
    no secret in it), polling every ``poll_interval`` seconds."""

    def __init__(self, wait: dict[str, Any], poll_interval: float = 30.0):
        super().__init__()
        self.wait = dict(wait)
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"wait": self.wait, "poll_interval": self.poll_interval})


class EksWaitTrigger(_CloudWaitTrigger):
    """Waits on the amazon provider's EKS waiters (aiobotocore) until a cluster or node group
    is ACTIVE or gone, then yields ``{"status": "success" | "failed", "what", "message"}``.

    :param wait: a :class:`airfleet.backends.Wait` of an EKS kind, as a dict: cluster, region
        and the AWS connection (no secret), and the wait's ``timeout``.
    :param poll_interval: seconds between describes.
    """

    WAITERS = {  # wait kind -> (waiter, its JMESPath status, what a failure is)
        "eks_cluster_active": ("cluster_active", ["cluster.status"], "EKS cluster failed"),
        "eks_cluster_deleted": ("cluster_deleted", ["cluster.status"],
                                "EKS cluster delete failed"),
        "eks_nodegroup_active": ("nodegroup_active",
                                 ["nodegroup.status", "nodegroup.health.issues"],
                                 "EKS node group failed"),
        "eks_nodegroup_deleted": ("nodegroup_deleted",
                                  ["nodegroup.status", "nodegroup.health.issues"],
                                  "EKS node group delete failed"),
    }

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow.providers.amazon.aws.hooks.eks import EksHook
        from airflow.providers.amazon.aws.utils.waiter_with_logging import async_wait
        from airflow.sdk.exceptions import AirflowException

        args, what = self.wait["args"], self.wait["what"]
        waiter_name, status_args, failure = self.WAITERS[self.wait["kind"]]
        waiter_args = {"name": args["cluster"]} if "nodegroup" not in args else \
            {"clusterName": args["cluster"], "nodegroupName": args["nodegroup"]}
        attempts = max(1, int(args.get("timeout", 1800) / max(self.poll_interval, 0.01)))
        hook = EksHook(aws_conn_id=args["aws_conn_id"], region_name=args["region"])
        try:
            async with await hook.get_async_conn() as client:
                await async_wait(client.get_waiter(waiter_name), self.poll_interval, attempts,
                                 waiter_args, failure, f"{what}: status", status_args)
        except AirflowException as exc:
            yield TriggerEvent({"status": "failed", "what": what, "message": str(exc)})
            return
        yield TriggerEvent({"status": "success", "what": what, "message": f"{what}: done"})


class AksOperationTrigger(_CloudWaitTrigger):
    """Follows an AKS long-running operation with the ``aio`` client until it ends, then
    yields ``{"status": "success" | "failed", "what", "message"}``; a Failed operation's
    message is Azure's own (code and message).

    Kind ``azure_operation``: the operation this run started, resumed from its continuation
    token. Kind ``aks_settled``: an operation somebody else started; GETs until the cluster
    (or pool) is no longer busy.

    :param wait: a :class:`airfleet.backends.Wait` of an AKS kind, as a dict (connection id,
        subscription, resource group, names, token: no secret).
    :param poll_interval: seconds between polls.
    """

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from azure.core.exceptions import HttpResponseError

        from airfleet.backends.kubernetes.aks import OPERATION, aks_error
        from airfleet_airflow.hooks import AksHook

        args, what = self.wait["args"], self.wait["what"]
        timeout = float(args.get("timeout", 3600))
        try:
            async with AksHook(args["azure_conn_id"]).async_client(
                    args["subscription_id"], polling_interval=self.poll_interval) as client:
                if self.wait["kind"] == OPERATION:
                    await asyncio.wait_for(self._follow(client, args), timeout)
                else:
                    await asyncio.wait_for(self._settle(client, args), timeout)
        except HttpResponseError as exc:
            message = str(aks_error(what, exc))
            yield TriggerEvent({"status": "failed", "what": what, "message": message})
            return
        except TimeoutError:
            yield TriggerEvent({"status": "failed", "what": what,
                                "message": f"{what}: not done after {timeout:g}s"})
            return
        yield TriggerEvent({"status": "success", "what": what, "message": f"{what}: done"})

    @staticmethod
    async def _follow(client: Any, args: dict[str, Any]) -> None:
        from airfleet.backends.kubernetes.aks import resume_operation

        await (await resume_operation(client, args)).result()

    async def _settle(self, client: Any, args: dict[str, Any]) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        from airfleet.backends.kubernetes.aks import SETTLED, provisioning_state

        while True:
            try:
                if args.get("pool"):
                    resource = await client.agent_pools.get(args["resource_group"],
                                                            args["cluster"], args["pool"])
                else:
                    resource = await client.managed_clusters.get(args["resource_group"],
                                                                 args["cluster"])
            except ResourceNotFoundError:
                return
            if provisioning_state(resource) in SETTLED:
                return
            await asyncio.sleep(self.poll_interval)


def cloud_wait_trigger(wait: dict[str, Any], poll_interval: float) -> BaseTrigger:
    """The trigger that waits on a backend's :class:`airfleet.backends.Wait`."""
    if wait["kind"] in EksWaitTrigger.WAITERS:
        return EksWaitTrigger(wait, poll_interval)
    if wait["kind"] in ("azure_operation", "aks_settled"):
        return AksOperationTrigger(wait, poll_interval)
    raise ValueError(f"no trigger waits on {wait['kind']!r}")
