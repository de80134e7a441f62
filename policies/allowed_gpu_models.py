"""allowed_gpu_models: deny a change that would put a GPU model outside an allow-list on a cluster.

Params:
- ``models`` (list of str, default ``["NVIDIA-L4", "NVIDIA-A10G", "NVIDIA-H100"]``): the allowed
  GPU models. A model is allowed when an entry equals it (case-insensitive), or when the model
  contains the entry as whole tokens once "-", "_" and spaces are treated alike: entry ``H100``
  allows ``NVIDIA-H100-80GB-HBM3`` and ``NVIDIA H100``, but entry ``L4`` does not allow
  ``NVIDIA-L40S``.

Judges ``create_cluster``, ``onboard_cluster``, ``update_cluster``, ``add_node`` and
``scale_nodegroup``:
- the GPU models observed on the cluster (``health.accelerators.models``, else
  ``cluster.status.accelerators.models``): any model not allowed denies;
- the instance types of node pools (``input.node_pools`` for create and onboard; for
  ``scale_nodegroup`` the scaled pool in the desired spec), mapped to a GPU model by the table
  below. A type that maps to a model not allowed denies, whatever the pool's ``gpu`` flag says;
  on a pool with ``gpu: true`` a type the table cannot map denies too (ask the policy owner to
  map it). Non-GPU types on non-GPU pools pass.

A ``scale_nodegroup`` that removes a pool or grows none of its sizes adds no GPUs and is allowed
(so scaling a disallowed pool down is never blocked). Every other action is allowed.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

DEFAULT_MODELS = ["NVIDIA-L4", "NVIDIA-A10G", "NVIDIA-H100"]
JUDGED = ("create_cluster", "onboard_cluster", "update_cluster", "add_node", "scale_nodegroup")

# AWS instance family (the part before the dot) -> GPU model.
AWS_FAMILIES = {
    "g6": "NVIDIA-L4", "gr6": "NVIDIA-L4", "g6e": "NVIDIA-L40S",
    "g5": "NVIDIA-A10G",
    "p4d": "NVIDIA-A100", "p4de": "NVIDIA-A100",
    "p5": "NVIDIA-H100", "p5e": "NVIDIA-H200", "p5en": "NVIDIA-H200",
    "g4dn": "NVIDIA-T4",
}
# Azure VM size pattern (lower-case, fnmatch) -> GPU model.
AZURE_SIZES = {
    "standard_nc*ads_a100_v4": "NVIDIA-A100",
    "standard_nc*ads_h100_v5": "NVIDIA-H100",
    "standard_nv*ads_a10_v5": "NVIDIA-A10",
    "standard_nc*as_t4_v3": "NVIDIA-T4",
}


def evaluate(request: dict[str, Any]) -> dict[str, Any]:
    action = request.get("action")
    cluster = request.get("cluster") or {}
    name = cluster.get("name", "?")
    models = (request.get("params") or {}).get("models", DEFAULT_MODELS)
    if (not isinstance(models, list | tuple)
            or not all(isinstance(m, str) and m.strip() for m in models)):
        return _decide(False, "binding param models must be a list of GPU model names, "
                              f"got {models!r}")
    if action not in JUDGED:
        return _decide(True, f"allowed_gpu_models: {action} adds no GPUs")

    inp = request.get("input") or {}
    pools: list[dict] = []
    if action in ("create_cluster", "onboard_cluster"):
        pools = list(inp.get("node_pools") or [])
    elif action == "scale_nodegroup":
        pool, to, before = inp.get("pool"), inp.get("to"), inp.get("from")
        if to is None or (before is not None and all(
                (to.get(k) or 0) <= (before.get(k) or 0) for k in ("desired", "max"))):
            return _decide(True, f"allowed_gpu_models: scale_nodegroup of pool {pool} on cluster "
                                 f"{name} grows nothing and adds no GPUs")
        spec_pool = next((p for p in _spec_pools(cluster.get("spec")) if p.get("name") == pool),
                         None)
        if spec_pool is None:
            return _decide(False, f"pool {pool} is not in the desired spec of cluster {name}: "
                                  "cannot tell its GPU model")
        pools = [spec_pool]

    allow_list = ", ".join(models) or "(none)"
    problems, seen = [], []
    for model in sorted(_observed(request.get("health"), cluster.get("status"))):
        if _allowed(model, models):
            seen.append(f"{model} (observed)")
        else:
            problems.append(f"observed GPU model {model} is not in models [{allow_list}]")
    for pool in pools:
        pool_name = pool.get("name")
        types = list(pool.get("instance_types") or [])
        if pool.get("gpu") and not types:
            problems.append(f"GPU pool {pool_name} lists no instance types: cannot tell its model")
        for itype in types:
            model = gpu_model(itype)
            if model is None:
                if pool.get("gpu"):
                    problems.append(f"pool {pool_name}: unknown GPU instance type {itype}; ask the "
                                    "policy owner to map it")
            elif _allowed(model, models):
                seen.append(f"{model} (pool {pool_name}, {itype})")
            else:
                problems.append(f"pool {pool_name}: instance type {itype} has {model}, not in "
                                f"models [{allow_list}]")
    if problems:
        hint = " (binding param models)" if any("models [" in p for p in problems) else ""
        return _decide(False, f"cluster {name}: {'; '.join(problems)}{hint}")
    if not seen:
        return _decide(True, f"cluster {name}: no GPUs observed or requested")
    return _decide(True, f"cluster {name}: GPU models {', '.join(seen)} are allowed")


def gpu_model(instance_type: str) -> str | None:
    """The GPU model of an AWS instance type or Azure VM size; None when the table has none."""
    itype = str(instance_type).strip().lower()
    if itype.startswith("standard_"):
        return next((m for pattern, m in AZURE_SIZES.items()
                     if fnmatch.fnmatchcase(itype, pattern)), None)
    return AWS_FAMILIES.get(itype.split(".", 1)[0])


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[-_\s]+", text.strip().lower()) if t]


def _allowed(model: str, entries: list[str]) -> bool:
    tokens = _tokens(model)
    for entry in entries:
        if entry.strip().lower() == model.strip().lower():
            return True
        want = _tokens(entry)
        if any(tokens[i:i + len(want)] == want for i in range(len(tokens) - len(want) + 1)):
            return True
    return False


def _observed(health: dict | None, status: dict | None) -> list[str]:
    accelerators = (health or {}).get("accelerators")
    if not isinstance(accelerators, dict):
        accelerators = (status or {}).get("accelerators")
    models = (accelerators or {}).get("models") or {}
    return [str(m) for m, n in models.items() if n]


def _spec_pools(spec: dict | None) -> list[dict]:
    config = (spec or {}).get("config") or {}
    block = config.get((spec or {}).get("provider")) or config.get("eks") or config.get("aks")
    return list((block or {}).get("node_pools") or [])


def _decide(allowed: bool, reason: str) -> dict[str, Any]:
    return {"allowed": allowed, "reason": reason}
