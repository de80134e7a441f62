"""What a flow is about to do, as the actions policies judge; the request a policy sees; and
the changes policies made to an action's input, applied back to the cluster request.

An update is a list of actions: ``update_cluster`` for what changed beyond nodes and pools
(always present when nothing else is), one ``add_node`` / ``remove_node`` per worker, one
``scale_nodegroup`` per node pool whose sizes change.
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

from airfleet.errors import InvalidRequest
from airfleet.resources import CONFIG_BLOCK, ClusterSpec, Provider

Action = dict[str, Any]  # {"action": "add_node", "input": {...}}
POOL_SIZES = ("min", "max", "desired")
# Reported by their own actions, not as update_cluster changes.
_NODE_FIELDS = {"spec.config.ssh.workers", "spec.config.eks.node_pools",
                "spec.config.aks.node_pools"}


def flow_actions(flow: str, request: dict[str, Any] | None, recorded: dict[str, Any] | None,
                 *, force: bool = False) -> list[Action]:
    """The actions of one run of ``flow`` (create, update, delete, onboard). ``request`` and
    ``recorded`` are clusters as JSON (``{"metadata", "spec"}``): the desired one, the one in
    the store."""
    if flow == "delete":
        return [{"action": "delete_cluster", "input": {"force": force}}]
    if flow in ("create", "onboard"):
        return [{"action": f"{flow}_cluster", "input": _inventory(request)}]
    before, after = ClusterSpec.model_validate(recorded["spec"]), \
        ClusterSpec.model_validate(request["spec"])
    old, new = _workers(before), _workers(after)
    actions = [{"action": "add_node", "input": {"node": {"name": w, "role": "worker"},
                                                "workers_after": len(new)}}
               for w in new if w not in old]
    actions += [{"action": "remove_node", "input": {"node": {"name": w, "role": "worker"},
                                                    "workers_after": len(new)}}
                for w in old if w not in new]
    actions += pool_changes(before, after)
    changed = sorted(set(_diff(recorded, request)) - _NODE_FIELDS)
    if changed or not actions:
        actions.insert(0, {"action": "update_cluster", "input": {
            "changed": changed, "labels": dict(request["metadata"].get("labels") or {})}})
    return actions


def pool_changes(recorded: ClusterSpec, desired: ClusterSpec) -> list[Action]:
    """The ``scale_nodegroup`` actions of an update: one per node pool that is added, removed,
    or whose size or bounds change, with the pool's sizes before and after (None: absent)."""
    if recorded.provider not in (Provider.EKS, Provider.AKS):
        return []

    def sizes(spec: ClusterSpec) -> dict[str, dict[str, int]]:
        return {p.name: {k: getattr(p, k) for k in POOL_SIZES} for p in spec.block.node_pools}

    before, after = sizes(recorded), sizes(desired)
    return [{"action": "scale_nodegroup",
             "input": {"pool": name, "from": before.get(name), "to": after.get(name)}}
            for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]


def _inventory(request: dict[str, Any]) -> dict[str, Any]:
    spec = ClusterSpec.model_validate(request["spec"])
    nodes = []
    if spec.config.ssh is not None:
        nodes = [{"name": spec.config.ssh.head, "role": "head"}] + [
            {"name": w, "role": "worker"} for w in spec.config.ssh.workers]
    pools = [p.model_dump(mode="json") for p in getattr(spec.block, "node_pools", [])]
    return {"nodes": nodes, "node_pools": pools,
            "labels": dict(request["metadata"].get("labels") or {})}


