"""Governance pre-check: policies authored in Python allow or deny each action before it happens.

A policy is a module ``<name>.py`` in the policies folder (``AIRFLEET_POLICIES_DIR``) with a
module-level ``evaluate(request)``. It returns a decision: ``{"allowed": bool, "reason": str}``,
optionally with ``"input"``, the action's input changed in the fields the action lets a policy
change (:data:`MUTABLE_INPUT`), and ``"approval"``, a human's approval the run must wait for
before it changes anything (:func:`check_approval`); a plain dict needs no import of ours. Bindings (in the store)
name the policies that judge an action, globally or per cluster (per-cluster wins), and how
each runs (:mod:`airfleet.policy.runner`; subprocess mode's sandbox:
:mod:`airfleet.policy.sandbox`). Whatever goes wrong inside a policy (it raises,
hangs, answers garbage, its server is down) is a deny that says so, never a hung run.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from airfleet import config
from airfleet.errors import InvalidRequest

ACTIONS = ("create_cluster", "delete_cluster", "update_cluster", "onboard_cluster", "add_node",
           "remove_node", "scale_nodegroup", "deploy_endpoint", "scale_endpoint",
           "delete_endpoint", "check_stability")
# check_stability is no change: its policies (stability suites) judge the health checks' data,
# and their verdict is the cluster's Stable condition (airfleet.flows.stability).
# The input fields a policy may change, per action; any other change is refused.
MUTABLE_INPUT: dict[str, tuple[str, ...]] = {"create_cluster": ("node_pools", "labels"),
                                             "scale_nodegroup": ("to",)}
MODES = ("subprocess", "local", "http", "gx")  # gx: check_stability only (policy/gx.py)
NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
APPROVAL_KEYS = ("reason", "approvers", "timeout_seconds")
APPROVAL_DEFAULT_SECONDS = 3600.0
APPROVAL_MAX_SECONDS = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Binding:
    """One policy judging one action, for every cluster (``cluster`` None) or for one."""

    action: str
    policy: str
    cluster: str | None = None
    version: str | None = None  # pinned source version; None: whatever the file holds now
    mode: str = "subprocess"
    timeout_seconds: float = 10.0
    memory_mb: int = 512  # subprocess mode: the child's address-space limit
    url: str | None = None  # http mode: the policy server
    fail_open: bool = False  # http mode: allow when the server fails to answer
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    action: str
    allowed: bool
    reason: str
    policy: str | None = None
    version: str | None = None
    mode: str | None = None
    input: dict[str, Any] | None = None  # the input the action goes on with
    changed: tuple[str, ...] = ()  # the input fields the policy changed
    elapsed_ms: float = 0.0
    isolation: str | None = None  # how far the policy was kept from secrets (runner.isolation)
    approval: dict[str, Any] | None = None  # allowed once a human approves (check_approval)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "changed": list(self.changed)}


# ---- policies on disk ----------------------------------------------------------------------

def policies_dir(directory: Path | None = None) -> Path:
    return Path(directory) if directory else config.policies_dir()


def policy_path(name: str, directory: Path | None = None) -> Path:
    if not NAME.match(name):
        raise InvalidRequest(f"policy {name!r}: a policy name is a Python module name "
                             "(lower case letters, digits, _)")
    return policies_dir(directory) / f"{name}.py"


def available(directory: Path | None = None) -> list[str]:
    """The policy modules in the folder (files with an ``evaluate`` entry point)."""
    return sorted(p.stem for p in policies_dir(directory).glob("*.py")
                  if NAME.match(p.stem) and _has_entry_point(p.read_text()))


def source_version(source: str) -> str:
    """A policy's version: the first 12 hex digits of its source's SHA-256."""
    return hashlib.sha256(source.encode()).hexdigest()[:12]


def _has_entry_point(source: str) -> bool:
    """Whether the module defines ``evaluate`` at top level (read, never executed)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "evaluate":
            return True
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "evaluate" for t in node.targets):
            return True
        if isinstance(node, ast.ImportFrom) and any(
                (a.asname or a.name) == "evaluate" for a in node.names):
            return True
    return False


