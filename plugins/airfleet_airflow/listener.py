"""Each Airfleet run ends with an Airflow run note saying what it changed.

Tasks cannot write their own run's note (the task SDK has no call for it), so the scheduler
does, when the run finishes: this listener builds the note from the events the run wrote into
Airfleet's store and sets it on the run inside the scheduler's own session, so it is committed
with the run's final state (no second writer on the metadata database).
"""

from __future__ import annotations

import logging

from airflow.listeners import hookimpl

log = logging.getLogger(__name__)


@hookimpl
def on_dag_run_success(dag_run, msg: str) -> None:
    _note(dag_run)


@hookimpl
def on_dag_run_failed(dag_run, msg: str) -> None:
    _note(dag_run)


def _note(dag_run) -> None:
    if not dag_run.dag_id.startswith("airfleet_"):
        return
    # Imported here: the plugin loads in every Airflow process, task workers included.
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy.orm import object_session

    try:
        session = object_session(dag_run)
        if session is not None:  # the scheduler's: the note commits with the run's state
            _write(session, dag_run)
            return
        with create_session() as own:  # a detached run (``dag.test()``): a session of ours
            _write(own, own.get(DagRun, dag_run.id))
    except Exception:  # noqa: BLE001 - a note is not worth failing the scheduler loop for
        log.exception("Airfleet: no run note for %s", dag_run.run_id)


def _write(session, dag_run) -> None:
    from airflow.models.xcom import XComModel

    from airfleet.fleet import NOTE_KEY, run_note
    from airfleet.store import Store

    if dag_run.note:
        return  # a person wrote one: theirs stands
    # The watcher fails whenever a step did (flow.guarded): the steps are the news, the first
    # to fail is the cause.
    failed = [ti.task_id for ti in sorted(
        dag_run.get_task_instances(state=["failed"], session=session),
        key=lambda ti: (ti.end_date is None, ti.end_date)) if ti.task_id != "watcher"]
    told = session.scalars(XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id,
                                              key=NOTE_KEY))
    notes = {x.task_id: str(XComModel.deserialize_value(x)) for x in told}
    store = Store()
    try:
        events = store.run_events(f"{dag_run.dag_id}/{dag_run.run_id}")
    finally:
        store.dispose()  # the scheduler lives long: no pool left behind per run
    dag_run.note = run_note(events, failed_tasks=failed, notes=notes,
                            dry_run=bool((dag_run.conf or {}).get("dry_run")))
