"""The tasks of the endpoint flows (deploy, scale, delete): thin over
:mod:`airfleet.endpoint_flows`, wired like the cluster flows (:mod:`.flow`): ``admit``
(validate, the cluster's lease, the policy pre-check, the version recorded), the steps, the
lease release as teardown, a watcher.

Each flow announces the phase it leaves the endpoint's version in (Running, Failed, Deleted)
as an event of the asset ``airfleet://endpoint/<name>``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import (
    Asset,
    AssetAlias,
    BaseOperator,
    Param,
    TriggerRule,
    get_current_context,
    task,
)
from airflow.sdk.bases.operator import chain

from airfleet.endpoints import ENDPOINT_CONF, endpoint_param_schemas
from airfleet_airflow.flow import (
    ADMIT,
    _holder,
    _store,
    params_of,
    permanent_error,
    release_run,
    say,
    watcher,
)

ENDPOINTS = AssetAlias("airfleet-endpoints")


def endpoint_asset(name: str) -> Asset:
    return Asset(f"airfleet://endpoint/{name}")


def endpoint_params(flow: str) -> dict[str, Param]:
    """The DAG's Params, generated from the flow's conf model (same rules as validate)."""
    return params_of(endpoint_param_schemas(ENDPOINT_CONF[flow]))


def _lease(data: dict[str, Any]):
    from airfleet.flows import LeaseRef

    return LeaseRef.from_dict(data)


def admit(flow: str):
    """Everything a run does before the cluster, in one task (each task costs a process):
    validate the conf against the models, the store and the cluster's record (reads only: a
    bad request fails here and changes nothing; a dry run reports the action and the
    policies' decisions and skips the rest, and so does a delete of an endpoint that is not
    registered), take the *cluster's* lease (no cluster flow runs meanwhile), the policy
    pre-check (a deny fails the run before any change; an approval a policy asks is waited
    for, :mod:`.approval`), then record the version (deploy, scale: Deploying, and the
    weights).

    Its XCom is what validate found with the policies' decisions and ``lease``. What validate
    found is also told at once (XCom ``checked``), so the lease teardown knows the endpoint
    even when this task failed after taking the lease."""
    from airfleet_airflow.approval import AdmitOperator

    return AdmitOperator(flow=flow, decide=decide, write=write).output


def decide(flow: str, context: Any) -> dict[str, Any] | None:
    """Validate, the lease and the policies: the admission, or None (nothing to do)."""
    from airflow.sdk.exceptions import AirflowFailException

    from airfleet import endpoint_flows, flows

    params = context["params"]
    conf = {key: params[key] for key in ENDPOINT_CONF[flow].model_fields if key in params}
    holder = _holder()
    try:
        store = _store()
        checked = endpoint_flows.validate(flow, conf, store)
        if checked["cluster"] is None:
            say(f"endpoint {checked['name']} is not registered: nothing to delete")
            print(f"endpoint {checked['name']} is not registered: nothing to delete")
            return None
        if checked["dry_run"]:
            return _dry_run(context, endpoint_flows.precheck(store, checked, run=holder))
        context["ti"].xcom_push(key="checked", value=checked)
        lease = flows.acquire(store, checked["cluster"], holder)
        approved = endpoint_flows.precheck(store, checked, run=holder)
    except Exception as exc:
        raise permanent_error(exc) from None
    for d in approved["decisions"]:
        print(f"policy {d['policy'] or '-'}: {d['action']} "
              f"{'allowed' if d['allowed'] else 'DENIED'}: {d['reason']}")
    if approved["denied"]:
        say("denied by policy: " + "; ".join(approved["denied"]))
        raise AirflowFailException("denied by policy: " + "; ".join(approved["denied"]))
    return {**approved, "lease": lease.to_dict()}


def write(flow: str, admission: dict[str, Any]) -> dict[str, Any]:
    """Record the version (deploy, scale); the admission is the task's XCom."""
    from airfleet import endpoint_flows

    if flow != "endpoint_delete":
        try:
            endpoint_flows.record(_store(), _lease(admission["lease"]), admission)
        except Exception as exc:
            raise permanent_error(exc) from None
    return admission


def _dry_run(context: Any, report: dict[str, Any]) -> None:
    for d in report["decisions"]:
        print(f"dry run: policy {d['policy'] or '-'}: {d['action']} "
              f"{'allowed' if d['allowed'] else 'DENIED'}: {d['reason']}")
    context["ti"].xcom_push(key="dry_run", value={
        "actions": report["actions"], "decisions": report["decisions"],
        "allowed": not report["denied"], "approval": report["approval"],
        "versions": report["versions"]})
    say("dry run: " + ("allowed" if not report["denied"] else
                       "would be denied: " + "; ".join(report["denied"]))
        + "; nothing was changed")
    print("dry run: nothing was changed; the tasks after admit are skipped")
    return None


@task
def deploy(admitted: dict[str, Any]) -> None:
    """The version's engines created or changed, and the router's weights, on the cluster."""
    from airfleet import endpoint_flows
    from airfleet_airflow.clients import clients_for

    try:
        endpoint_flows.deploy(_store(), _lease(admitted["lease"]), admitted, clients_for)
    except Exception as exc:
        raise permanent_error(exc) from None


