"""Triggers: long waits that run in Airflow's triggerer instead of holding a worker slot.

Every trigger here waits on behalf of a flow that holds the cluster's lease, so each is a
:class:`LeaseKeepingTrigger`: beside its wait it renews the lease every third of
``AIRFLEET_LEASE_SECONDS`` (a drain may last a day; the lease lasts an hour), and when the
lease turns out to be lost (taken over, or broken by an operator) it ends the wait with
``{"status": "lease_lost", "message": ...}``, on which the operator fails the task: the run
must not change the cluster any more. A trigger carries the lease (name, run, fencing token)
and what the wait needs, never a secret: what reaches a cluster is built in the triggerer from
the store and Airflow's connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

log = logging.getLogger(__name__)

LEASE_LOST = "lease_lost"


class LeaseKeepingTrigger(BaseTrigger):
    """A wait (:meth:`wait`, yielding one event) that keeps the flow's lease while it runs.

    :param lease: the flow's lease, ``{"name", "holder", "token"}`` (``LeaseRef.to_dict()``).
    """

    def __init__(self, lease: dict[str, Any]):
        super().__init__()
        self.lease = dict(lease)
        self._store: Any = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"lease": self.lease, **self._wait_kwargs()})

    def _wait_kwargs(self) -> dict[str, Any]:
        """The subclass's own constructor arguments (besides the lease)."""
        raise NotImplementedError

    async def wait(self) -> AsyncIterator[TriggerEvent]:
        """The wait itself: yield one event."""
        raise NotImplementedError
        yield  # pragma: no cover - makes this an async generator

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airfleet import config

        # Airflow 3.3 fails a task that resumes before its scheduler has taken in the
        # executor's "success" for the worker that deferred it (that worker's exit, reported
        # seconds after defer() on a busy machine): "finished with state success, but the task
        # instance's state attribute is running" (apache/airflow#71580, #72716). So the event
        # of a wait that ends at once is held until AIRFLEET_RESUME_AFTER_SECONDS after it
        # began; a longer wait is not delayed.
        resume_at = time.monotonic() + config.resume_after_seconds()
        waiting = asyncio.ensure_future(_first(self.wait()))
        keeping = asyncio.ensure_future(self._keep_lease())
        try:
            done, _ = await asyncio.wait({waiting, keeping},
                                         return_when=asyncio.FIRST_COMPLETED)
            if keeping in done:  # it returns only when the lease is lost
                event = TriggerEvent({"status": LEASE_LOST, "message": keeping.result()})
            else:
                event = waiting.result()
            await asyncio.sleep(max(0.0, resume_at - time.monotonic()))
            yield event
        finally:
            for task in (waiting, keeping):
                task.cancel()
            await asyncio.gather(waiting, keeping, return_exceptions=True)
            if self._store is not None:
                await asyncio.to_thread(self._store.dispose)
                self._store = None

    async def _keep_lease(self) -> str:
        """Renew the lease now and every third of its TTL; return why, once it is lost. A
        renewal that fails otherwise (the store unreachable) is tried again at the next turn:
        a later one finds out whether the lease is still ours."""
        from airfleet import config
        from airfleet.errors import StaleFencingToken

        ttl = config.lease_seconds()
        while True:
            try:
                await asyncio.to_thread(self._renew, ttl)
            except StaleFencingToken as exc:
                return (f"run {self.lease['holder']} lost its lease on cluster "
                        f"{self.lease['name']} while waiting ({exc}); it changes nothing more")
            except Exception as exc:  # noqa: BLE001 - retried at the next turn
                log.warning("cluster %s: could not renew the lease (retrying in %.0f s): %s",
                            self.lease["name"], ttl / 3, exc)
            await asyncio.sleep(ttl / 3)

    def _renew(self, ttl: float) -> None:
        from airfleet.store import Store

        if self._store is None:
            self._store = Store()
        self._store.renew_lease(self.lease["name"], self.lease["holder"],
                                int(self.lease["token"]), ttl=ttl)


async def _first(events: AsyncIterator[TriggerEvent]) -> TriggerEvent:
    try:
        async for event in events:
            return event
    finally:
        await events.aclose()
    raise RuntimeError("the wait ended without an event")