def _workers(spec: ClusterSpec) -> list[str]:
    return list(spec.config.ssh.workers) if spec.config.ssh is not None else []


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON values differ (lists compare whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [p for key in sorted(set(old) | set(new))
                for p in _diff(old.get(key), new.get(key), f"{path}.{key}" if path else key)]
    return [] if old == new else [path]


# ---- the request a policy sees ---------------------------------------------------------------

def policy_request(action: Action, cluster: dict[str, Any] | None, name: str,
                   record: Any | None, *, now: datetime, run: str | None,
                   dry_run: bool, endpoints: list[Any] | None = None) -> dict[str, Any]:
    """``cluster``: the desired cluster as JSON (None: the recorded one, for delete);
    ``record``: the store's :class:`~airfleet.store.ClusterRecord`, None when unregistered;
    ``endpoints``: the endpoint versions the cluster serves (store records), given for the
    actions that change a cluster or an endpoint.
    Credentials appear as references only: a sealed blob is replaced by ``"<sealed>"``."""
    if cluster is None and record is not None:
        cluster = record.cluster.model_dump(mode="json", include={"metadata", "spec"})
    metadata = (cluster or {}).get("metadata") or {}
    status = record.cluster.status.model_dump(mode="json") if record is not None else None
    return {"action": action["action"],
            "cluster": {"name": name, "labels": dict(metadata.get("labels") or {}),
                        "spec": redact_sealed((cluster or {}).get("spec")),
                        "phase": record.phase.value if record is not None else None,
                        "status": status},
            "input": copy.deepcopy(action["input"]),
            "health": _health(status),
            "now": now.isoformat(), "run": run, "dry_run": dry_run,
            **({} if endpoints is None else {"endpoints": [
                {"name": e.name, "version": e.version, "phase": e.phase.value}
                for e in endpoints]})}


def _health(status: dict[str, Any] | None) -> dict[str, Any] | None:
    if status is None:
        return None
    accelerators = status.get("accelerators") or {}
    return {"observed_at": status.get("observed_at"), "phase": status.get("phase"),
            "failed_probes": status.get("failed_probes", 0),
            "nodes": [{k: n.get(k) for k in ("name", "role", "phase", "observed_at")}
                      for n in status.get("nodes") or []],
            "accelerators": {"count": accelerators.get("count", 0),
                             "models": dict(accelerators.get("models") or {})}}


def redact_sealed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<sealed>" if k == "sealed" and v else redact_sealed(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact_sealed(v) for v in value]
    return value


# ---- applying what policies changed ----------------------------------------------------------

def apply_inputs(request: dict[str, Any], changes: list[tuple[Action, dict[str, Any]]],
                 ) -> dict[str, Any]:
    """The cluster request with each action's input as the policies left it
    (``changes``: (action, final input) for the actions whose input a policy changed)."""
    request = copy.deepcopy(request)
    for action, final in changes:
        if action["action"] == "create_cluster":
            request["metadata"]["labels"] = dict(final.get("labels") or {})
            before = {p["name"]: p for p in action["input"]["node_pools"]}
            for pool in final.get("node_pools") or []:
                if _without_sizes(pool) != _without_sizes(before.get(pool.get("name"), {})):
                    raise InvalidRequest(f"node pool {pool.get('name')!r}: a policy may change "
                                         "a pool's min, max and desired only")
                _set_sizes(request, pool["name"], pool)
        elif action["action"] == "scale_nodegroup":
            if final.get("to") is None or action["input"].get("to") is None:
                raise InvalidRequest(f"node pool {action['input']['pool']}: a policy may "
                                     "change a pool's sizes, not add or remove the pool")
            _set_sizes(request, action["input"]["pool"], final["to"])
    return request


def _without_sizes(pool: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in pool.items() if k not in POOL_SIZES}


def _set_sizes(request: dict[str, Any], pool_name: str | None, sizes: dict[str, Any]) -> None:
    block = request["spec"]["config"][CONFIG_BLOCK[Provider(request["spec"]["provider"])]]
    pools = {p["name"]: p for p in block.get("node_pools") or []}
    if pool_name not in pools:
        raise InvalidRequest(f"node pool {pool_name!r}: a policy may change the sizes of the "
                             "requested pools only")
    pools[pool_name].update({k: sizes[k] for k in POOL_SIZES if k in sizes})