@task
def delete(admitted: dict[str, Any]) -> None:
    """Route away from the versions, remove their engines, and verify they are gone."""
    from airflow.sdk.exceptions import AirflowFailException

    from airfleet import endpoint_flows
    from airfleet_airflow.clients import clients_for

    try:
        left = endpoint_flows.delete(_store(), _lease(admitted["lease"]), admitted,
                                     clients_for)
    except Exception as exc:
        raise permanent_error(exc) from None
    versions = ", ".join(admitted["deleting"])
    if left:
        say(f"endpoint {admitted['name']}: left behind: {'; '.join(left)}")
        raise AirflowFailException(f"left behind: {'; '.join(left)}")
    say(f"endpoint {admitted['name']} {versions} deleted: engines verified gone")


class EndpointReadyOperator(BaseOperator):
    """Wait until every replica of the deployed version runs its latest spec and is ready,
    then record Running (or Failed, naming what is not ready). The first ``inline_seconds``
    are looks in this task; a longer wait moves to the triggerer
    (:class:`~airfleet_airflow.triggers.EndpointProbeTrigger`, which renews the lease).

    :param checked: what ``admit`` returned (the endpoint, its version, the lease).
    :param lease: the flow's lease; None: ``checked["lease"]``.
    :param inline_seconds: looks in the task before deferring (default
        ``AIRFLEET_READY_INLINE_SECONDS``).
    :param poll_interval: seconds between looks.
    """

    template_fields = ("checked", "lease")

    def __init__(self, *, checked: Any, lease: Any = None, inline_seconds: float | None = None,
                 poll_interval: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checked = checked
        self.lease = lease
        self.inline_seconds = inline_seconds
        self.poll_interval = poll_interval

    def execute(self, context: Any) -> None:
        import time

        from airfleet import config, endpoint_flows
        from airfleet_airflow.triggers import EndpointProbeTrigger

        if self.lease is None:
            self.lease = self.checked["lease"]
        store, ref = _store(), _lease(self.lease)
        total = endpoint_flows.ready_timeout(store, ref)
        deadline = time.time() + total
        inline = config.ready_inline_seconds() if self.inline_seconds is None \
            else self.inline_seconds
        looking_until = min(deadline, time.time() + inline)
        seen = self._look(store)
        while not seen.healthy and not seen.failed and time.time() < looking_until:
            time.sleep(self.poll_interval)
            seen = self._look(store)
        if seen.healthy or seen.failed or time.time() >= deadline:
            return self._finish(store, seen)
        self.log.info("%s; waiting up to %.0fs more in the triggerer", seen.message,
                      deadline - time.time())
        self.defer(trigger=EndpointProbeTrigger(ref.to_dict(), self.checked["name"],
                                                self.checked["target"], deadline,
                                                self.poll_interval),
                   method_name="execute_complete",
                   timeout=timedelta(seconds=total) + timedelta(minutes=10))

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> None:
        from airfleet_airflow.operators import _fail_if_lease_lost

        _fail_if_lease_lost(event)
        if self.lease is None:
            self.lease = self.checked["lease"]
        store = _store()
        self._finish(store, self._look(store))

    def _look(self, store):
        from airfleet import endpoint_flows
        from airfleet_airflow.clients import clients_for

        try:
            return endpoint_flows.look(store, _lease(self.lease), self.checked["name"],
                                       self.checked["target"], clients_for)
        except Exception as exc:
            raise permanent_error(exc) from None

    def _finish(self, store, seen) -> None:
        from airflow.sdk.exceptions import AirflowFailException

        from airfleet import endpoint_flows

        name, version = self.checked["name"], self.checked["target"]
        endpoint_flows.finish(store, _lease(self.lease), name, version, seen)
        if not seen.healthy:
            say(f"endpoint {name} {version} not ready: {seen.message}")
            raise AirflowFailException(f"endpoint {name} {version} not ready: {seen.message}")
        say(f"endpoint {name} {version} Running: {seen.message}")


@task(trigger_rule=TriggerRule.ALL_DONE, outlets=[ENDPOINTS])
def release_lease() -> None:
    """Free the cluster's lease (whatever happened, even when ``admit`` failed after taking
    it): a version this run left Deploying is Failed; then announce each version's phase as
    an event of the endpoint's asset."""
    from airfleet import endpoint_flows

    ti = get_current_context()["ti"]
    admitted = ti.xcom_pull(task_ids=ADMIT)
    checked = admitted or ti.xcom_pull(task_ids=ADMIT, key="checked")
    ended: dict[str, dict[str, str]] = {}

    def versions(store, ref) -> None:
        if checked:
            ended[ref.name] = endpoint_flows.release(store, ref, checked)

    for ref in release_run(admitted and admitted["lease"], before=versions):
        asset = endpoint_asset(checked["name"])
        for version, phase in ended.get(ref.name, {}).items():
            get_current_context()["outlet_events"][ENDPOINTS].add(
                asset, extra={"endpoint": checked["name"], "version": version,
                              "phase": phase, "cluster": ref.name, "run": ref.holder})
            print(f"asset event {asset.uri}: {version} {phase}")


def guarded(admitted, *steps) -> None:
    """``admit -> steps``, the lease release as their teardown (no setup: see
    :func:`airfleet_airflow.flow.guarded`), and a watcher."""
    release = release_lease().as_teardown()
    chain(admitted, *steps, release)
    [admitted, *steps] >> watcher()
