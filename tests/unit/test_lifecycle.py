"""The cluster state machine (airfleet.lifecycle): the one place that decides which phase may follow
which, checked pair by pair against the contract in ARCHITECTURE.md."""

from __future__ import annotations

import dataclasses
import itertools
import re
from datetime import UTC, datetime, timedelta

import pytest

from airfleet.errors import IllegalTransition
from airfleet.lifecycle import TRANSIENT, TRANSITIONS, Transition, check, transition
from airfleet.resources import Phase

P = Phase
ALL_PAIRS = list(itertools.product(Phase, Phase))

# ARCHITECTURE.md, "Lifecycle": the seed state machine over the phases a cluster rests in.
SEED: dict[Phase, set[Phase]] = {
    P.PENDING: {P.RUNNING, P.FAILED, P.DELETED},
    P.RUNNING: {P.FAILED, P.DELETED},
    P.FAILED: {P.FAILED, P.DELETED, P.RUNNING},
    P.DELETED: set(),
}
STABLE = set(SEED)


def test_every_phase_has_a_row_and_rows_name_only_phases():
    assert set(TRANSITIONS) == set(Phase)
    for current, targets in TRANSITIONS.items():
        assert targets <= set(Phase), current
    assert set(Phase) == STABLE | TRANSIENT


@pytest.mark.parametrize(("current", "target"), ALL_PAIRS,
                         ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
def test_check_allows_exactly_the_listed_transitions(current, target):
    if target in TRANSITIONS[current]:
        assert check(current, target) is None
        assert transition("llm-a", current, target, reason="r").to_phase is target
        return
    with pytest.raises(IllegalTransition) as caught:
        check(current, target)
    message = str(caught.value)
    assert re.search(rf"\b{current.value}\b.*\b{target.value}\b", message), message
    with pytest.raises(IllegalTransition):
        transition("llm-a", current, target, reason="r")


@pytest.mark.parametrize(("current", "target"),
                         [(a, b) for a, targets in SEED.items() for b in sorted(targets, key=str)],
                         ids=str)
def test_seed_transitions_are_allowed(current, target):
    check(current, target)


def test_seed_contract_holds_exactly_between_resting_phases():
    """Transient phases may add steps in between, never a direct move the seed forbids."""
    for current in STABLE:
        assert TRANSITIONS[current] & STABLE == SEED[current], current


def test_deleted_is_final():
    assert TRANSITIONS[P.DELETED] == frozenset()
    for target in Phase:
        with pytest.raises(IllegalTransition, match="Deleted"):
            check(P.DELETED, target)


def test_nothing_returns_to_pending():
    assert all(P.PENDING not in targets for targets in TRANSITIONS.values())


def test_transient_phases_are_exactly_the_three():
    assert TRANSIENT == {P.PROVISIONING, P.UPDATING, P.DELETING}
    for phase in TRANSIENT:
        assert phase not in TRANSITIONS[phase], f"{phase} is not a resting phase"


def reachable(start: Phase) -> set[Phase]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_phase_is_reachable_and_every_cluster_can_be_deleted():
    assert reachable(P.PENDING) == set(Phase)
    for phase in Phase:
        assert P.DELETED in reachable(phase), phase
    for phase in TRANSIENT:  # a flow that shows a transient phase can always settle
        assert TRANSITIONS[phase] & STABLE, phase


def test_transition_returns_the_event():
    before = datetime.now(UTC)
    event = transition("llm-a", P.PENDING, P.RUNNING, reason="ready",
                       run_id="manual__2025-01-01T00:00:00")
    after = datetime.now(UTC)
    assert isinstance(event, Transition)
    assert event.cluster == "llm-a"
    assert event.from_phase is P.PENDING and event.to_phase is P.RUNNING
    assert event.reason == "ready"
    assert event.run_id == "manual__2025-01-01T00:00:00"
    assert event.at.tzinfo is not None and event.at.utcoffset() == timedelta(0)
    assert before <= event.at <= after
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.reason = "changed"  # type: ignore[misc]


def test_transition_accepts_phase_values_and_defaults_run_id():
    event = transition("llm-a", "Failed", "Running", reason="health check passed")
    assert (event.from_phase, event.to_phase) == (P.FAILED, P.RUNNING)
    assert isinstance(event.from_phase, Phase) and isinstance(event.to_phase, Phase)
    assert event.run_id is None


def test_illegal_transition_names_both_phases_and_what_is_allowed():
    with pytest.raises(IllegalTransition) as caught:
        transition("llm-a", P.RUNNING, P.PENDING, reason="r", run_id="run-1")
    message = str(caught.value)
    assert "Running" in message and "Pending" in message
    for allowed in TRANSITIONS[P.RUNNING]:
        assert allowed.value in message
    with pytest.raises(IllegalTransition, match="final"):
        check(P.DELETED, P.RUNNING)
