"""cap_node_pool: lower node pool sizes to a cap (a mutating policy; it never denies a size).

Params:
- ``max_per_pool`` (int >= 0, default 4): the most nodes one node pool may ask for.

Judges:
- ``scale_nodegroup``: lowers ``to.desired`` and ``to.max`` to the cap, and ``to.min`` when it
  exceeds it; a removed pool (``to`` None) is left alone.
- ``create_cluster``: does the same to each of ``input.node_pools``.

The decision is allowed; when it lowered something it carries the modified copy of the input
(``"input"``) and its reason says what it lowered. It never raises a size, and an input already
within the cap comes back without an ``"input"`` key. Every other action is allowed untouched.
"""

from __future__ import annotations

import copy
from typing import Any

DEFAULT_MAX_PER_POOL = 4
SIZES = ("min", "desired", "max")


def evaluate(request: dict[str, Any]) -> dict[str, Any]:
    action = request.get("action")
    name = (request.get("cluster") or {}).get("name", "?")
    cap = (request.get("params") or {}).get("max_per_pool", DEFAULT_MAX_PER_POOL)
    if isinstance(cap, str) and cap.strip().isdigit():
        cap = int(cap)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        return {"allowed": False,
                "reason": f"binding param max_per_pool must be a whole number >= 0, got {cap!r}"}

    new = copy.deepcopy(request.get("input") or {})
    if action == "scale_nodegroup":
        if new.get("to") is None:
            return {"allowed": True, "reason": f"cap_node_pool: scale_nodegroup removes pool "
                                               f"{new.get('pool')} of cluster {name}: nothing to cap"}
        changes = _cap(new["to"], cap)
        lowered = [f"pool {new.get('pool')}: {changes}"] if changes else []
    elif action == "create_cluster":
        lowered = []
        for pool in new.get("node_pools") or []:
            changes = _cap(pool, cap)
            if changes:
                lowered.append(f"pool {pool.get('name')}: {changes}")
    else:
        return {"allowed": True, "reason": f"cap_node_pool: {action} does not size node pools"}

    if not lowered:
        return {"allowed": True,
                "reason": f"node pools of cluster {name} are within max_per_pool {cap}"}
    return {"allowed": True, "input": new,
            "reason": f"lowered cluster {name} to max_per_pool {cap} "
                      f"({'; '.join(lowered)}) (binding param max_per_pool)"}


def _cap(sizes: dict[str, Any], cap: int) -> str:
    """Lower ``sizes`` (min, desired, max) in place to ``cap``; what it changed, as text."""
    changes = []
    for key in SIZES:
        value = sizes.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            sizes[key] = cap
            changes.append(f"{key} {value} -> {cap}")
    return ", ".join(changes)