class RayNodesDeadTrigger(LeaseKeepingTrigger):
    """Waits until draining Ray nodes are DEAD (or gone), or until their deadline passes.

    Yields one event ``{"status": "dead" | "deadline", "dead": [addresses],
    "alive": [addresses], "message": str}``: ``alive`` lists the nodes still ALIVE at the
    deadline, for the caller to stop by force. The head's dashboard answers on its loopback
    only: the trigger reaches it through one SSH forward for the whole wait (opened again if
    its connection drops), built from the store and the cluster's Airflow connection. A
    dashboard that does not answer is asked again until the deadline: a busy head may be
    slow, and the drain itself goes on without us.

    :param lease: the flow's lease (its cluster is the one draining).
    :param nodes: ``{address: Ray node id}`` of the nodes being drained.
    :param deadline: epoch seconds after which the caller escalates to a forced stop.
    :param poll_interval: seconds between probes.
    """

    def __init__(self, lease: dict[str, Any], nodes: dict[str, str], deadline: float,
                 poll_interval: float = 5.0):
        super().__init__(lease)
        self.nodes = dict(nodes)
        self.deadline = deadline
        self.poll_interval = poll_interval

    def _wait_kwargs(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "deadline": self.deadline,
                "poll_interval": self.poll_interval}

    def _reach(self) -> tuple[Any, dict[str, Any]]:
        """The recorded cluster and what reaches its head: SSH access and the tunnel."""
        from airfleet.store import Store
        from airfleet_airflow.clients import ssh_access, ssh_dashboard

        store = Store()
        try:
            cluster = store.require_cluster(self.lease["name"]).cluster
        finally:
            store.dispose()
        return cluster, {"ssh": ssh_access(cluster), "dashboard": ssh_dashboard(cluster)}

    async def wait(self) -> AsyncIterator[TriggerEvent]:
        from airfleet.backends.ssh.backend import head_dashboard

        alive, problem, dash = list(self.nodes), "", None
        async with contextlib.AsyncExitStack() as stack:
            while True:
                try:
                    if dash is None:
                        cluster, clients = await asyncio.to_thread(self._reach)
                        dash = await stack.enter_async_context(head_dashboard(cluster, clients))
                    still = {n.node_id for n in await dash.list_nodes() if n.alive}
                    alive, problem = [a for a, i in self.nodes.items() if i in still], ""
                except Exception as exc:  # noqa: BLE001 - asked again until the deadline
                    problem = f"dashboard did not answer: {exc}"
                if not alive:
                    yield self._event("dead", alive, "every drained node is DEAD")
                    return
                if time.time() >= self.deadline:
                    yield self._event("deadline", alive, problem or f"{len(alive)} node(s) "
                                      "still ALIVE at the deadline")
                    return
                await asyncio.sleep(min(self.poll_interval,
                                        max(0.0, self.deadline - time.time())))

    def _event(self, status: str, alive: list[str], message: str) -> TriggerEvent:
        return TriggerEvent({"status": status, "alive": alive, "message": message,
                             "dead": [a for a in self.nodes if a not in alive]})


