"""Airfleet's operators: one task each, thin over ``airfleet.flows`` and the backends."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator

# Extra time the deferral may take beyond the drain deadline before Airflow fails the task
# (the trigger itself reports the deadline; this only guards against a lost trigger).
DEFER_MARGIN = timedelta(minutes=10)
LEASE_TASK = "admit"  # the task id of airfleet_airflow.flow.admit (its XCom: the lease)


def _fail_if_lease_lost(event: dict[str, Any] | None) -> None:
    """A wait that ended because the run lost its lease fails the task, no retry: the
    cluster is another run's now, and a retry would hold a stale fencing token anyway."""
    from airflow.sdk.exceptions import AirflowFailException

    from airfleet_airflow.triggers import LEASE_LOST

    if event and event.get("status") == LEASE_LOST:
        raise AirflowFailException(event["message"])


class _FlowOperator(BaseOperator):
    """An operator that runs backend verbs under the flow's lease."""

    template_fields = ("lease",)

    def __init__(self, *, lease: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lease = lease

    def _verb(self, verb: str, **kwargs: Any) -> Any:
        from airfleet import flows
        from airfleet.store import Store
        from airfleet_airflow.clients import clients_for
        from airfleet_airflow.flow import permanent_error

        try:
            return flows.run_verb(Store(), flows.LeaseRef.from_dict(self.lease), verb,
                                  clients_for, **kwargs)
        except Exception as exc:
            raise permanent_error(exc) from None


class DetectAcceleratorsOperator(_FlowOperator):
    """Find each node's accelerators and record them on the cluster.

    Static nodes: ``lspci -nn`` (NVIDIA and AMD devices, even without a driver), then
    ``nvidia-smi`` (model, memory, driver), then the container runtime's GPU support; each
    stage is logged per node, and a missing or failing ``nvidia-smi`` never counts as a GPU.
    Kubernetes: node labels and allocatable resources. Runs before set-up, so Ray nodes start
    with the GPUs found.

    :param lease: the flow's lease (the ``admit`` XCom).
    """

    def execute(self, context: Any) -> dict[str, Any]:
        found = self._verb("detect_accelerators")
        self.log.info("accelerators: %s in all, by model %s", found.get("count", 0),
                      found.get("models", {}))
        return {"count": found.get("count", 0), "models": found.get("models", {})}


class WaitReadyOperator(_FlowOperator):
    """Wait until the cluster's components are ready (Kubernetes: every Deployment Available).

    The backend says how long the wait may take in all (``ready_timeout``; 0: ``apply``
    already waited). The first ``inline_seconds`` are a watch inside this task, which is
    where most waits end; a longer wait moves to the triggerer (:class:`ClusterProbeTrigger`)
    so no worker slot is held through image pulls. The last look is recorded: not ready at the
    deadline fails the task, and the cluster, naming each component that is not.

    :param lease: the flow's lease (the ``admit`` XCom).
    :param finish: ``(phase, reason)`` to record once ready (the flow's outcome, e.g.
        ``("Running", "Created")``), or None to record nothing more.
    :param inline_seconds: how long to watch in the task before deferring (default
        ``AIRFLEET_READY_INLINE_SECONDS``, 30).
    :param poll_interval: seconds between looks while deferred.
    """

    def __init__(self, *, lease: Any, finish: tuple[str, str] | None = None,
                 inline_seconds: float | None = None, poll_interval: float = 5.0,
                 **kwargs: Any) -> None:
        super().__init__(lease=lease, **kwargs)
        self.finish = finish
        self.inline_seconds = inline_seconds
        self.poll_interval = poll_interval

    def execute(self, context: Any) -> None:
        import time

        from airfleet import config, flows
        from airfleet.backends import get_backend
        from airfleet.store import Store
        from airfleet_airflow.clients import clients_for
        from airfleet_airflow.flow import permanent_error
        from airfleet_airflow.triggers import ClusterProbeTrigger

        store, ref = Store(), flows.LeaseRef.from_dict(self.lease)
        cluster = store.require_cluster(ref.name).cluster
        total = get_backend(cluster.spec.type).ready_timeout(cluster)
        deadline = time.time() + total
        inline = config.ready_inline_seconds() if self.inline_seconds is None \
            else self.inline_seconds
        if total > inline:
            try:
                seen = flows.probe(store, ref, "wait_ready", clients_for, timeout=inline)
            except Exception as exc:
                raise permanent_error(exc) from None
            if not seen.healthy:
                self.log.info("%s; waiting up to %.0fs more in the triggerer", seen.message,
                              deadline - time.time())
                lease = ref.to_dict()
                self.defer(trigger=ClusterProbeTrigger(lease, "wait_ready", deadline,
                                                       self.poll_interval),
                           method_name="execute_complete",
                           timeout=timedelta(seconds=total) + DEFER_MARGIN)
        self._verb("wait_ready", timeout=max(0.0, deadline - time.time()))
        self._finish()

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> None:
        _fail_if_lease_lost(event)
        self.log.info("readiness wait ended: %s", (event or {}).get("message", "no event"))
        self._verb("wait_ready", timeout=0)
        self._finish()

    def _finish(self) -> None:
        from airfleet import flows
        from airfleet.resources import Phase
        from airfleet.store import Store

        if self.finish is None:
            return
        phase, reason = self.finish
        flows.finish(Store(), flows.LeaseRef.from_dict(self.lease), Phase(phase), reason)
        self.log.info("cluster %s: %s (%s)", self.lease["name"], phase, reason)


class CloudReconcileOperator(_FlowOperator):
    """Drive a reconcile verb of the backend to its end: ``provision`` (create), ``scale``
    (update) or ``deprovision`` (delete).

    Each pass looks at what exists, makes what is missing and returns what is still in
    progress (an EKS cluster CREATING, an Azure operation); this task then defers to the
    triggerer (:func:`~airfleet_airflow.triggers.cloud_wait_trigger`) and, when the wait ends,
    runs the next pass. Nothing to wait for (static nodes, an existing cluster): one pass, no
    deferral. A wait that fails (a node group CREATE_FAILED, an AKS operation Failed) fails
    the task, and the cluster, with the cloud's own message.

    :param lease: the flow's lease (the ``admit`` XCom); None: pulled from XCom when
        the task runs (for a task that must not depend on the lease setup directly).
    :param verb: the backend verb.
    :param then: steps to run, in order, once ``verb`` converged, in this task rather than a
        task each (each task costs a process and a scheduling round): backend verbs (create:
        detect the accelerators, then set up), or ``"drain_nodes"`` (update: :meth:`_drain`).
    :param poll_interval: seconds between polls in the triggerer (default
        ``AIRFLEET_CLOUD_POLL_SECONDS``, 30).
    """

    MAX_PASSES = 100  # a guard: passes that never converge end here, not in a loop
    DRAIN_POLL_SECONDS = 5.0  # between dashboard probes while a drain waits in the triggerer

    def __init__(self, *, lease: Any, verb: str, then: list[str] | tuple[str, ...] = (),
                 poll_interval: float | None = None, **kwargs: Any) -> None:
        super().__init__(lease=lease, **kwargs)
        self.verb = verb
        self.then = list(then)
        self.poll_interval = poll_interval

    def execute(self, context: Any) -> None:
        if not self._resolve_lease(context):  # the run failed before it took the lease
            self.log.info("no lease was taken: this run changed nothing")
            return
        self._pass(1)

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None,
                         passes: int = 1) -> None:
        self._resolve_lease(context)
        _fail_if_lease_lost(event)
        if not event or event.get("status") != "success":
            message = (event or {}).get("message") or "the wait ended without an event"
            self._fail(f"{self.verb} failed: {message}")
        self.log.info("%s", event["message"])
        self._pass(passes + 1)

    def _resolve_lease(self, context: Any) -> Any:
        if self.lease is None:  # given no lease: the one this run's admit took
            self.lease = context["ti"].xcom_pull(task_ids=LEASE_TASK)
        return self.lease

    def _pass(self, passes: int) -> None:
        from airfleet import config, flows
        from airfleet_airflow.triggers import cloud_wait_trigger

        if passes > self.MAX_PASSES:
            self._fail(f"{self.verb} did not converge in {self.MAX_PASSES} passes")
        wait = self._verb(self.verb, **self._verb_kwargs())
        if wait is None:
            self._done()
            return
        wait = wait.to_dict()
        poll = config.cloud_poll_seconds() if self.poll_interval is None else self.poll_interval
        timeout = float(wait["args"].get("timeout", 3600))
        self.log.info("%s; waiting up to %.0fs in the triggerer", wait["what"], timeout)
        lease = flows.LeaseRef.from_dict(self.lease).to_dict()
        self.defer(trigger=cloud_wait_trigger(wait, lease, poll), method_name="execute_complete",
                   kwargs={"passes": passes}, timeout=timedelta(seconds=timeout) + DEFER_MARGIN)

    def _verb_kwargs(self) -> dict[str, Any]:
        return {}

    def _done(self, start: int = 0) -> None:
        """After the last pass: the ``then`` steps, from ``start`` on."""
        for verb in self.then[start:]:
            self.log.info("%s", verb)
            if verb == "drain_nodes":
                self._drain()
                continue
            found = self._verb(verb)
            if verb == "detect_accelerators":
                self.log.info("accelerators: %s in all, by model %s", found.get("count", 0),
                              found.get("models", {}))

    def _drain(self) -> None:
        """Drain the Ray workers that the desired spec no longer lists, then stop them.

        ``ray drain-node`` (reason PREEMPTION, a message naming the run, the spec's
        ``drain_deadline_seconds``) lets running work finish while nothing new lands there;
        the wait for DEAD runs in the triggerer (:class:`RayNodesDeadTrigger`), not in a
        worker slot, and keeps the run's lease however long the drain takes (a lease lost
        meanwhile fails the task). A node still busy at the deadline is stopped by force, and
        its status says so. With nothing removed, nothing is done. :meth:`drained` goes on
        with the steps after it."""
        import time

        from airfleet import flows
        from airfleet_airflow.triggers import RayNodesDeadTrigger

        ticket = self._verb("drain_nodes")
        if not ticket["removed"]:
            self.log.info("no worker was removed from the spec: nothing to drain")
            return
        if not ticket["nodes"]:
            self.log.info("removed workers %s are not ALIVE: stopping them", ticket["removed"])
            self._verb("stop_nodes", forced=[])
            return
        self.log.info("draining %s (deadline %s s)", ticket["nodes"], ticket["deadline_seconds"])
        lease = flows.LeaseRef.from_dict(self.lease).to_dict()  # no secret: name, run, token
        self.defer(
            trigger=RayNodesDeadTrigger(lease, ticket["nodes"],
                                        time.time() + ticket["deadline_seconds"],
                                        self.DRAIN_POLL_SECONDS),
            method_name="drained",
            timeout=timedelta(seconds=ticket["deadline_seconds"]) + DEFER_MARGIN)

    def drained(self, context: Any, event: dict[str, Any] | None = None) -> None:
        """The drain's wait ended: stop what is still alive, then the steps after it. Where to
        go on is found from ``then``, not passed in the deferral's kwargs: ``dag.test()``
        resumes a task with the event alone."""
        from airflow.sdk.exceptions import AirflowException

        self._resolve_lease(context)
        if event is None:
            raise AirflowException("the drain trigger ended without an event")
        _fail_if_lease_lost(event)
        self.log.info("drain ended (%s): %s; forced stop for %s", event["status"],
                      event["message"], event["alive"] or "none")
        self._verb("stop_nodes", forced=event["alive"])
        self._done(self.then.index("drain_nodes") + 1)

    def _fail(self, message: str) -> None:
        from airflow.sdk.exceptions import AirflowFailException

        from airfleet import flows
        from airfleet.store import Store

        flows.fail(Store(), flows.LeaseRef.from_dict(self.lease),
                   f"{self.verb.title().replace('_', '')}Failed", message)
        raise AirflowFailException(message)


