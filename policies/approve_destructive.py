"""approve_destructive: a human approves a destructive action before it happens.

The run waits in its ``admit`` task (Airflow's human-in-the-loop: the task is parked, it holds
no worker slot) until one of the approvers approves or rejects it in Airflow (the run's
"Required actions", or the REST API), or the timeout passes. Approve: the run goes on.
Reject or timeout: the run fails and nothing was changed.

Asks approval for:
- ``delete_cluster`` of a cluster that serves endpoints (only a forced delete gets this far:
  it removes them with the cluster);
- ``remove_node`` when the nodes an update removes hold more than ``gpu_share`` of the
  cluster's GPUs, as last detected (the nodes with detected GPUs that the desired spec no
  longer names; every ``remove_node`` of the update asks the same approval, given once);
- every action listed in ``always``.

Params (with their default):
- ``approvers`` (required, no default): the Airflow user ids who may approve, e.g. ``["alice", "bob"]``;
- ``gpu_share`` (0.5): the share of the cluster's GPUs, in [0, 1), an update may remove
  without approval;
- ``timeout_seconds`` (3600): how long a run waits for an answer;
- ``always`` ([]): actions that always ask approval (e.g. ``["delete_cluster"]`` bound to one
  production cluster).

Every other action is allowed without approval. Binding refuses malformed params (``PARAMS``);
should any reach a run (a binding made before the policy changed), they deny, naming the param.
"""

from __future__ import annotations

from typing import Any

# The params, checked when the policy is bound (a literal: binding reads it, never runs it).
PARAMS = {
    "type": "object", "required": ["approvers"], "additionalProperties": False,
    "properties": {
        "approvers": {"type": "array", "minItems": 1,
                      "items": {"type": "string", "minLength": 1}},
        "gpu_share": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "timeout_seconds": {"type": "number", "exclusiveMinimum": 0,
                            "maximum": 604800},  # 7 days: the longest wait the engine takes
        "always": {"type": "array", "items": {"enum": [
            "create_cluster", "delete_cluster", "update_cluster", "onboard_cluster", "add_node",
            "remove_node", "scale_nodegroup", "deploy_endpoint", "scale_endpoint",
            "delete_endpoint"]}},
    },
}
ACTIONS = tuple(PARAMS["properties"]["always"]["items"]["enum"])
WEEK = PARAMS["properties"]["timeout_seconds"]["maximum"]


class ParamError(ValueError):
    pass


def evaluate(request: dict[str, Any]) -> dict[str, Any]:
    try:
        approvers, share, timeout, always = _params(request.get("params") or {})
    except ParamError as exc:
        return {"allowed": False, "reason": f"approve_destructive: {exc}"}
    action, name = request["action"], request["cluster"]["name"]
    why = None
    if action in always:
        why = f"{action} of cluster {name} always needs approval (binding param always)"
    elif action == "delete_cluster":
        why = _serving(request)
    elif action == "remove_node":
        why = _gpus_removed(request, share)
    if why is None:
        return {"allowed": True, "reason": f"approve_destructive: {action} of cluster {name} "
                                           "needs no approval"}
    return {"allowed": True, "reason": f"allowed once approved: {why}",
            "approval": {"reason": why, "approvers": approvers, "timeout_seconds": timeout}}


def _params(params: dict[str, Any]) -> tuple[list[str], float, float, list[str]]:
    approvers = params.get("approvers")
    if not isinstance(approvers, list) or not approvers or not all(
            isinstance(a, str) and a for a in approvers):
        raise ParamError("binding param approvers: name the Airflow user ids who may "
                         f"approve, e.g. [\"alice\"] (got {approvers!r})")
    share = params.get("gpu_share", 0.5)
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share < 1:
        raise ParamError(f"binding param gpu_share: a share in [0, 1), not {share!r}")
    timeout = params.get("timeout_seconds", 3600)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or \
            not 0 < timeout <= WEEK:
        raise ParamError("binding param timeout_seconds: a number of seconds in (0, "
                         f"{WEEK}] (Airflow's wait for an answer), not {timeout!r}")
    always = params.get("always", [])
    if not isinstance(always, list) or any(a not in ACTIONS for a in always):
        raise ParamError("binding param always: a list of actions among "
                         f"{', '.join(ACTIONS)}, "
                         f"not {always!r}")
    return approvers, float(share), float(timeout), always


def _serving(request: dict[str, Any]) -> str | None:
    endpoints = sorted({e["name"] for e in request.get("endpoints") or []
                        if e.get("phase") != "Deleted"})
    if not endpoints:
        return None
    return (f"deleting cluster {request['cluster']['name']} removes the endpoints it serves: "
            f"{', '.join(endpoints)}")


def _gpus_removed(request: dict[str, Any], share: float) -> str | None:
    cluster = request["cluster"]
    accelerators = (cluster.get("status") or {}).get("accelerators") or {}
    per_node = accelerators.get("nodes") or {}
    total = sum(int(r.get("count") or 0) for r in per_node.values())
    if not total:
        return None
    ssh = (((cluster.get("spec") or {}).get("config") or {}).get("ssh")) or {}
    kept = {ssh.get("head"), *(ssh.get("workers") or [])}
    removed = {node: int(r.get("count") or 0) for node, r in per_node.items()
               if node not in kept and r.get("count")}
    gone = sum(removed.values())
    if gone / total <= share:
        return None
    return (f"the update of cluster {cluster['name']} removes {gone} of its {total} GPUs "
            f"({', '.join(sorted(removed))}), more than gpu_share {share:g} "
            "(binding param gpu_share)")