class _PollingTrigger(LeaseKeepingTrigger):
    """Calls ``_look`` (read-only, in a thread: ``(done, message)``) every ``poll_interval``
    seconds until done or ``deadline`` (epoch seconds), then yields ``{"done", "message"}``.
    A look that fails is looked at again until the deadline."""

    deadline: float
    poll_interval: float

    def _look(self) -> tuple[bool, str]:
        raise NotImplementedError

    async def wait(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                done, message = await asyncio.to_thread(self._look)
            except Exception as exc:  # noqa: BLE001 - looked at again until the deadline
                done, message = False, f"could not look: {exc}"
            if done or time.time() >= self.deadline:
                yield TriggerEvent({"done": done, "message": message})
                return
            await asyncio.sleep(min(self.poll_interval, max(0.0, self.deadline - time.time())))


class ClusterProbeTrigger(_PollingTrigger):
    """Looks at the cluster every ``poll_interval`` seconds with a read-only backend verb until
    it reports done or the deadline passes, then yields ``{"done": bool, "message": str}``.

    The verbs: ``wait_ready`` (the components have rolled out) and ``teardown_done`` (what a
    delete started is gone: a namespace stays Terminating while Kubernetes deletes its
    content). Each look builds the cluster's clients afresh from the store, the vault and
    Airflow's connections, in a thread. A look that fails is retried until the deadline.

    :param lease: the flow's lease.
    :param verb: the backend verb that looks.
    :param deadline: epoch seconds when the wait ends, done or not.
    :param poll_interval: seconds between looks.
    """

    LOOKS: dict[str, dict[str, Any]] = {"wait_ready": {"timeout": 0}, "teardown_done": {}}

    def __init__(self, lease: dict[str, Any], verb: str, deadline: float,
                 poll_interval: float = 5.0):
        super().__init__(lease)
        if verb not in self.LOOKS:
            raise ValueError(f"no read-only look is named {verb!r} ({', '.join(self.LOOKS)})")
        self.verb = verb
        self.deadline = deadline
        self.poll_interval = poll_interval

    def _wait_kwargs(self) -> dict[str, Any]:
        return {"verb": self.verb, "deadline": self.deadline,
                "poll_interval": self.poll_interval}

    def _look(self) -> tuple[bool, str]:
        from airfleet import flows
        from airfleet.store import Store
        from airfleet_airflow.clients import clients_for

        store = Store()
        try:
            seen = flows.probe(store, flows.LeaseRef.from_dict(self.lease), self.verb,
                               clients_for, **self.LOOKS[self.verb])
        finally:
            store.dispose()
        return seen.healthy, seen.message


class EndpointProbeTrigger(_PollingTrigger):
    """Looks at one endpoint version every ``poll_interval`` seconds until its engines are
    ready, Kubernetes gave up on them, or the deadline passes; yields ``{"done": bool,
    "message": str}``. Each look builds the cluster's clients afresh, in a thread.

    :param lease: the flow's lease (on the endpoint's cluster).
    :param name: the endpoint.
    :param version: the version being deployed.
    :param deadline: epoch seconds when the wait ends, ready or not.
    :param poll_interval: seconds between looks.
    """

    def __init__(self, lease: dict[str, Any], name: str, version: str, deadline: float,
                 poll_interval: float = 5.0):
        super().__init__(lease)
        self.name = name
        self.version = version
        self.deadline = deadline
        self.poll_interval = poll_interval

    def _wait_kwargs(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "deadline": self.deadline,
                "poll_interval": self.poll_interval}

    def _look(self) -> tuple[bool, str]:
        from airfleet import endpoint_flows, flows
        from airfleet.store import Store
        from airfleet_airflow.clients import clients_for

        store = Store()
        try:
            seen = endpoint_flows.look(store, flows.LeaseRef.from_dict(self.lease), self.name,
                                       self.version, clients_for)
        finally:
            store.dispose()
        return seen.healthy or seen.failed, seen.message


class _CloudWaitTrigger(LeaseKeepingTrigger):
    """A wait on a backend's :class:`airfleet.backends.Wait` (as a dict: kind, what, args;
    no secret in it), polling every ``poll_interval`` seconds."""

    def __init__(self, wait: dict[str, Any], lease: dict[str, Any], poll_interval: float = 30.0):
        super().__init__(lease)
        self.wait_spec = dict(wait)
        self.poll_interval = poll_interval

    def _wait_kwargs(self) -> dict[str, Any]:
        return {"wait": self.wait_spec, "poll_interval": self.poll_interval}


class EksWaitTrigger(_CloudWaitTrigger):
    """Waits on the amazon provider's EKS waiters (aiobotocore) until a cluster or node group
    is ACTIVE or gone, then yields ``{"status": "success" | "failed", "what", "message"}``.

    :param wait: a :class:`airfleet.backends.Wait` of an EKS kind, as a dict: cluster, region
        and the AWS connection (no secret), and the wait's ``timeout``.
    :param lease: the flow's lease, kept while waiting.
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

    async def wait(self) -> AsyncIterator[TriggerEvent]:
        from airflow.providers.amazon.aws.hooks.eks import EksHook
        from airflow.providers.amazon.aws.utils.waiter_with_logging import async_wait
        from airflow.sdk.exceptions import AirflowException

        args, what = self.wait_spec["args"], self.wait_spec["what"]
        waiter_name, status_args, failure = self.WAITERS[self.wait_spec["kind"]]
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
    :param lease: the flow's lease, kept while waiting.
    :param poll_interval: seconds between polls.
    """

    async def wait(self) -> AsyncIterator[TriggerEvent]:
        from azure.core.exceptions import HttpResponseError

        from airfleet.backends.kubernetes.aks import OPERATION, aks_error
        from airfleet_airflow.hooks import AksHook

        args, what = self.wait_spec["args"], self.wait_spec["what"]
        timeout = float(args.get("timeout", 3600))
        try:
            async with AksHook(args["azure_conn_id"]).async_client(
                    args["subscription_id"], polling_interval=self.poll_interval) as client:
                if self.wait_spec["kind"] == OPERATION:
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


def cloud_wait_trigger(wait: dict[str, Any], lease: dict[str, Any],
                       poll_interval: float) -> LeaseKeepingTrigger:
    """The trigger that waits on a backend's :class:`airfleet.backends.Wait`, keeping the
    flow's ``lease`` meanwhile."""
    if wait["kind"] in EksWaitTrigger.WAITERS:
        return EksWaitTrigger(wait, lease, poll_interval)
    if wait["kind"] in ("azure_operation", "aks_settled"):
        return AksOperationTrigger(wait, lease, poll_interval)
    raise ValueError(f"no trigger waits on {wait['kind']!r}")
