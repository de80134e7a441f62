"""The ``admit`` task of every flow, and the human approval a policy may ask before it writes.

``admit`` decides (validate, the lease, the policies), then makes the run's first writes. When
a policy allowed an action once a human approves it (its decision's ``approval``), the task
waits between the two with Airflow 3's human-in-the-loop: it records the request (subject,
reasons, the approvers as the assigned users, the timeout) and parks in ``awaiting_input``,
holding no worker slot, until an approver answers in the UI ("Required actions") or over the
REST API (``PATCH .../taskInstances/admit/-1/hitlDetails``), or the scheduler's timeout sweep
ends the wait. Approve: the writes happen and the run goes on. Reject, or no answer in time:
the run fails with the reason and nothing was changed. Airflow lets only the assigned users
answer (even an admin who is not one is refused), and only those whose role may edit DAG runs.
The run keeps the cluster's lease through the wait, so no other flow changes what the
approver is looking at.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator

from airfleet_airflow.flow import ADMIT, _lease, _store, permanent_error, say

ADMISSION = "admission"  # XCom key: what decide found, kept for the writes after the wait
LEASE_MARGIN_SECONDS = 300  # the lease outlives the wait by this much

Decide = Callable[[str, Any], "dict[str, Any] | None"]
Write = Callable[[str, "dict[str, Any]"], "dict[str, Any] | None"]


class AdmitOperator(ApprovalOperator):
    """``decide(flow, context)`` returns the admission (what validate and the policies found,
    with ``lease``, and ``approval`` when one is asked) or None (a dry run: the rest of the run
    is skipped). ``write(flow, admission)`` makes the first writes and returns the task's
    XCom, or None when there is nothing to do (the rest is skipped)."""

    def __init__(self, *, flow: str, decide: Decide, write: Write, **kwargs: Any) -> None:
        super().__init__(task_id=ADMIT, subject=f"Approve this {flow}?", **kwargs)
        self.flow, self.decide, self.write = flow, decide, write

    def execute(self, context: Any) -> Any:
        admission = self.decide(self.flow, context)
        if admission is None:
            return self._skip_rest(context)
        if admission.get("approval") is None:
            return self._write(context, admission)
        return self._ask(context, admission)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        """Resumed by the approver's answer or by the timeout sweep."""
        from airflow.providers.standard.exceptions import HITLTimeoutError

        admission = context["ti"].xcom_pull(task_ids=ADMIT, key=ADMISSION)
        approval = admission["approval"]
        try:
            answer = HITLOperator.execute_complete(self, context, event)
        except HITLTimeoutError:
            self._refuse(admission, "ApprovalTimedOut",
                         f"no answer from {_who(approval)} within "
                         f"{approval['timeout_seconds']:g} s")
        by = (answer["responded_by_user"] or {}).get("name") or "an unrecorded user"
        if answer["chosen_options"] != [self.APPROVE]:
            self._refuse(admission, "ApprovalRejected", f"rejected by {by}")
        lease = _lease(admission["lease"])
        try:  # still ours? (a run that waited past its lease may have been overtaken)
            store = _store()
            store.renew_lease(lease.name, lease.holder, lease.token)
            _note(store, lease, "Approved", f"the {self.flow} by {lease.holder} was approved "
                                            f"by {by}: {approval['reason']}")
        except Exception as exc:
            raise permanent_error(exc) from None
        say(f"approved by {by}: {approval['reason']}")  # replaces "awaiting approval"
        print(f"approved by {by}: the {self.flow} goes on")
        return self._write(context, admission)

    # ---- steps ---------------------------------------------------------------------------

    def _write(self, context: Any, admission: dict[str, Any]) -> Any:
        result = self.write(self.flow, admission)
        return self._skip_rest(context) if result is None else result

    def _ask(self, context: Any, admission: dict[str, Any]) -> None:
        """Record the request and park the task (raises TaskAwaitingInput)."""
        approval, lease = admission["approval"], _lease(admission["lease"])
        wait = approval["timeout_seconds"]
        try:
            store = _store()
            store.renew_lease(lease.name, lease.holder, lease.token,
                              ttl=wait + LEASE_MARGIN_SECONDS)
            _note(store, lease, "ApprovalRequested",
                  f"the {self.flow} by {lease.holder} waits up to {wait:g} s for approval by "
                  f"{_who(approval)}: {approval['reason']}")
        except Exception as exc:
            raise permanent_error(exc) from None
        context["ti"].xcom_push(key=ADMISSION, value=admission)
        self.subject = f"Approve the {_what(self.flow, admission, lease)}?"
        self.body = "\n".join([
            f"**Why a human must approve:** {approval['reason']}", "",
            f"Approvers: {_who(approval)}. Without an answer within {wait:g} s the run fails "
            "and nothing is changed.", "", "Policies:",
            *(f"- {d['policy'] or '-'}: {d['action']} allowed: {d['reason']}"
              for d in admission["decisions"])])
        self.assigned_users = [{"id": user, "name": user} for user in approval["approvers"]]
        self.response_timeout = timedelta(seconds=wait)
        say(f"awaiting approval by {_who(approval)}: {approval['reason']}")
        print(f"awaiting approval by {_who(approval)} (up to {wait:g} s): "
              f"{approval['reason']}")
        super().execute(context)

    def _refuse(self, admission: dict[str, Any], reason: str, why: str) -> None:
        from airflow.sdk.exceptions import AirflowFailException

        lease = _lease(admission["lease"])
        message = (f"the {_what(self.flow, admission, lease)} was not done: {why} "
                   f"({admission['approval']['reason']}); nothing was changed")
        try:
            _note(_store(), lease, reason, message, kind="Warning")
        except Exception as exc:  # noqa: BLE001 - the run fails for its reason all the same
            print(f"not noted in the cluster's history: {exc}")
        say(message)
        print(message)
        raise AirflowFailException(message)

    def _skip_rest(self, context: Any) -> None:
        """Skip every later task but the teardowns (as a short-circuit task does)."""
        later = [t for t in context["task"].get_flat_relatives(upstream=False)
                 if not t.is_teardown]
        if later:
            self.skip(ti=context["ti"], tasks=later)
        return None


def _note(store: Any, lease: Any, reason: str, message: str, kind: str = "Normal") -> None:
    from airfleet import flows

    flows.note(store, lease, reason, message, kind)


def _what(flow: str, admission: dict[str, Any], lease: Any) -> str:
    """The change awaiting approval: "delete of llm-a", "delete of endpoint chat on cluster
    llm-a" (an endpoint flow's admission names the endpoint and its cluster)."""
    if admission.get("cluster") and admission.get("name"):
        return (f"{flow.removeprefix('endpoint_')} of endpoint {admission['name']} on "
                f"cluster {lease.name}")
    return f"{flow} of {lease.name}"


def _who(approval: dict[str, Any]) -> str:
    return " or ".join(approval["approvers"])
