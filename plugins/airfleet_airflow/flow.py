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


@task.short_circuit
def validate(action: str) -> dict[str, Any] | None:
    """Check the conf against the models and the backend; reads only, writes nothing.

    A dry run ends here: it reports the run's actions and the policies' decisions (log and
    XCom ``dry_run``) and skips every later task, so no lease is taken and nothing changes."""
    from airfleet import flows
    from airfleet_airflow.clients import clients_for

    context = get_current_context()
    params = context["params"]
    conf = {key: params[key] for key in FLOW_CONF[action].model_fields if key in params}
    try:
        store = _store()
        # Credentials resolve, and the backend's preflight passes, before anything is touched.
        checked = flows.validate(action, conf, store, clients_for)
        if not checked["dry_run"]:
            return checked
        report = flows.precheck(store, checked, run=_holder())
    except Exception as exc:
        raise permanent_error(exc) from None
    _print_decisions(report, "dry run: ")
    context["ti"].xcom_push(key="dry_run", value={
        "actions": report["actions"], "decisions": report["decisions"],
        "allowed": not report["denied"], "request": report["request"]})
    print("dry run: nothing was changed; the tasks after validate are skipped")
    return None


@task
def acquire_lease(checked: dict[str, Any]) -> dict[str, Any]:
    from airfleet import flows

    try:
        return flows.acquire(_store(), checked["name"], _holder()).to_dict()
    except Exception as exc:
        raise permanent_error(exc) from None


@task(trigger_rule=TriggerRule.ALL_DONE, outlets=[CLUSTERS])
def release_lease(lease: dict[str, Any]) -> None:
    """Free the lease (whatever happened), then announce the phase the run ended in."""
    from airfleet import flows

    store, ref = _store(), _lease(lease)
    flows.release(store, ref)
    phase = flows.ended_in(store, ref)
    if phase is not None:
        asset = cluster_asset(ref.name)
        get_current_context()["outlet_events"][CLUSTERS].add(
            asset, extra={"cluster": ref.name, "phase": phase.value, "run": ref.holder})
        print(f"asset event {asset.uri}: {phase.value}")


@task
def policy_precheck(checked: dict[str, Any]) -> dict[str, Any]:
    """Every bound policy judges each action of the run; a deny fails the run before any
    change. Returns ``checked`` with the request as the policies changed it."""
    from airflow.sdk.exceptions import AirflowFailException

    from airfleet import flows

    try:
        approved = flows.precheck(_store(), checked, run=_holder())
    except Exception as exc:
        raise permanent_error(exc) from None
    _print_decisions(approved)
    if approved["denied"]:
        say("denied by policy: " + "; ".join(approved["denied"]))
        raise AirflowFailException("denied by policy: " + "; ".join(approved["denied"]))
    return approved


def _print_decisions(checked: dict[str, Any], prefix: str = "") -> None:
    import json

    for action in checked["actions"]:
        print(f"{prefix}action {action['action']}: {json.dumps(action['input'])}")
    for d in checked["decisions"]:
        changed = f" (changed {', '.join(d['changed'])})" if d["changed"] else ""
        print(f"{prefix}policy {d['policy'] or '-'}: {d['action']} "
              f"{'allowed' if d['allowed'] else 'DENIED'}{changed}: {d['reason']}")


@task
def register(checked: dict[str, Any], lease: dict[str, Any]) -> int:
    """Record the cluster (sealed credentials go to the vault); returns its generation."""
    from airfleet import flows

    try:
        return flows.register(_store(), _lease(lease), checked["request"], _vault_put()).generation
    except Exception as exc:
        raise permanent_error(exc) from None


@task
def record_desired(checked: dict[str, Any], lease: dict[str, Any]) -> int:
    from airfleet import flows

    try:
        return flows.record_desired(_store(), _lease(lease), checked["request"],
                                    _vault_put()).generation
    except Exception as exc:
        raise permanent_error(exc) from None


@task
def begin(lease: dict[str, Any], phase: str, reason: str) -> None:
    from airfleet import flows
    from airfleet.resources import Phase

    try:
        flows.begin(_store(), _lease(lease), Phase(phase), reason)
    except Exception as exc:
        raise permanent_error(exc) from None


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
def finish(lease: dict[str, Any], phase: str, reason: str) -> None:
    from airfleet import flows
    from airfleet.resources import Phase

    flows.finish(_store(), _lease(lease), Phase(phase), reason)


@task.short_circuit
def is_registered(lease: dict[str, Any]) -> bool:
    """Delete of a cluster that is not (or no longer) registered is already done."""
    if _store().get_cluster(lease["name"]) is None:
        say(f"cluster {lease['name']} is not registered: nothing to delete")
        print(f"cluster {lease['name']} is not registered: nothing to delete")
        return False
    return True


@task
def deleted(lease: dict[str, Any]) -> None:
    from airfleet import flows

    flows.delete_done(_store(), _lease(lease))


@task(trigger_rule=TriggerRule.ONE_FAILED, retries=0)
def watcher() -> None:
    """Fails the run when any step failed, even though the lease teardown succeeded."""
    from airflow.sdk.exceptions import AirflowFailException

    raise AirflowFailException("a step of this run failed; see the failed task's log")


def guarded(lease, *steps) -> None:
    """Wire ``lease -> steps`` in order, the lease release as their teardown, and a watcher."""
    release = release_lease(lease).as_teardown(setups=lease)
    chain(lease, *steps, release)
    steps[-1] >> release
    list(steps) >> watcher()
