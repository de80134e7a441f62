"""Immutable fields for the fake kube-apiserver: what an update (PUT, PATCH of any type,
server-side apply) may not change, answered 422 Invalid with kube-apiserver's messages.

Sources (kubernetes/kubernetes, v1.32 behaviour):
- pkg/apis/core/validation/validation.go: ValidatePersistentVolumeClaimUpdate (spec immutable
  except resources.requests of a bound claim; with RecoverVolumeExpansionFailure, beta and on
  by default since v1.32, a smaller request is refused when not above status.capacity),
  ValidateServiceUpdate / validateUpgradeDowngradeClusterIPs ("may not change once set")
- pkg/registry/core/service/storage/storage.go: patchAllocatedValues, normalizeClusterIPs (an
  update that omits clusterIP keeps the allocated one)
- pkg/registry/apps/deployment/strategy.go: ValidateUpdate (spec.selector "field is immutable")
- pkg/apis/rbac/validation/validation.go: ValidateRoleBindingUpdate ("cannot change roleRef")
- staging/src/k8s.io/apimachinery/pkg/util/validation/field/errors.go (message formats: a
  struct value printed with %#v) and pkg/api/errors.NewInvalid
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

from tests.fakes.kube_rbac import go_quote

_QUANTITY = re.compile(r"([+-]?[0-9.]+)([eE][+-]?[0-9]+|[a-zA-Z]*)")
_SUFFIXES = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50,
             "Ei": 2 ** 60, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
             "": 1, "k": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15,
             "E": 10 ** 18}
_PVC_FIELDS = ("accessModes", "selector", "resources", "volumeName", "storageClassName",
               "volumeMode", "dataSource", "dataSourceRef", "volumeAttributesClassName")
_IMMUTABLE = "field is immutable"


def check_update(kind: str, new: dict, old: dict) -> None:
    """Raise 422 when `new` changes what `kind` does not let an update change; Services get
    the allocated cluster IPs an update omits, as the registry does before validating."""
    errors = {"PersistentVolumeClaim": _pvc, "Deployment": _deployment, "Service": _service,
              "RoleBinding": _role_binding, "ClusterRoleBinding": _role_binding}.get(
                  kind, lambda new, old: [])(new, old)
    if errors:
        raise _invalid(kind, new["metadata"].get("name") or old["metadata"]["name"], errors)


def _invalid(kind: str, name: str, errors: list[tuple[str, str, str]]) -> Exception:
    """NewInvalid of (field, reason, body) errors."""
    from tests.fakes.kube_apiserver import KubeAPIError  # kube_apiserver imports this module
    group = {"Deployment": "apps", "RoleBinding": "rbac.authorization.k8s.io",
             "ClusterRoleBinding": "rbac.authorization.k8s.io"}.get(kind, "")
    texts = [f"{f}: {body}" for f, _, body in errors]
    joined = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    qualified = f"{kind}.{group}" if group else kind
    return KubeAPIError(422, f'{qualified} "{name}" is invalid: {joined}', {
        "name": name, **({"group": group} if group else {}), "kind": kind,
        "causes": [{"reason": r, "message": body, "field": f} for f, r, body in errors]})


def _forbidden(path: str, detail: str) -> tuple[str, str, str]:
    return path, "FieldValueForbidden", f"Forbidden: {detail}"


def _invalid_value(path: str, value: str, detail: str) -> tuple[str, str, str]:
    return path, "FieldValueInvalid", f"Invalid value: {value}: {detail}"


# --- PersistentVolumeClaim --------------------------------------------------------------------

def quantity(text: Any) -> Decimal:
    """A resource.Quantity's value ("1Gi", "500M", "1e3")."""
    match = _QUANTITY.fullmatch(str(text).strip())
    if not match:
        return Decimal(0)
    number, suffix = match.groups()
    if suffix[:1] in ("e", "E") and suffix[1:].lstrip("+-").isdigit():
        return Decimal(number + suffix)
    return Decimal(number) * Decimal(_SUFFIXES.get(suffix, 0))


def _semantic(value: Any, path: tuple = ()) -> Any:
    """apiequality.Semantic: nil and empty alike, quantities by value."""
    if isinstance(value, dict):
        out = {k: _semantic(v, (*path, k)) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [], "")}
    if isinstance(value, list):
        return [_semantic(v, path) for v in value]
    if len(path) >= 2 and path[-2] in ("requests", "limits"):
        return quantity(value)
    return value


def _storage(pvc: dict, where: str = "spec") -> Decimal:
    part = pvc.get(where) or {}
    holder = (part.get("resources") or {}).get("requests") if where == "spec" \
        else part.get("capacity")
    return quantity((holder or {}).get("storage", 0))


def _pvc(new: dict, old: dict) -> list[tuple[str, str, str]]:
    errors = []
    old_spec, new_spec = dict(old.get("spec") or {}), dict(new.get("spec") or {})
    for spec in (old_spec, new_spec):  # what defaulting gives both (SetDefaults_PVC)
        spec.setdefault("volumeMode", "Filesystem")
    if not old_spec.get("volumeName"):  # the binder sets volumeName once
        old_spec["volumeName"] = new_spec.get("volumeName")
    if (old.get("status") or {}).get("phase") == "Bound" and \
            (new_spec.get("resources") or {}).get("requests"):
        requests = dict(new_spec["resources"]["requests"])
        requests["storage"] = ((old_spec.get("resources") or {}).get("requests") or {}) \
            .get("storage")
        new_spec["resources"] = {**new_spec["resources"], "requests": requests}
    if _semantic(new_spec) != _semantic(old_spec):
        errors.append(_forbidden("spec", "spec is immutable after creation except "
                                 "resources.requests for bound claims\n"
                                 + _spec_diff(old_spec, new_spec)))
    new_size, old_size = _storage(new), _storage(old)
    if new_size < old_size and new_size <= _storage(old, "status"):
        errors.append(_forbidden("spec.resources.requests.storage",
                                 "field can not be less than status.capacity"))
    if new_spec["volumeMode"] != old_spec["volumeMode"]:
        errors.append(_invalid_value("volumeMode", go_quote(new_spec["volumeMode"]), _IMMUTABLE))
    return errors


