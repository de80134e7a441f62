"""The tasks every Airfleet flow is built from, and the wiring they share.

Each task is a thin Airflow face over :mod:`airfleet.flows`: it opens the store, calls one
step and turns a permanent error (bad request, policy denial, lease held) into
``AirflowFailException`` so no retry is wasted on it. Heavy imports happen inside the tasks,
so a DAG file parses with ``airflow.sdk`` and the resource models only.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, AssetAlias, Param, TriggerRule, get_current_context, task
from airflow.sdk.bases.operator import chain

from airfleet.resources import FLOW_CONF, param_schemas

TAGS = ["airfleet"]
# Every flow announces the phase it leaves a cluster in (Running, Failed, Deleted) as an event
# of the asset ``airfleet://cluster/<name>``, through this alias: downstream DAGs schedule on
# one cluster's asset (e.g. deploy an endpoint once it is Running).
CLUSTERS = AssetAlias("airfleet-clusters")


def cluster_asset(name: str) -> Asset:
    return Asset(f"airfleet://cluster/{name}")
DEFAULT_ARGS: dict[str, Any] = {"owner": "airfleet", "retries": 0,
                                "retry_delay": timedelta(seconds=30)}


def flow_params(action: str) -> dict[str, Param]:
    """The DAG's Params, generated from the flow's conf model (same rules as the first task)."""
    return params_of(param_schemas(FLOW_CONF[action]))


def params_of(schemas: dict[str, dict[str, Any]]) -> dict[str, Param]:
    """Airflow Params from JSON schemas, one per conf key."""
    params = {}
    for key, schema in schemas.items():
        schema = dict(schema)
        description = schema.pop("description", None)
        if "description_md" in schema:  # the form shows it only when description is None
            description = None
        if "default" in schema:
            params[key] = Param(schema.pop("default"), description=description, **schema)
        else:
            params[key] = Param(description=description, **schema)
    return params


def _holder() -> str:
    """A lease is held by the DAG run: ``<dag_id>/<run_id>``."""
    ctx = get_current_context()
    return f"{ctx['dag'].dag_id}/{ctx['run_id']}"


def _store():
    from airfleet.store import Store

    return Store()


def say(text: str) -> None:
    """One line for the run's note, from this task (Airflow shows the note's first line): what
    the store cannot tell, e.g. why a request was refused before anything was recorded."""
    from airfleet.fleet import NOTE_KEY

    try:
        context = get_current_context()
    except Exception:  # noqa: BLE001 - not inside a task: no run to tell
        return
    context["ti"].xcom_push(key=NOTE_KEY, value=text)


def permanent_error(exc: Exception) -> Exception:
    """Errors that a retry cannot fix fail the task for good. Either way the reason goes to
    the run note."""
    from airflow.sdk.exceptions import AirflowFailException

    from airfleet.errors import AirfleetError, ClusterUnhealthy

    say(str(exc))
    if isinstance(exc, AirfleetError) and not isinstance(exc, ClusterUnhealthy):
        return AirflowFailException(str(exc))
    return exc


def _lease(data: dict[str, Any]):
    from airfleet.flows import LeaseRef

    return LeaseRef.from_dict(data)


def _vault_put():
    from airfleet.vault import Vault

    return Vault.default().put_sealed


ADMIT = "admit"  # the first task's id: its XCom is the run's lease


def admit(action: str):
    """Everything a run does before the backend, in one task (each task costs a process):

    1. validate the conf against the models and the backend (reads only: a bad request
       fails here and changes nothing). A dry run ends here: it reports the run's actions
       and the policies' decisions (log and XCom ``dry_run``) and skips every later task, so
       no lease is taken and nothing changes;
    2. take the cluster's lease (held by another run: fail, nothing changed);
    3. every bound policy judges each action of the run (recorded in the audit trail); a
       deny fails the run before any change to the cluster. A policy may allow once a human
       approves: the task then waits for the approval (:mod:`.approval`);
    4. the first writes: record the cluster (create, onboard; sealed credentials go to the
       vault) or the desired spec (update), then the flow's transient phase (Provisioning,
       Updating, Deleting). A delete of a cluster that is not registered skips the rest.

    Its XCom is the lease (name, holder, token; a delete adds ``force``). The lease teardown
    finds what this run holds by its holder, so it frees the lease even when this task
    failed after taking it."""
    from airfleet_airflow.approval import AdmitOperator

    return AdmitOperator(flow=action, decide=decide, write=write).output


def decide(action: str, context: Any) -> dict[str, Any] | None:
    """Steps 1-3 of :func:`admit`: the admission, or None for a dry run."""
    from airflow.sdk.exceptions import AirflowFailException

    from airfleet import flows
    from airfleet_airflow.clients import clients_for

    params = context["params"]
    conf = {key: params[key] for key in FLOW_CONF[action].model_fields if key in params}
    holder = _holder()
    try:
        store = _store()
        # Credentials resolve, and the backend's preflight passes, before anything is touched.
        checked = flows.validate(action, conf, store, clients_for)
        if checked["dry_run"]:
            report = flows.precheck(store, checked, run=holder)
        else:
            lease = flows.acquire(store, checked["name"], holder)
            approved = flows.precheck(store, checked, run=holder)
    except Exception as exc:
        raise permanent_error(exc) from None
    if checked["dry_run"]:
        _print_decisions(report, "dry run: ")
        context["ti"].xcom_push(key="dry_run", value={
            "actions": report["actions"], "decisions": report["decisions"],
            "allowed": not report["denied"], "approval": report["approval"],
            "request": report["request"]})
        print("dry run: nothing was changed; the tasks after admit are skipped")
        return None
    _print_decisions(approved)
    if approved["denied"]:
        say("denied by policy: " + "; ".join(approved["denied"]))
        raise AirflowFailException("denied by policy: " + "; ".join(approved["denied"]))
    return {**approved, "lease": lease.to_dict()}


def write(action: str, admission: dict[str, Any]) -> dict[str, Any] | None:
    """Step 4 of :func:`admit`: the lease, or None when there is nothing to do."""
    from airfleet import flows

    lease = _lease(admission["lease"])
    try:
        if not flows.admit(action, _store(), lease, admission, _vault_put()):
            say(f"cluster {lease.name} is not registered: nothing to delete")
            print(f"cluster {lease.name} is not registered: nothing to delete")
            return None
    except Exception as exc:
        raise permanent_error(exc) from None
    if action == "delete":
        return {**lease.to_dict(), "force": admission["force"]}
    return lease.to_dict()


def release_run(admitted: dict[str, Any] | None, before=None) -> list[Any]:
    """Free every lease this run holds (``admitted``: the lease its admit task returned, when
    it got that far): the store's leases held by ``<dag_id>/<run_id>``, so a lease taken by a
    task that failed right after is freed too. ``before(store, ref)`` runs first, under the
    lease. Raises AirflowSkipException when the run took none (a bad conf, a dry run, a
    lease held by another run). Returns the leases."""
    from airflow.sdk.exceptions import AirflowSkipException

    from airfleet import flows

    store = _store()
    refs = {ref.name: ref for ref in flows.held_by(store, _holder())}
    if admitted and admitted["name"] not in refs:  # taken over meanwhile: said by release
        refs[admitted["name"]] = _lease(admitted)
    if not refs:
        raise AirflowSkipException("this run took no lease: nothing to release")
    for ref in refs.values():
        if before is not None:
            before(store, ref)
        flows.release(store, ref)
    return list(refs.values())


@task(trigger_rule=TriggerRule.ALL_DONE, outlets=[CLUSTERS])
def release_lease() -> None:
    """Free the lease (whatever happened), then announce the phase the run ended in."""
    from airfleet import flows

    store = _store()
    for ref in release_run(get_current_context()["ti"].xcom_pull(task_ids=ADMIT)):
        phase = flows.ended_in(store, ref)
        if phase is not None:
            asset = cluster_asset(ref.name)
            get_current_context()["outlet_events"][CLUSTERS].add(
                asset, extra={"cluster": ref.name, "phase": phase.value, "run": ref.holder})
            print(f"asset event {asset.uri}: {phase.value}")


def _print_decisions(checked: dict[str, Any], prefix: str = "") -> None:
    import json

    for action in checked["actions"]:
        print(f"{prefix}action {action['action']}: {json.dumps(action['input'])}")
    for d in checked["decisions"]:
        changed = f" (changed {', '.join(d['changed'])})" if d["changed"] else ""
        print(f"{prefix}policy {d['policy'] or '-'}: {d['action']} "
              f"{'allowed' if d['allowed'] else 'DENIED'}{changed}: {d['reason']}")
    if checked.get("approval"):
        approval = checked["approval"]
        print(f"{prefix}approval by {' or '.join(approval['approvers'])} "
              f"(up to {approval['timeout_seconds']:g} s): {approval['reason']}")


@task
def backend_step(lease: dict[str, Any], verb: str) -> None:
    """One backend verb (provision, apply, query, detect_accelerators)."""
    from airfleet import flows
    from airfleet_airflow.clients import clients_for

    try:
        flows.run_verb(_store(), _lease(lease), verb, clients_for)
    except Exception as exc:
        raise permanent_error(exc) from None


@task
def deleted(lease: dict[str, Any]) -> None:
    from airfleet import flows

    flows.delete_done(_store(), _lease(lease))


@task(trigger_rule=TriggerRule.ONE_FAILED, retries=0)
def watcher() -> None:
    """Fails the run when any step failed, even though the lease teardown succeeded."""
    from airflow.sdk.exceptions import AirflowFailException

    raise AirflowFailException("a step of this run failed; see the failed task's log")


def guarded(admitted, *steps) -> None:
    """Wire ``admit -> steps`` in order, the lease release as their teardown, and a watcher.

    The teardown has no setup task: a setup that failed would skip its teardown, and admit
    may fail after it took the lease (a policy deny). It runs once everything before it is
    done, and finds the lease by the run that holds it."""
    release = release_lease().as_teardown()
    chain(admitted, *steps, release)
    [admitted, *steps] >> watcher()
