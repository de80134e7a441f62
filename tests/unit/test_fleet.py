"""Run notes: what a run changed, as Airflow shows it on the run."""

from __future__ import annotations

from datetime import UTC, datetime

from airfleet.fleet import NOTE_LIMIT, run_note
from airfleet.store import Event

RUN = "airfleet_cluster_health_check/scheduled__1"


def _event(cluster: str, reason: str, frm: str | None = None, to: str | None = None,
           message: str = "") -> Event:
    kind = "Transition" if frm and to else "Normal"
    return Event(cluster, datetime.now(UTC), kind, frm, to, reason, message, RUN)


def test_a_health_check_note_names_each_cluster_that_changed_and_why():
    note = run_note([_event("a", "HealthCheckFailed", "Running", "Failed", "head unreachable"),
                     _event("b", "Recovered", "Failed", "Running", "Recovered"),
                     _event("b", "Stable"), _event("c", "Unstable"), _event("c", "Unstable")])
    assert note.splitlines() == ["a: Running → Failed (head unreachable)",
                                 "b: Failed → Running; Stable",
                                 "c: 2 Unstable"]


def test_a_failed_run_says_where_first_and_a_quiet_one_says_nothing_changed():
    assert run_note([], failed_tasks=["admit"]) == (
        "Failed at admit: see the failed task's log\nNothing changed.")
    assert run_note([], dry_run=True) == "Nothing changed (dry run)."


def test_the_first_line_of_a_failed_run_says_why_from_the_task_that_failed_first():
    """The UI shows a note's first line only: it carries the reason."""
    refused = "cluster.spec.config.ssh.credential: Airflow connection 'nope' does not exist"
    note = run_note([], failed_tasks=["admit"], notes={"admit": refused})
    assert note.splitlines() == [f"Failed at admit: {refused}", "Nothing changed."]
    # No task said why: the reason the cluster was recorded Failed with.
    note = run_note([_event("a", "ApplyFailed", "Updating", "Failed", "apply failed: boom")],
                    failed_tasks=["set_up", "wait_ready"])
    assert note.splitlines()[0] == "Failed at set_up, wait_ready: apply failed: boom"
    assert note.splitlines()[1] == "a: Updating → Failed (apply failed: boom)"


def test_what_a_task_said_leads_a_run_that_changed_nothing():
    note = run_note([], notes={"admit": "cluster x is not registered: nothing to delete"})
    assert note == "cluster x is not registered: nothing to delete"
    note = run_note([_event("a", "DeletedByForce", "Deleting", "Deleted",
                            "deleted by force; left behind: ns still Terminating")])
    assert note == "a: Deleting → Deleted (deleted by force; left behind: ns still Terminating)"


def test_a_note_about_a_thousand_clusters_fits_airflows_limit_and_says_how_many_it_left():
    events = [_event(f"cluster-{i:04}", "HealthCheckFailed", "Running", "Failed", "timeout")
              for i in range(1000)]
    note = run_note(events)
    assert len(note) <= NOTE_LIMIT
    shown = note.count("→")
    assert note.splitlines()[-1] == f"… and {1000 - shown} more."
