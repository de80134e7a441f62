"""Governance pre-check: the hook point every mutating flow calls before it changes anything.

The governance issue fills this with Python policies, bindings and execution modes. Until a
policy can be bound, every action is allowed, and the decision says so plainly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ACTIONS = ("create_cluster", "delete_cluster", "update_cluster", "onboard_cluster", "add_node",
           "remove_node", "scale_nodegroup", "deploy_endpoint", "scale_endpoint",
           "delete_endpoint")


@dataclass(frozen=True)
class Decision:
    action: str
    allowed: bool
    reason: str
    policy: str | None = None


def precheck(action: str, cluster: str, request: dict[str, Any] | None) -> list[Decision]:
    """Decide whether ``action`` may happen to ``cluster``; one decision per bound policy."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; actions are {', '.join(ACTIONS)}")
    return [Decision(action, True, f"no policy is bound to {action}")]
