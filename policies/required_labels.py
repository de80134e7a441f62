"""required_labels: deny a cluster whose labels lack required keys or carry unlisted values.

Params:
- ``labels`` (default ``{"team": []}``): a mapping label -> allowed values. An empty list
  allows any non-empty value; a non-empty list allows only the values it lists.

Judges ``create_cluster``, ``onboard_cluster`` and ``update_cluster``, on ``input.labels`` (the
cluster's labels as they would be; ``cluster.labels`` when the input has none). The reason of a
deny names every missing label and every label whose value is not allowed. Every other action is
allowed.
"""

from __future__ import annotations

from typing import Any

DEFAULT_LABELS: dict[str, list[str]] = {"team": []}
JUDGED = ("create_cluster", "onboard_cluster", "update_cluster")


def evaluate(request: dict[str, Any]) -> dict[str, Any]:
    action = request.get("action")
    cluster = request.get("cluster") or {}
    name = cluster.get("name", "?")
    required = (request.get("params") or {}).get("labels", DEFAULT_LABELS)
    if not isinstance(required, dict) or not all(
            isinstance(v, list | tuple) and all(isinstance(x, str) for x in v)
            for v in required.values()):
        return _decide(False, "binding param labels must map each label to a list of allowed "
                              f"values ([] for any), got {required!r}")
    if action not in JUDGED:
        return _decide(True, f"required_labels: {action} does not set cluster labels")

    labels = (request.get("input") or {}).get("labels")
    if not isinstance(labels, dict):
        labels = cluster.get("labels") or {}
    missing, wrong = [], []
    for key, allowed in required.items():
        value = labels.get(key)
        if value is None or not str(value).strip():
            missing.append(key)
        elif allowed and str(value) not in allowed:
            wrong.append(f"{key}={value} (allowed: {', '.join(allowed)})")
    problems = []
    if missing:
        problems.append(f"missing label{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if wrong:
        problems.append(f"label value not allowed: {'; '.join(wrong)}")
    if problems:
        return _decide(False, f"cluster {name}: {'; '.join(problems)} (binding param labels)")
    if not required:
        return _decide(True, f"cluster {name}: no labels are required")
    return _decide(True, f"cluster {name} has the required labels {', '.join(required)}")


def _decide(allowed: bool, reason: str) -> dict[str, Any]:
    return {"allowed": allowed, "reason": reason}
