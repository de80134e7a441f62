"""stability: the default stability suite, judged by the health-check flow after each probe.

Bound to the ``check_stability`` action (``airfleet stability enable NAME``); its decision is the
cluster's ``Stable`` condition: allowed = Stable, denied = Unstable, the reason naming every
expectation that failed. It reads the probe's node data in ``request["health"]`` and the
detected accelerators in ``request["cluster"]["status"]``.

Params:
- ``min_ready_ratio`` (0..1, default 1.0): the share of nodes that must be ready
  (phase ``Ready`` or ``Running``).
- ``expected_gpus`` (int, default: the GPUs detected when the cluster was set up): the GPUs
  that ready nodes must hold.
- ``max_heartbeat_age_seconds`` (default 900): how old a node's last observation may be.

Memory and disk pressure are not judged: no backend reports them yet.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

READY = ("Ready", "Running")


def evaluate(request: dict[str, Any]) -> dict[str, Any]:
    if request.get("action") != "check_stability":
        return {"allowed": True, "reason": f"stability: {request.get('action')} is not a "
                                           "stability check"}
    params = request.get("params") or {}
    health = request.get("health") or {}
    nodes = health.get("nodes") or []
    if not nodes:
        return {"allowed": False, "reason": "expect_nodes: the probe saw no nodes"}
    try:
        now = datetime.fromisoformat(request["now"])
        failed = [f for f in (_ready_ratio(nodes, float(params.get("min_ready_ratio", 1.0))),
                              _gpus(nodes, request, params.get("expected_gpus")),
                              _heartbeats(nodes, now,
                                          float(params.get("max_heartbeat_age_seconds", 900))))
                  if f]
    except (TypeError, ValueError) as exc:
        return {"allowed": False, "reason": f"stability: bad binding param: {exc}"}
    if failed:
        return {"allowed": False, "reason": "; ".join(failed)}
    return {"allowed": True, "reason": f"all 3 expectations met on {len(nodes)} node(s)"}


def _ready_ratio(nodes: list[dict], minimum: float) -> str | None:
    ready = [n for n in nodes if n.get("phase") in READY]
    ratio = len(ready) / len(nodes)
    if ratio >= minimum:
        return None
    down = ", ".join(f"{n.get('name')} ({n.get('phase')})" for n in nodes if n not in ready)
    return (f"expect_ready_ratio: {len(ready)} of {len(nodes)} nodes ready ({ratio:.2f}), "
            f"at least {minimum:g} expected; not ready: {down}")


def _gpus(nodes: list[dict], request: dict, expected: Any) -> str | None:
    detected = ((request.get("cluster") or {}).get("status") or {}).get("accelerators") or {}
    per_node = detected.get("nodes") or {}
    if expected is None:
        expected = detected.get("count", 0)
    if not isinstance(expected, int) or expected <= 0:
        return None  # no GPUs expected: nothing to judge
    ready = {n.get("name") for n in nodes if n.get("phase") in READY}
    on_ready = sum((per_node.get(name) or {}).get("count", 0) for name in ready)
    if on_ready >= expected:
        return None
    return f"expect_gpu_count: {on_ready} GPU(s) on ready nodes, {expected} expected"


def _heartbeats(nodes: list[dict], now: datetime, max_age: float) -> str | None:
    stale = []
    for n in nodes:
        seen = n.get("observed_at")
        age = (now - datetime.fromisoformat(seen)).total_seconds() if seen else None
        if age is None or age > max_age:
            stale.append(f"{n.get('name')} ({'never' if age is None else f'{age:.0f} s ago'})")
    if not stale:
        return None
    return f"expect_fresh_heartbeats: older than {max_age:g} s: {', '.join(stale)}"