def check_binding(binding: Binding, directory: Path | None = None) -> Binding:
    """Refuse, at bind time, what could only fail at run time. Returns the binding."""
    where = f"binding {binding.action}={binding.policy}"
    if binding.action not in ACTIONS:
        raise InvalidRequest(f"{where}: unknown action {binding.action!r}; actions are "
                             f"{', '.join(ACTIONS)}")
    if binding.mode not in MODES:
        raise InvalidRequest(f"{where}: unknown mode {binding.mode!r}; modes are "
                             f"{', '.join(MODES)}")
    if not 0 < binding.timeout_seconds <= 600:
        raise InvalidRequest(f"{where}: timeout_seconds must be in (0, 600]")
    path = policy_path(binding.policy, directory)  # the name is a module name in every mode
    if binding.mode == "gx":
        return _check_gx(binding, where)
    if binding.mode == "http":
        if not (binding.url or "").startswith(("http://", "https://")):
            raise InvalidRequest(f"{where}: mode http needs --url http(s)://... of the "
                                 "policy server")
        if urlsplit(binding.url).path.rstrip("/") == "/v1/data":
            raise InvalidRequest(f"{where}: --url {binding.url} asks OPA for its whole data "
                                 "document; name the rule that decides, e.g. "
                                 ".../v1/data/airfleet/delete_cluster/decision")
        return binding
    if binding.memory_mb < 64:
        raise InvalidRequest(f"{where}: memory_mb must be at least 64")
    if not path.is_file():
        known = ", ".join(available(directory)) or "none"
        raise InvalidRequest(f"{where}: no policy {binding.policy!r} in {path.parent} "
                             f"(policies there: {known})")
    source = path.read_text()
    if not _has_entry_point(source):
        raise InvalidRequest(f"{where}: {path} has no module-level evaluate(request); "
                             "define one that returns {\"allowed\": ..., \"reason\": ...}")
    if binding.version and binding.version != source_version(source):
        raise InvalidRequest(f"{where}: {path} is version {source_version(source)}, not "
                             f"{binding.version}; bind it without @version or with the "
                             "current one")
    _check_params(binding.params, _declared_params(source, where), where)
    return binding


def _declared_params(source: str, where: str) -> dict[str, Any] | None:
    """The policy's ``PARAMS``, a JSON Schema of its binding's params written as a literal
    (read, never executed: binding runs no policy code); None when it declares none."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "PARAMS" for t in node.targets):
            try:
                schema = ast.literal_eval(node.value)
            except ValueError:
                raise InvalidRequest(f"{where}: the policy's PARAMS is not a literal; write "
                                     "its JSON Schema as a plain dict") from None
            return schema if isinstance(schema, dict) else None
    return None


def _check_params(params: Any, schema: dict[str, Any] | None, where: str) -> None:
    """Refuse params the policy's PARAMS schema refuses, naming the param."""
    if schema is None:
        return
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidRequest(f"{where}: the policy's PARAMS is not a JSON Schema: "
                             f"{exc.message}") from None
    error = jsonschema.exceptions.best_match(
        jsonschema.validators.validator_for(schema)(schema).iter_errors(params))
    if error is not None:
        field = ""
        for part in error.path:  # approvers[0], or a.b
            field += f"[{part}]" if isinstance(part, int) else f".{part}" if field else part
        raise InvalidRequest(f"{where}: {f'param {field}' if field else 'params'}: "
                             f"{error.message} (the policy's docstring says what it takes)")


# ---- deciding ------------------------------------------------------------------------------

def _check_gx(binding: Binding, where: str) -> Binding:
    from airfleet.policy import gx

    if binding.action != "check_stability":
        raise InvalidRequest(f"{where}: a GX expectation suite judges check_stability only "
                             "(it validates the health check's node table)")
    suite = gx.check_suite(binding.params.get("suite"), f"{where}: suite")
    return replace(binding, params={**binding.params, "suite": suite})


def version_of(binding: Binding, directory: Path | None = None) -> str:
    """The version of what the binding runs: its policy module's source, or its GX suite."""
    if binding.mode == "gx":
        return source_version(json.dumps(binding.params.get("suite"), sort_keys=True))
    return source_version(policy_path(binding.policy, directory).read_text())


def decide(bindings: Sequence[Binding], action: str, request: dict[str, Any],
           directory: Path | None = None) -> list[Decision]:
    """Every bound policy's decision on ``action``, in binding order. Each policy sees the
    input as the ones before it changed it; a deny does not stop the others (the run's
    report names every reason)."""
    from airfleet.policy.runner import isolation, run

    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; actions are {', '.join(ACTIONS)}")
    if not bindings:
        return [Decision(action, True, f"no policy is bound to {action}",
                         input=request.get("input"))]
    decisions = []
    current = dict(request)
    for binding in bindings:
        started = time.monotonic()
        version = None
        try:
            if binding.mode != "http":
                version = version_of(binding, directory)
                if binding.version and binding.version != version:
                    raise PolicyFailed(f"is version {version}, the binding pins "
                                       f"{binding.version}; bind it again")
            result = run(binding, {**current, "params": dict(binding.params)}, directory)
            decision = _decision(binding, version, current["input"], result)
        except PolicyFailed as exc:
            decision = _failed(binding, version, current["input"], str(exc))
        except OSError as exc:
            decision = _failed(binding, version, current["input"], f"cannot be read: {exc}")
        decision = replace(_timed(decision, started), isolation=isolation(binding))
        decisions.append(decision)
        if decision.allowed:
            current["input"] = decision.input
    return decisions


class PolicyFailed(Exception):
    """The policy did not produce a decision (raised, timed out, garbage, unreachable)."""


