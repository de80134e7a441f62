"""max_nodes: deny a change that would leave a cluster with more nodes than a limit.

Params:
- ``max_nodes`` (int >= 0, default 16): the most nodes a cluster may have.

Judges:
- ``create_cluster``, ``onboard_cluster``: SSH clusters count their input ``nodes`` (head and
  workers); node-pool clusters (EKS, AKS) count the sum of ``desired`` over the input
  ``node_pools``; a cluster with neither (Kubernetes on provider ``existing``) counts the nodes
  its health probe saw, when there is one.
- ``add_node``: ``workers_after`` plus the head.
- ``scale_nodegroup``: the sum of ``desired`` over the desired spec's pools with this pool's
  ``to`` applied (a removed pool counts 0).

Every other action is allowed: there is nothing to count. Exactly ``max_nodes`` is allowed.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MAX_NODES = 16


def evaluate(request: dict[str, Any]) -> dict[str, Any]:
    action = request.get("action")
    cluster = request.get("cluster") or {}
    name = cluster.get("name", "?")
    params = request.get("params") or {}
    limit = params.get("max_nodes", DEFAULT_MAX_NODES)
    if isinstance(limit, str) and limit.strip().isdigit():
        limit = int(limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        return _deny(f"binding param max_nodes must be a whole number >= 0, got {limit!r}")

    inp = request.get("input") or {}
    if action in ("create_cluster", "onboard_cluster"):
        count, what = _count_new(cluster, inp, request.get("health"))
        if count is None:
            return _allow(f"max_nodes: {action} of cluster {name} lists no nodes or node pools "
                          "and there is no health probe: nothing to count")
    elif action == "add_node":
        count, what = int(inp.get("workers_after") or 0) + 1, "nodes (head and workers)"
    elif action == "scale_nodegroup":
        count = _pool_total(_spec_pools(cluster.get("spec")), inp.get("pool"), inp.get("to"))
        what = f"nodes (desired, with pool {inp.get('pool')} scaled)"
    else:
        return _allow(f"max_nodes: {action} does not add nodes: nothing to count")

    if count > limit:
        return _deny(f"cluster {name} would have {count} {what}, above max_nodes {limit} "
                     "(binding param max_nodes)")
    return _allow(f"cluster {name} would have {count} {what}, within max_nodes {limit}")


def _count_new(cluster: dict, inp: dict, health: dict | None) -> tuple[int | None, str]:
    spec = cluster.get("spec") or {}
    nodes, pools = inp.get("nodes") or [], inp.get("node_pools") or []
    if spec.get("type") == "ssh" or (nodes and not pools):
        return len(nodes), "nodes (head and workers)"
    if pools:
        return sum(_desired(p) for p in pools), "nodes (sum of the node pools' desired)"
    observed = (health or {}).get("nodes")
    if observed:
        return len(observed), "nodes (as its health probe saw them)"
    return None, ""


def _spec_pools(spec: dict | None) -> list[dict]:
    config = (spec or {}).get("config") or {}
    block = config.get((spec or {}).get("provider")) or config.get("eks") or config.get("aks")
    return list((block or {}).get("node_pools") or [])


def _pool_total(pools: list[dict], pool: str | None, to: dict | None) -> int:
    """Sum of desired over ``pools`` with ``pool`` at ``to`` (None: the pool is removed)."""
    total = sum(_desired(p) for p in pools if p.get("name") != pool)
    return total + (_desired(to) if to else 0)


def _desired(pool: dict) -> int:
    value = pool.get("desired")
    if value is None:
        value = pool.get("min")
    return int(value or 0)


def _allow(reason: str) -> dict[str, Any]:
    return {"allowed": True, "reason": reason}


def _deny(reason: str) -> dict[str, Any]:
    return {"allowed": False, "reason": reason}