class CleanupFailedRunOperator(CloudReconcileOperator):
    """When a step of the run failed: remove the cloud resources this run created (never the
    ones it adopted) if the spec's ``delete_on_failure`` allows, and add to the cluster's
    Failed message what was removed, or what remains. A no-op when the run created nothing.

    It runs only when a step failed (``one_failed``) and finds the lease in XCom: a direct
    XComArg would make it a direct downstream of the lease setup, which Airflow allows only
    with ``all_success``.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "one_failed")
        super().__init__(lease=None, verb="cleanup_failed_run", **kwargs)

    def _created(self) -> list[str]:
        """What this run created, as the store recorded it the moment each came to exist."""
        from airfleet import flows
        from airfleet.store import Store

        return flows.created_by_run(Store(), flows.LeaseRef.from_dict(self.lease))

    def _verb_kwargs(self) -> dict[str, Any]:
        created = self._created()
        self.log.info("this run created: %s", ", ".join(created) or "nothing")
        return {"created": created}

    def _done(self, start: int = 0) -> None:
        from airfleet import flows
        from airfleet.store import Store

        created = self._created()
        if not created:
            return
        store, ref = Store(), flows.LeaseRef.from_dict(self.lease)
        removed = store.require_cluster(ref.name).cluster.spec.block.delete_on_failure
        if removed:
            note = "removed what this run created: " + ", ".join(created)
        else:
            note = ("kept what this run created (delete_on_failure is false): "
                    + ", ".join(created) + "; remove them with airfleet_cluster_delete")
        self.log.info("%s", note)
        flows.note_cleanup(store, ref, note, removed=created if removed else [])


class TeardownOperator(_FlowOperator):
    """Remove the cluster's own components (Ray nodes; the namespace), then wait until what
    the teardown started is gone: Kubernetes keeps a deleted namespace Terminating while it
    deletes the content, minutes on a real cluster. The first ``inline_seconds`` of the wait
    are looks inside this task; a longer one moves to the triggerer
    (:class:`ClusterProbeTrigger`, renewing the lease) so no worker slot is held.

    What is left fails the run, each item named, with what ``"force": true`` does; with force
    it is recorded and the delete goes on (:func:`airfleet.flows.teardown_left`).

    :param lease: the flow's lease (the ``admit`` XCom).
    :param checked: what ``admit`` returned (its ``force``).
    :param inline_seconds: how long to look in the task before deferring (default
        ``AIRFLEET_READY_INLINE_SECONDS``, 30).
    :param poll_interval: seconds between looks.
    """

    template_fields = ("lease", "checked")

    def __init__(self, *, lease: Any, checked: Any, inline_seconds: float | None = None,
                 poll_interval: float = 5.0, **kwargs: Any) -> None:
        super().__init__(lease=lease, **kwargs)
        self.checked = checked
        self.inline_seconds = inline_seconds
        self.poll_interval = poll_interval

    def execute(self, context: Any) -> None:
        import time

        from airfleet import config
        from airfleet.backends import get_backend
        from airfleet.store import Store
        from airfleet_airflow.triggers import ClusterProbeTrigger

        left = self._verb("teardown", force=self._force)
        if left:  # what it could not even start on (not ours; forced past an API that is gone)
            self._left(left)
            return
        cluster = Store().require_cluster(self.lease["name"]).cluster
        total = get_backend(cluster.spec.type).teardown_timeout(cluster)
        deadline = time.time() + total
        inline = config.ready_inline_seconds() if self.inline_seconds is None \
            else self.inline_seconds
        looking_until = min(deadline, time.time() + inline)
        seen = self._look()
        while not seen.healthy and time.time() < looking_until:
            time.sleep(0.5)
            seen = self._look()
        if not seen.healthy and time.time() < deadline:
            self.log.info("%s; waiting up to %.0fs more in the triggerer", seen.message,
                          deadline - time.time())
            self.defer(trigger=ClusterProbeTrigger(self.lease, "teardown_done", deadline,
                                                   self.poll_interval),
                       method_name="execute_complete",
                       timeout=timedelta(seconds=total) + DEFER_MARGIN)
        self._left([] if seen.healthy else [seen.message])

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> None:
        _fail_if_lease_lost(event)
        self.log.info("teardown wait ended: %s", (event or {}).get("message", "no event"))
        seen = self._look()  # the last look decides
        self._left([] if seen.healthy else [seen.message])

    @property
    def _force(self) -> bool:
        return bool((self.checked or {}).get("force"))

    def _look(self) -> Any:
        from airfleet import flows
        from airfleet.store import Store
        from airfleet_airflow.clients import clients_for
        from airfleet_airflow.flow import permanent_error

        try:
            return flows.probe(Store(), flows.LeaseRef.from_dict(self.lease), "teardown_done",
                               clients_for)
        except Exception as exc:
            raise permanent_error(exc) from None

    def _left(self, left: list[str]) -> None:
        from airfleet import flows
        from airfleet.store import Store
        from airfleet_airflow.flow import permanent_error

        try:
            flows.teardown_left(Store(), flows.LeaseRef.from_dict(self.lease), left,
                                force=self._force)
        except Exception as exc:
            raise permanent_error(exc) from None