def _decision(binding: Binding, version: str | None, given: Any, result: Any) -> Decision:
    def denied(reason: str) -> Decision:
        return Decision(binding.action, False, f"policy {binding.policy} {reason}",
                        binding.policy, version, binding.mode, given)

    if not isinstance(result, Mapping):
        result = {k: getattr(result, k) for k in ("allowed", "reason", "input")
                  if hasattr(result, k)}
    allowed, reason = result.get("allowed"), result.get("reason", "")
    if not isinstance(allowed, bool):
        return denied(f"answered without a boolean 'allowed': {_short(result)}")
    if not isinstance(reason, str):
        return denied(f"answered a 'reason' that is not a string: {_short(reason)}")
    reason = reason or ("allowed" if allowed else "denied")
    approval = None
    if allowed and result.get("approval") is not None:  # a deny needs no approval
        if binding.action == "check_stability":
            return denied("asked an approval for check_stability, which changes nothing "
                          "(a stability suite's verdict is the Stable condition)")
        try:
            approval = check_approval(result["approval"])
        except ValueError as exc:
            return denied(f"answered a bad approval: {exc}")
    changed_input = result.get("input")
    if changed_input is None or changed_input == given:
        return Decision(binding.action, allowed, reason, binding.policy, version,
                        binding.mode, given, approval=approval)
    if not isinstance(changed_input, Mapping) or not isinstance(given, Mapping):
        return denied(f"answered an 'input' that is not an object: {_short(changed_input)}")
    changed = tuple(sorted(k for k in set(given) | set(changed_input)
                           if given.get(k) != changed_input.get(k)))
    refused = [k for k in changed if k not in MUTABLE_INPUT.get(binding.action, ())]
    if refused:
        allowed_fields = ", ".join(MUTABLE_INPUT.get(binding.action, ())) or "none"
        return denied(f"changed input field(s) {', '.join(refused)}, which {binding.action} "
                      f"does not let a policy change (it may change: {allowed_fields})")
    return Decision(binding.action, allowed, reason, binding.policy, version, binding.mode,
                    dict(changed_input), changed, approval=approval)


def check_approval(value: Any) -> dict[str, Any]:
    """A policy's ``approval``: ``{"reason": str, "approvers": [Airflow user ids],
    "timeout_seconds": number}`` (timeout default 3600 s, at most 7 days). Returns it
    normalised; raises ValueError naming the field and the fix."""
    if not isinstance(value, Mapping):
        raise ValueError(f"approval must be an object with {', '.join(APPROVAL_KEYS)}, not "
                         f"{_short(value)}")
    unknown = sorted(set(value) - set(APPROVAL_KEYS))
    if unknown:
        raise ValueError(f"approval has unknown field(s) {', '.join(map(str, unknown))}; its "
                         f"fields are {', '.join(APPROVAL_KEYS)}")
    reason, approvers = value.get("reason"), value.get("approvers")
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("approval.reason: say why a human must approve (a non-empty string)")
    if not isinstance(approvers, list | tuple) or not approvers or not all(
            isinstance(a, str) and a.strip() for a in approvers):
        raise ValueError("approval.approvers: name at least one Airflow user id who may "
                         f"approve, e.g. [\"alice\"] (got {_short(approvers)})")
    timeout = value.get("timeout_seconds", APPROVAL_DEFAULT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or \
            not 0 < timeout <= APPROVAL_MAX_SECONDS:
        raise ValueError(f"approval.timeout_seconds: a number of seconds in (0, "
                         f"{APPROVAL_MAX_SECONDS:g}], not {_short(timeout)}")
    return {"reason": reason.strip(), "approvers": sorted({a.strip() for a in approvers}),
            "timeout_seconds": float(timeout)}


def verdict(decisions: Sequence[Decision]) -> dict[str, Any]:
    """What a run makes of its policies' decisions: ``decisions`` (as dicts), ``denied`` (the
    reasons of the denies) and ``approval``, the one approval the run waits for before it
    changes anything (None: none asked). Asked by several policies, it needs a user every one
    of them names, and waits no longer than the shortest of their timeouts; when no user is
    named by all, no one can approve and the run is denied."""
    denied = [d.reason for d in decisions if not d.allowed]
    asked = [d for d in decisions if d.approval]
    approval = None
    if asked and not denied:
        approvers = set.intersection(*(set(d.approval["approvers"]) for d in asked))
        if approvers:
            reasons = list(dict.fromkeys(f"{d.policy}: {d.approval['reason']}" for d in asked))
            approval = {"reason": "; ".join(reasons), "approvers": sorted(approvers),
                        "timeout_seconds": min(d.approval["timeout_seconds"] for d in asked)}
        else:
            denied.append("approval: no user may approve: " + "; ".join(
                f"policy {d.policy} names {', '.join(d.approval['approvers'])}"
                for d in asked) + " (an approver must be named by every policy that asks)")
    return {"decisions": [d.to_dict() for d in decisions], "denied": denied,
            "approval": approval}


def _failed(binding: Binding, version: str | None, given: Any, why: str) -> Decision:
    if binding.mode == "http" and binding.fail_open:
        return Decision(binding.action, True,
                        f"policy {binding.policy} {why}; allowed: the binding is fail-open",
                        binding.policy, version, binding.mode, given)
    return Decision(binding.action, False, f"policy {binding.policy} {why}", binding.policy,
                    version, binding.mode, given)


def _timed(decision: Decision, started: float) -> Decision:
    return replace(decision, elapsed_ms=round((time.monotonic() - started) * 1000, 2))


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
