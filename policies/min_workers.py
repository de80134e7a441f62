"""min_workers: deny a shrink that would leave a cluster with fewer workers than a minimum.

Params:
- ``min_workers`` (int >= 0, default 1): the fewest workers a cluster may keep.

Judges:
- ``remove_node``: denies when ``input.workers_after`` (the workers the cluster keeps after the
  whole update) is below ``min_workers``.
- ``scale_nodegroup``: denies when the sum of ``desired`` over the desired spec's pools, with
  this pool's ``to`` applied (a removed pool counts 0), is below ``min_workers`` and the change
  lowers that sum. A change that keeps or raises the sum is allowed even below the minimum, so a
  cluster under the minimum can always grow back towards it.

Every other action is allowed; ``delete_cluster`` in particular is not judged (deleting a
cluster is not shrinking it).
"""

from __future__ import annotations

from typing import Any

DEFAULT_MIN_WORKERS = 1


def evaluate(request: dict[str, Any]) -> dict[str, Any]:
    action = request.get("action")
    cluster = request.get("cluster") or {}
    name = cluster.get("name", "?")
    minimum = (request.get("params") or {}).get("min_workers", DEFAULT_MIN_WORKERS)
    if isinstance(minimum, str) and minimum.strip().isdigit():
        minimum = int(minimum)
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0:
        return _decide(False, "binding param min_workers must be a whole number >= 0, "
                              f"got {minimum!r}")

    inp = request.get("input") or {}
    if action == "remove_node":
        after = int(inp.get("workers_after") or 0)
        node = (inp.get("node") or {}).get("name", "?")
        what = f"removing node {node} would leave cluster {name} with {_workers(after)}"
    elif action == "scale_nodegroup":
        pools, pool = _spec_pools(cluster.get("spec")), inp.get("pool")
        after, before = _total(pools, pool, inp.get("to")), _total(pools, pool, inp.get("from"))
        what = (f"scaling pool {pool} would leave cluster {name} with {_workers(after)} "
                f"(sum of desired, {before} before)")
        if after >= before:
            return _decide(True, f"{what}: not a shrink")
    elif action == "delete_cluster":
        return _decide(True, "min_workers: delete_cluster is not judged (deleting is not "
                             "shrinking)")
    else:
        return _decide(True, f"min_workers: {action} does not remove workers")

    if after < minimum:
        return _decide(False, f"{what}, below min_workers {minimum} (binding param min_workers)")
    return _decide(True, f"{what}, at least min_workers {minimum}")


def _spec_pools(spec: dict | None) -> list[dict]:
    config = (spec or {}).get("config") or {}
    block = config.get((spec or {}).get("provider")) or config.get("eks") or config.get("aks")
    return list((block or {}).get("node_pools") or [])


def _total(pools: list[dict], pool: str | None, sizes: dict | None) -> int:
    """Sum of desired over ``pools`` with ``pool`` at ``sizes`` (None: the pool is absent)."""
    total = sum(_desired(p) for p in pools if p.get("name") != pool)
    return total + (_desired(sizes) if sizes else 0)


def _desired(pool: dict) -> int:
    value = pool.get("desired")
    if value is None:
        value = pool.get("min")
    return int(value or 0)


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def _decide(allowed: bool, reason: str) -> dict[str, Any]:
    return {"allowed": allowed, "reason": reason}
