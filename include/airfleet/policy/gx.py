"""Stability suites written as Great Expectations (1.x) expectation suites.

A binding in mode ``gx`` judges ``check_stability`` with an expectation suite. The suite is
JSON, as GX writes it (``{"name": ..., "expectations": [{"type": ..., "kwargs": ...}]}``), and
is stored in the binding itself (``params["suite"]``), so the audit trail keeps each version.
It runs against the node table that the health check collected, one row per node:

=====================  ==================================================================
``name``               the node
``role``               head, worker or node
``ready``              1 when the node is Ready/Running, else 0 (its mean is the ready share)
``gpus_detected``      accelerators detected on the node at set-up (0 when none or unknown)
``gpu_model``          their model, or null
``heartbeat_age_seconds``  seconds since the node was last observed, or null if never
``memory_pressure``    null: no backend reports it yet
``disk_pressure``      null: no backend reports it yet
=====================  ==================================================================

The verdict is GX's ``success``; the reason names each failed expectation with its arguments
and what GX observed. GX is imported only here, when a suite is checked or run: it takes
seconds to import, and the DAG files never import it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from datetime import datetime
from typing import Any

from airfleet.errors import InvalidRequest

COLUMNS = ("name", "role", "ready", "gpus_detected", "gpu_model", "heartbeat_age_seconds",
           "memory_pressure", "disk_pressure")
READY = ("Ready", "Running")
# The kwargs of an expectation that name columns of the table.
COLUMN_KWARGS = ("column", "column_A", "column_B")
COLUMN_LIST_KWARGS = ("column_list", "column_set")
# A health check judges clusters from many threads; GX's data context keeps process-wide
# state, so one validation at a time (each takes tens of milliseconds).
_ONE_AT_A_TIME = threading.Lock()


def _gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no usage reports leave the task
    import great_expectations

    return great_expectations


def policy_name(suite: dict[str, Any]) -> str:
    """The binding's policy name for a suite: ``gx_`` and the suite's name as a name."""
    slug = re.sub(r"[^a-z0-9_]+", "_", str(suite.get("name", "")).lower()).strip("_")
    return f"gx_{slug or 'suite'}"[:63]


def check_suite(suite: Any, field: str = "suite") -> dict[str, Any]:
    """The suite, normalised as GX reads it; :class:`InvalidRequest` naming ``field`` when it
    is not a GX suite or names a column the node table lacks."""
    if isinstance(suite, str):
        try:
            suite = json.loads(suite)
        except ValueError as exc:
            raise InvalidRequest(f"{field}: not JSON ({exc}); give the suite as GX writes "
                                 'it: {"name": ..., "expectations": [...]}') from None
    if not isinstance(suite, dict) or not isinstance(suite.get("expectations"), list) \
            or not suite.get("name"):
        raise InvalidRequest(f'{field}: a GX suite is an object with "name" and a list of '
                             '"expectations"')
    gx = _gx()
    try:
        parsed = gx.ExpectationSuite(**suite)
    except Exception as exc:  # noqa: BLE001 - GX raises many kinds for a bad suite
        raise InvalidRequest(f"{field}: GX cannot read the suite: {type(exc).__name__}: "
                             f"{exc}") from None
    # GX logs and leaves out an expectation it does not know, rather than raising.
    read = [e.expectation_type for e in parsed.expectations]
    for i, given in enumerate(suite["expectations"]):
        kind = given.get("type") if isinstance(given, dict) else None
        if kind not in read:
            raise InvalidRequest(f"{field}: expectations[{i}] ({kind}) is not an expectation "
                                 "GX can run; see https://greatexpectations.io/expectations")
        read.remove(kind)
    if not parsed.expectations:
        raise InvalidRequest(f"{field}: the suite has no expectations")
    for i, expectation in enumerate(parsed.expectations):
        named = [getattr(expectation, k, None) for k in COLUMN_KWARGS]
        for k in COLUMN_LIST_KWARGS:
            named += list(getattr(expectation, k, None) or [])
        missing = [c for c in named if c is not None and c not in COLUMNS]
        if missing:
            raise InvalidRequest(
                f"{field}: expectations[{i}] ({expectation.expectation_type}) names column "
                f"{missing[0]!r}, which the node table lacks; its columns are "
                f"{', '.join(COLUMNS)}")
    return suite


def node_table(request: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per node the last probe saw (``request["health"]``), with the accelerators
    detected at set-up (``request["cluster"]["status"]``)."""
    now = datetime.fromisoformat(request["now"])
    status = (request.get("cluster") or {}).get("status") or {}
    per_node = (status.get("accelerators") or {}).get("nodes") or {}
    rows = []
    for node in (request.get("health") or {}).get("nodes") or []:
        seen = node.get("observed_at")
        gpus = per_node.get(node.get("name")) or {}
        models = list((gpus.get("models") or {}).keys())
        rows.append({
            "name": node.get("name"), "role": node.get("role"),
            "ready": 1 if node.get("phase") in READY else 0,
            "gpus_detected": int(gpus.get("count") or 0),
            "gpu_model": ", ".join(models) or None,
            "heartbeat_age_seconds": (now - datetime.fromisoformat(seen)).total_seconds()
            if seen else None,
            "memory_pressure": None, "disk_pressure": None})
    return rows


def evaluate(suite: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """The decision of ``suite`` on the request's node table."""
    rows = node_table(request)
    if not rows:
        return {"allowed": False, "reason": "the probe saw no nodes: nothing to validate"}
    gx = _gx()
    import pandas as pd

    with _ONE_AT_A_TIME:
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = {"globally": False}  # no bars in the task log
        table = pd.DataFrame(rows, columns=COLUMNS)
        batch = (context.data_sources.add_pandas("airfleet").add_dataframe_asset("nodes")
                 .add_batch_definition_whole_dataframe("health check")
                 .get_batch(batch_parameters={"dataframe": table}))
        result = batch.validate(gx.ExpectationSuite(**json.loads(json.dumps(suite))))
    failed = [_said(r) for r in result.results if not r.success]
    total = len(result.results)
    if failed:
        return {"allowed": False, "reason": f"{len(failed)} of {total} expectations of "
                                            f"{suite['name']} failed: " + "; ".join(failed)}
    return {"allowed": True, "reason": f"all {total} expectations of {suite['name']} met on "
                                       f"{len(rows)} node(s)"}


def _said(result: Any) -> str:
    """``expect_x(column=ready, min_value=1.0): observed 0.667`` (or what else GX saw)."""
    config = result.expectation_config
    args = ", ".join(f"{k}={v}" for k, v in config.kwargs.items() if k != "batch_id")
    seen = result.result or {}
    if "observed_value" in seen:
        value = seen["observed_value"]
        observed = f"observed {value:.3g}" if isinstance(value, float) else f"observed {value}"
    elif "unexpected_count" in seen:
        observed = (f"{seen['unexpected_count']} of {seen.get('element_count')} rows "
                    f"unexpected: {seen.get('partial_unexpected_list')}")
    elif result.exception_info and result.exception_info.get("raised_exception"):
        observed = f"GX raised: {result.exception_info.get('exception_message')}"
    else:
        observed = "failed"
    return f"{config.type}({args}): {observed}"