def _spec_diff(old: dict, new: dict) -> str:
    """Something like cmp.Diff of the internal spec (whose exact text cmp keeps unstable on
    purpose, so only its first line is worth matching)."""
    lines = ["  core.PersistentVolumeClaimSpec{"]
    changed = [f for f in _PVC_FIELDS if _semantic(old.get(f)) != _semantic(new.get(f))]
    for name in changed:
        title = name[0].upper() + name[1:]
        lines.append(f"- \t{title}: {_go_value(old.get(name))},")
        lines.append(f"+ \t{title}: {_go_value(new.get(name))},")
    if len(_PVC_FIELDS) > len(changed):
        lines.append(f"  \t... // {len(_PVC_FIELDS) - len(changed)} identical fields")
    return "\n".join([*lines, "  }", ""])


def _go_value(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, str):
        return f"&{go_quote(value)}"
    if isinstance(value, list):
        return "[]core.PersistentVolumeAccessMode{" + ", ".join(map(go_quote, value)) + "}"
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


# --- Deployment -------------------------------------------------------------------------------

def _deployment(new: dict, old: dict) -> list[tuple[str, str, str]]:
    selector = (new.get("spec") or {}).get("selector")
    if _semantic(selector) == _semantic((old.get("spec") or {}).get("selector")):
        return []
    return [_invalid_value("spec.selector", _go_label_selector(selector), _IMMUTABLE)]


def _go_label_selector(selector: dict | None) -> str:
    """%#v of a *metav1.LabelSelector (dereferenced), as field.Invalid prints it."""
    if selector is None:
        return "null"
    labels = selector.get("matchLabels")
    expressions = selector.get("matchExpressions")
    return (f"v1.LabelSelector{{MatchLabels:{_go_map(labels)}, "
            f"MatchExpressions:{_go_requirements(expressions)}}}")


def _go_map(labels: dict | None) -> str:
    if labels is None:
        return "map[string]string(nil)"
    return "map[string]string{" + ", ".join(
        f"{go_quote(k)}:{go_quote(str(v))}" for k, v in sorted(labels.items())) + "}"


def _go_strings(values: list | None) -> str:
    return "[]string(nil)" if values is None else \
        "[]string{" + ", ".join(go_quote(str(v)) for v in values) + "}"


def _go_requirements(expressions: list | None) -> str:
    if expressions is None:
        return "[]v1.LabelSelectorRequirement(nil)"
    return "[]v1.LabelSelectorRequirement{" + ", ".join(
        f'v1.LabelSelectorRequirement{{Key:{go_quote(e.get("key", ""))}, '
        f'Operator:{go_quote(e.get("operator", ""))}, Values:{_go_strings(e.get("values"))}}}'
        for e in expressions) + "}"


# --- Service ----------------------------------------------------------------------------------

def _cluster_ips(spec: dict) -> list[str]:
    if spec.get("clusterIPs"):
        return list(spec["clusterIPs"])
    return [spec["clusterIP"]] if spec.get("clusterIP") else []


def _service(new: dict, old: dict) -> list[tuple[str, str, str]]:
    old_spec, spec = old.get("spec") or {}, new.setdefault("spec", {})
    if "ExternalName" in (old_spec.get("type"), spec.get("type")):
        return []
    old_ips = _cluster_ips(old_spec)
    if not spec.get("clusterIP") and old_spec.get("clusterIP"):  # patchAllocatedValues
        spec["clusterIP"] = old_spec["clusterIP"]
    if not spec.get("clusterIPs") and old_ips:
        spec["clusterIPs"] = old_ips
    if spec.get("clusterIP") != old_spec.get("clusterIP") and spec.get("clusterIP") \
            and spec.get("clusterIPs") == old_ips:  # normalizeClusterIPs
        spec["clusterIPs"] = [spec["clusterIP"]]
    ips = spec.get("clusterIPs") or []
    if "None" in (old_spec.get("clusterIP"), spec.get("clusterIP")) and old_ips == ips:
        return []
    shown = "[]string{" + ", ".join(map(go_quote, ips)) + "}" if ips else "[]string(nil)"
    if not ips and old_ips:
        return [_invalid_value("spec.clusterIPs[0]", shown, "primary clusterIP can not be unset")]
    return [_invalid_value(f"spec.clusterIPs[{i}]", shown, "may not change once set")
            for i, ip in enumerate(old_ips) if i < len(ips) and ips[i] != ip]


# --- RoleBinding, ClusterRoleBinding ----------------------------------------------------------

def _role_binding(new: dict, old: dict) -> list[tuple[str, str, str]]:
    ref, old_ref = new.get("roleRef") or {}, old.get("roleRef") or {}
    fields = ("apiGroup", "kind", "name")
    if all(ref.get(f, "") == old_ref.get(f, "") for f in fields):
        return []
    shown = "rbac.RoleRef{" + ", ".join(
        f"{go_name}:{go_quote(ref.get(f, ''))}"
        for go_name, f in zip(("APIGroup", "Kind", "Name"), fields, strict=True)) + "}"
    return [_invalid_value("roleRef", shown, "cannot change roleRef")]
