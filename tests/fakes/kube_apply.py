"""Field management and server-side apply for the fake kube-apiserver.

https://kubernetes.io/docs/reference/using-api/server-side-apply/ describes the behaviour; the
algorithm follows sigs.k8s.io/structured-merge-diff (merge/update.go: Updater.Apply, update,
prune; typed/compare.go, merge.go, tofieldset.go, remove.go; fieldpath/serialize.go) and the
field manager of k8s.io/apiserver (pkg/endpoints/handlers/fieldmanager: conflict messages,
stripped metadata, before-first-apply, managedFields ordering, manager from the User-Agent).

Fields are paths of elements: ("f", name) a struct field or map key, ("k", '{"name":"x"}') an
item of an associative list by its keys, ("v", '"x"') a value of a set list. A manager's set is
what metadata.managedFields holds, in the fieldsV1 encoding (f:, k:, v:, ".").

The schema is the part of Kubernetes' OpenAPI that field ownership depends on, for the kinds
the fake serves: associative lists and their keys (x-kubernetes-list-map-keys), set lists,
atomic lists (every other list), atomic structs and maps (LabelSelector, Service selector,
nodeSelector, ...), granular maps (labels, annotations, ConfigMap data, resource lists).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tests.fakes.kube_rbac import go_quote

APPLY_PATCH = "application/apply-patch+yaml"
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()
BEFORE_FIRST_APPLY = "before-first-apply"
MAX_MANAGER_LENGTH = 128

Path = tuple[tuple[str, Any], ...]

# --- the schema -------------------------------------------------------------------------------

_CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")
_LIST_KEYS = {  # x-kubernetes-list-map-keys (or the patch merge key SMD derives them from)
    **dict.fromkeys(_CONTAINER_LISTS, ("name",)),
    "env": ("name",), "volumes": ("name",), "imagePullSecrets": ("name",),
    "resourceClaims": ("name",), "schedulingGates": ("name",), "secrets": ("name",),
    "volumeMounts": ("mountPath",), "volumeDevices": ("devicePath",), "hostAliases": ("ip",),
    "conditions": ("type",), "ownerReferences": ("uid",),
    "topologySpreadConstraints": ("topologyKey", "whenUnsatisfiable"),
}
_KEY_DEFAULTS = {"protocol": "TCP"}  # list-map keys with a default in the OpenAPI schema
# +structType=atomic / +mapType=atomic: LabelSelector, Service and Pod node selectors, the
# key selectors of env.valueFrom
_ATOMIC_DICTS = {"selector", "nodeSelector", "labelSelector", "namespaceSelector",
                 "configMapKeyRef", "secretKeyRef", "fieldRef", "resourceFieldRef"}
_STRIPPED = ("apiVersion", "kind")  # and the metadata fields below: never owned
_STRIPPED_META = ("name", "namespace", "creationTimestamp", "selfLink", "uid", "generation",
                  "managedFields", "resourceVersion")
_RANK = {"f": 0, "k": 1, "v": 2, "i": 3}


def _dict_type(names: tuple[str, ...]) -> str:
    """struct (named fields), map (granular keys) or atomic, for the dict at `names`."""
    if not names:
        return "struct"
    last, parent = names[-1], names[-2] if len(names) > 1 else ""
    if last in _ATOMIC_DICTS or (last == "[]" and parent == "imagePullSecrets"):
        return "atomic"  # LocalObjectReference is +structType=atomic
    if (parent == "metadata" and last in ("labels", "annotations")) \
            or (len(names) == 1 and last in ("data", "binaryData", "stringData")) \
            or (parent == "resources" and last in ("limits", "requests")) \
            or (parent == "status" and last in ("capacity", "allocatable")):
        return "map"
    return "struct"


def _list_type(kind: str, names: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """("map", keys) for an associative list, ("set", ()) or ("atomic", ())."""
    last = names[-1]
    if names[-2:] == ("metadata", "finalizers"):
        return "set", ()
    if last == "ports":
        if len(names) >= 3 and names[-3] in _CONTAINER_LISTS:
            return "map", ("containerPort", "protocol")
        if kind == "Service" and names == ("spec", "ports"):
            return "map", ("port", "protocol")
        return "atomic", ()
    if last in _LIST_KEYS:
        return "map", _LIST_KEYS[last]
    return "atomic", ()


class _KeyMissing(ValueError):
    pass


def _elements(kind: str, names: tuple[str, ...], items: list) -> list[tuple[tuple, Any]]:
    """(path element, item) of a set or associative list, the first of duplicates kept."""
    how, keys = _list_type(kind, names)
    seen: dict[tuple, Any] = {}
    for index, item in enumerate(items):
        if how == "set":
            pe = ("v", json.dumps(item, separators=(",", ":")))
        else:
            if not isinstance(item, dict):
                raise _KeyMissing(f"element {index}: associative list with keys has an element "
                                  "that is not a map")
            values = {}
            for key in keys:
                if key not in item and key not in _KEY_DEFAULTS:
                    raise _KeyMissing(f"element {index}: associative list with keys has an "
                                      f'element that omits key field "{key}" (and doesn\'t have '
                                      "default value)")
                values[key] = item.get(key, _KEY_DEFAULTS.get(key))
            pe = ("k", json.dumps(dict(sorted(values.items())), separators=(",", ":")))
        seen.setdefault(pe, item)
    return list(seen.items())


def _shape(kind: str, value: Any, names: tuple[str, ...]) -> str:
    """leaf, dict or list (granular ones; atomic lists and dicts are leaves)."""
    if isinstance(value, dict):
        return "dict" if _dict_type(names) != "atomic" else "leaf"
    if isinstance(value, list) and _list_type(kind, names)[0] != "atomic":
        try:
            _elements(kind, names, value)
        except _KeyMissing:
            return "leaf"
        return "list"
    return "leaf"


def _names(path: Path) -> tuple[str, ...]:
    return tuple(v if t == "f" else "[]" for t, v in path)


# --- field sets -------------------------------------------------------------------------------

def field_set(kind: str, obj: dict) -> set[Path]:
    """ToFieldSet of an applied configuration: leaves, atomic values, list items."""
    out: set[Path] = set()
    _collect(kind, obj, (), out)
    return out


def _collect(kind: str, value: Any, path: Path, out: set[Path]) -> None:
    names = _names(path)
    if isinstance(value, dict) and _dict_type(names) != "atomic":
        for key, child in value.items():
            _collect(kind, child, (*path, ("f", key)), out)
        return
    if isinstance(value, list) and names and _list_type(kind, names)[0] != "atomic":
        try:
            elements = _elements(kind, names, value)
        except _KeyMissing as exc:
            raise _KeyMissing(f"{path_text(path)}: {exc}") from None
        for pe, item in elements:
            out.add((*path, pe))
            if isinstance(item, dict):
                _collect(kind, item, (*path, pe), out)
        return
    if path:
        out.add(path)


def compare(kind: str, old: Any, new: Any) -> tuple[set[Path], set[Path], set[Path]]:
    """typed.Compare: (added, modified, removed); a non-leaf node counts as added or removed
    when it appears or disappears (the post-item hook), leaves when they do or change."""
    out: tuple[set[Path], set[Path], set[Path]] = (set(), set(), set())
    _compare(kind, old, new, (), out)
    return out


def _empty(value: Any) -> bool:
    return value is MISSING or value is None or value == {} or value == []


def _compare(kind: str, lhs: Any, rhs: Any, path: Path, out: tuple) -> None:
    added, modified, removed = out
    names = _names(path)
    shape = _shape(kind, rhs if rhs is not MISSING and rhs is not None else lhs, names)
    if shape != "leaf" and lhs not in (MISSING, None) and rhs not in (MISSING, None) \
            and _shape(kind, lhs, names) != _shape(kind, rhs, names):
        shape = "leaf"
    if shape == "leaf" or (_empty(lhs) and _empty(rhs)):
        if lhs is MISSING:
            added.add(path)
        elif rhs is MISSING:
            removed.add(path)
        elif lhs != rhs:
            modified.add(path)
        return
    for pe, left, right in _children(kind, names, lhs, rhs, shape):
        _compare(kind, left, right, (*path, pe), out)
    if path and lhs is MISSING:
        added.add(path)
    elif path and rhs is MISSING:
        removed.add(path)


def _children(kind: str, names: tuple[str, ...], lhs: Any, rhs: Any, shape: str) -> list:
    if shape == "dict":
        left, right = (v if isinstance(v, dict) else {} for v in (lhs, rhs))
        return [(("f", k), left.get(k, MISSING), right.get(k, MISSING))
                for k in dict.fromkeys([*left, *right])]
    left, right = (dict(_elements(kind, names, v)) if isinstance(v, list) else {}
                   for v in (lhs, rhs))
    return [(pe, left.get(pe, MISSING), right.get(pe, MISSING))
            for pe in dict.fromkeys([*left, *right])]


# --- merge and remove -------------------------------------------------------------------------

def merge(kind: str, live: Any, config: Any, path: Path = ()) -> Any:
    """typed.Merge with the applied configuration winning (ruleKeepRHS)."""
    names = _names(path)
    if live is MISSING or live is None or _shape(kind, config, names) == "leaf" \
            or _shape(kind, live, names) != _shape(kind, config, names):
        return copy.deepcopy(config)
    if isinstance(config, dict):
        result = copy.deepcopy(live)
        for key, value in config.items():
            result[key] = merge(kind, live.get(key, MISSING), value, (*path, ("f", key)))
        return result
    return _merge_list(kind, live, config, path)


def _merge_list(kind: str, live: list, config: list, path: Path) -> list:
    """mergingWalker.visitListItems: the applied order for the items it names, the live ones
    it does not name kept where they were."""
    names = _names(path)
    lhs, rhs = _elements(kind, names, live), _elements(kind, names, config)
    lmap, rmap = dict(lhs), dict(rhs)
    shared = [pe for pe, _ in rhs if pe in lmap]
    next_shared = shared.pop(0) if shared else None
    out, done, li, ri = [], set(), 0, 0
    while li < len(lhs) or ri < len(rhs):
        if li < len(lhs) and ri < len(rhs):
            pe = lhs[li][0]
            if pe == rhs[ri][0]:
                out.append(merge(kind, lmap[pe], rmap[pe], (*path, pe)))
                done.add(pe)
                li, ri = li + 1, ri + 1
                next_shared = shared.pop(0) if shared else None
                continue
            if pe in rmap and next_shared is not None and next_shared != pe:
                li += 1
                continue
        if li < len(lhs):
            pe = lhs[li][0]
            if pe not in rmap:
                out.append(copy.deepcopy(lmap[pe]))
                li += 1
                continue
            if pe in done:
                li += 1
                continue
        pe = rhs[ri][0]
        done.add(pe)
        out.append(merge(kind, lmap.get(pe, MISSING), rmap[pe], (*path, pe)))
        ri += 1
        if next_shared is not None and next_shared == pe:
            next_shared = shared.pop(0) if shared else None
    return out


def remove(kind: str, obj: dict, path: Path) -> None:
    """Remove the node at `path` (and what is under it), when it exists."""
    parent: Any = obj
    for depth, pe in enumerate(path[:-1]):
        parent = _child(kind, parent, path[:depth], pe)
        if parent is MISSING:
            return
    last = path[-1]
    if last[0] == "f" and isinstance(parent, dict):
        parent.pop(last[1], None)
    elif isinstance(parent, list):
        elements = _elements(kind, _names(path[:-1]), parent)
        doomed = next((item for pe, item in elements if pe == last), MISSING)
        parent[:] = [item for item in parent if item is not doomed]


def _child(kind: str, node: Any, path: Path, pe: tuple) -> Any:
    if pe[0] == "f":
        return node.get(pe[1], MISSING) if isinstance(node, dict) else MISSING
    if not isinstance(node, list):
        return MISSING
    try:
        return dict(_elements(kind, _names(path), node)).get(pe, MISSING)
    except _KeyMissing:
        return MISSING


def _with_named_parents(paths: set[Path]) -> set[Path]:
    """Set.EnsureNamedFieldsAreMembers: also the struct fields above each path."""
    out = set(paths)
    for path in paths:
        for end in range(1, len(path)):
            prefix = path[:end]
            if prefix[-1][0] == "f" and _dict_type(_names(prefix[:-1])) == "struct":
                out.add(prefix)
    return out


def _drop_nulls(value: Any) -> Any:
    """What decoding into Go types does to a null: the field is gone."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


# --- managedFields ----------------------------------------------------------------------------

@dataclass
class Manager:
    manager: str
    operation: str  # Apply | Update
    api_version: str
    time: str | None = None
    subresource: str = ""
    fields: set[Path] = field(default_factory=set)

    @property
    def identity(self) -> tuple[str, str, str, str]:  # BuildManagerIdentifier
        version = "" if self.operation == "Apply" else self.api_version
        return self.manager, self.operation, version, self.subresource

    def text(self) -> str:
        """printManager, as conflict messages name a manager."""
        text = go_quote(self.manager)
        if self.subresource:
            text += f" with subresource {go_quote(self.subresource)}"
        return f"{text} using {self.api_version}" if self.operation == "Update" else text

    def entry(self) -> dict:
        entry: dict[str, Any] = {"manager": self.manager, "operation": self.operation,
                                 "apiVersion": self.api_version}
        if self.time:
            entry["time"] = self.time
        entry.update(fieldsType="FieldsV1", fieldsV1=encode(self.fields))
        if self.subresource:
            entry["subresource"] = self.subresource
        return entry


def _element_text(pe: tuple) -> str:
    return f"{pe[0]}:{pe[1]}"


def _parse_element(text: str) -> tuple:
    kind, _, value = text.partition(":")
    return (kind, int(value)) if kind == "i" else (kind, value)


def _sort_key(pe: tuple) -> tuple:
    return _RANK[pe[0]], pe[1]


def _tree(paths: set[Path]) -> dict:
    """Paths as a tree; the key None marks a node that is itself a member."""
    root: dict = {}
    for path in paths:
        node = root
        for pe in path:
            node = node.setdefault(pe, {})
        node[None] = True
    return root


def encode(paths: set[Path]) -> dict:
    """fieldsV1: f:/k:/v: keys in the set's order, "." for a member that has children."""
    def render(node: dict) -> dict:
        children = sorted((pe for pe in node if pe is not None), key=_sort_key)
        out: dict = {".": {}} if node.get(None) and children else {}
        for pe in children:
            out[_element_text(pe)] = render(node[pe])
        return out
    return render(_tree(paths))


def decode(fields: dict, prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for key, child in (fields or {}).items():
        if key == ".":
            out.add(prefix)
            continue
        path = (*prefix, _parse_element(key))
        if child:
            out |= decode(child, path)
        else:
            out.add(path)
    return out


def iterate(paths: set[Path]) -> list[Path]:
    """Set.Iterate's order: the members of a level, then the children of that level."""
    def walk(node: dict, prefix: Path) -> list[Path]:
        children = sorted((pe for pe in node if pe is not None), key=_sort_key)
        members = [(*prefix, pe) for pe in children if node[pe].get(None)]
        nested = [p for pe in children if len(node[pe]) > (1 if node[pe].get(None) else 0)
                  for p in walk(node[pe], (*prefix, pe))]
        return members + nested
    return walk(_tree(paths), ())


def path_text(path: Path) -> str:
    """fieldpath.Path.String(): .spec.containers[name="main"].image"""
    def value_text(value: Any) -> str:
        if isinstance(value, str):
            return go_quote(value)
        return json.dumps(value)

    parts = []
    for kind, value in path:
        if kind == "f":
            parts.append(f".{value}")
        elif kind == "k":
            keys = json.loads(value)
            parts.append("[" + ",".join(f"{k}={value_text(v)}" for k, v in keys.items()) + "]")
        elif kind == "v":
            parts.append(f"[={value_text(json.loads(value))}]")
        else:
            parts.append(f"[{value}]")
    return "".join(parts)


def _time(text: str | None) -> str | None:
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def managers_of(obj: dict | None) -> list[Manager]:
    entries = ((obj or {}).get("metadata") or {}).get("managedFields") or []
    return [Manager(e.get("manager", ""), e.get("operation", ""), e.get("apiVersion", ""),
                    _time(e.get("time")), e.get("subresource", ""), decode(e.get("fieldsV1")))
            for e in entries if isinstance(e, dict)]


def _store(obj: dict, managers: list[Manager]) -> None:
    """Encode the managers into obj, in the server's order (sortEncodedManagedFields)."""
    def order(m: Manager) -> tuple:
        seconds = datetime.fromisoformat(m.time.replace("Z", "+00:00")).timestamp() \
            if m.time else 0
        return m.operation, seconds, m.manager, m.api_version, m.subresource

    meta = obj.setdefault("metadata", {})
    kept = sorted((m for m in managers if m.fields), key=order)
    if kept:
        meta["managedFields"] = [m.entry() for m in kept]
    else:
        meta.pop("managedFields", None)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- what the managers see of an object ---------------------------------------------------------

def _view(obj: dict, subresource: str, has_status: bool) -> dict:
    """The object without the fields no manager owns (stripped metadata) and without the
    fields this endpoint resets (status on the main resource; all but status on /status)."""
    view = {k: copy.deepcopy(v) for k, v in obj.items() if k not in _STRIPPED}
    meta = view.get("metadata") or {}
    view["metadata"] = {k: v for k, v in meta.items() if k not in _STRIPPED_META}
    if subresource == "status":
        return {"metadata": {}, "status": view.get("status") or {}}
    if has_status:
        view.pop("status", None)
    return view


def _skeleton(new: dict) -> dict:
    """The empty object a create is compared with: the struct parts a Go zero value already
    serializes (so they are not "added")."""
    skeleton: dict = {"metadata": {}}
    spec = new.get("spec")
    if isinstance(spec, dict):
        skeleton["spec"] = {}
        if isinstance(spec.get("template"), dict):
            skeleton["spec"]["template"] = {"metadata": {}, "spec": {}}
    if isinstance(new.get("status"), dict):
        skeleton["status"] = {}
    return skeleton


def manager_of(field_manager: str | None, user_agent: str) -> str:
    """managerOrUserAgent: the fieldManager parameter, else the User-Agent up to its first
    "/", printable characters only, at most 128 bytes."""
    if field_manager:
        return field_manager
    name = "".join(ch for ch in user_agent.split("/")[0] if ch.isprintable())
    while len(name.encode()) > MAX_MANAGER_LENGTH:
        name = name[:-1]
    return name


def track_update(kind: str, api_version: str, live: dict | None, new: dict, manager: str,
                 subresource: str, has_status: bool) -> None:
    """Record a non-apply write (create, update, patch) in new.metadata.managedFields, as the
    field manager's Update operation does: the writer owns what it added or changed, other
    managers lose it, everyone loses what it removed."""
    meta = new.setdefault("metadata", {})
    requested = meta.get("managedFields")
    if requested == [{}]:  # documented way to strip managedFields
        meta.pop("managedFields")
        return
    managers = managers_of(new) if requested and not subresource else managers_of(live)
    if live is not None and not managers:  # skipNonAppliedManager: untracked objects stay so
        meta.pop("managedFields", None)
        return
    old_view = _view(live, subresource, has_status) if live is not None else _skeleton(new)
    new_view = _view(new, subresource, has_status)
    update_managers(kind, managers, old_view, new_view, manager, api_version, subresource)
    _store(new, managers)


def update_managers(kind: str, managers: list[Manager], old_view: dict, new_view: dict,
                    manager: str, api_version: str, subresource: str) -> None:
    added, modified, removed = compare(kind, old_view, new_view)
    for m in managers:
        m.fields -= added | modified | removed
    took = added | modified
    if not took:
        return
    mine = next((m for m in managers if m.identity == (manager, "Update", api_version,
                                                        subresource)), None)
    if mine is None:
        mine = Manager(manager, "Update", api_version, subresource=subresource)
        managers.append(mine)
    mine.fields |= took
    mine.time = _now()


# --- server-side apply ------------------------------------------------------------------------

def check_patch_options(content_type: str, query: Any) -> bool:
    """ValidatePatchOptions; returns whether this PATCH is an apply."""
    apply = content_type.split(";")[0].strip() == APPLY_PATCH
    cause = None
    if not apply and "force" in query:
        cause = {"reason": "FieldValueForbidden", "field": "force",
                 "message": "Forbidden: may not be specified for non-apply patch"}
    elif apply and not query.get("fieldManager"):
        cause = {"reason": "FieldValueRequired", "field": "fieldManager",
                 "message": "Required value: is required for apply patch"}
    if cause:
        raise _error(422, f'PatchOptions.meta.k8s.io "" is invalid: {cause["field"]}: '
                          f'{cause["message"]}',
                     {"group": "meta.k8s.io", "kind": "PatchOptions", "causes": [cause]})
    return apply


def apply(kind: str, api_version: str, live: dict | None, config: Any, manager: str,
          force: bool, subresource: str, has_status: bool) -> dict:
    """The object after applying `config` as `manager` (managedFields included); raises 409
    with the conflicts unless `force`, 400 for a configuration the server refuses."""
    _check_config(kind, api_version, config)
    config = _restricted(config, subresource, has_status)
    managers = managers_of(live)
    base = {k: copy.deepcopy(v) for k, v in (live or {}).items()}
    base.setdefault("metadata", {}).pop("managedFields", None)
    if live is None:
        base.update(apiVersion=api_version, kind=kind)
        base["metadata"].update({k: v for k, v in config["metadata"].items()
                                 if k in ("name", "namespace")})
    elif not managers:  # fields set before any manager was tracked get an owner
        update_managers(kind, managers, _skeleton(base), _view(base, "", has_status),
                        BEFORE_FIRST_APPLY, api_version, "")
    try:
        applied = field_set(kind, config)
        merged = _drop_nulls(merge(kind, base, config))
    except _KeyMissing as exc:
        group_version = api_version if "/" in api_version else f"/{api_version}"
        raise _error(500, f"failed to create typed patch object ({group_version}, Kind={kind}): "
                          f"{exc}", reason="Unknown") from None
    me = ("Apply", manager, subresource)
    last = next((m for m in managers if (m.operation, m.manager, m.subresource) == me), None)
    others = [m for m in managers if m is not last]
    if last is not None:
        owned = applied.union(*(m.fields for m in others))
        _prune(kind, merged, last.fields, owned)
    view = _view(base, subresource, has_status) if live is not None else _skeleton(merged)
    added, modified, removed = compare(kind, view, _view(merged, subresource, has_status))
    _settle_conflicts(others, added | modified, force)
    for m in others:
        m.fields -= removed
    changed = _without_managed(merged) != _without_managed(base) or live is None
    mine = Manager(manager, "Apply", api_version, subresource=subresource,
                   fields={p for p in applied if not _stripped(p)},
                   time=_now() if changed or last is None else last.time)
    _store(merged, [*others, mine])
    return merged


def _check_config(kind: str, api_version: str, config: Any) -> None:
    if not isinstance(config, dict):
        raise _error(400, "error decoding YAML: the applied configuration is not an object")
    if config.get("apiVersion") != api_version:
        raise _error(400, "Incorrect version specified in apply patch. Specified patch version: "
                          f"{config.get('apiVersion') or ''}, expected: {api_version}")
    if (config.get("metadata") or {}).get("managedFields") is not None:
        raise _error(400, "metadata.managedFields must be nil")


def _restricted(config: dict, subresource: str, has_status: bool) -> dict:
    """The parts of an applied configuration this endpoint writes (reset fields dropped)."""
    config = copy.deepcopy(config)
    config.setdefault("metadata", {})
    if subresource == "status":
        return {"apiVersion": config["apiVersion"], "kind": config.get("kind"),
                "metadata": {k: v for k, v in config["metadata"].items()
                             if k in ("name", "namespace")},
                "status": config.get("status") or {}}
    if has_status:
        config.pop("status", None)
    return config


def _prune(kind: str, merged: dict, last: set[Path], owned: set[Path]) -> None:
    """Updater.prune: what the manager applied last time and no longer applies goes, unless
    some manager (the applier included) owns it or something under it."""
    doomed = _with_named_parents(last) - _with_named_parents(owned)
    for path in sorted(doomed, key=len):
        if path[0] != ("f", "metadata") or len(path) > 1:
            remove(kind, merged, path)


def _settle_conflicts(others: list[Manager], touched: set[Path], force: bool) -> None:
    conflicts = [(m, m.fields & touched) for m in others if m.fields & touched]
    if conflicts and not force:
        raise _conflict_error(conflicts)
    for m, taken in conflicts:
        m.fields -= taken


def _conflict_error(conflicts: list[tuple[Manager, set[Path]]]) -> Exception:
    conflicts = sorted(conflicts, key=lambda c: c[0].identity)
    listed = [(m, path_text(p)) for m, paths in conflicts for p in iterate(paths)]
    if len(listed) == 1:
        message = f"Apply failed with 1 conflict: conflict with {listed[0][0].text()}: " \
                  f"{listed[0][1]}"
    else:
        lines = []
        for m, paths in conflicts:
            lines.append(f"conflicts with {m.text()}:")
            lines += [f"- {path_text(p)}" for p in iterate(paths)]
        message = f"Apply failed with {len(listed)} conflicts: " + "\n".join(lines)
    causes = [{"reason": "FieldManagerConflict", "message": f"conflict with {m.text()}",
               "field": text} for m, text in listed]
    return _error(409, message, {"causes": causes})


def _stripped(path: Path) -> bool:
    return path[0][1] in _STRIPPED if len(path) == 1 else (
        path[0] == ("f", "metadata") and path[1] in (("f", n) for n in _STRIPPED_META))


def _without_managed(obj: dict) -> dict:
    copied = {k: v for k, v in obj.items() if k != "metadata"}
    copied["metadata"] = {k: v for k, v in (obj.get("metadata") or {}).items()
                          if k != "managedFields"}
    return copied


def _error(code: int, message: str, details: dict | None = None, *,
           reason: str | None = None) -> Exception:
    # imported here: kube_apiserver imports this module
    from tests.fakes.kube_apiserver import KubeAPIError
    return KubeAPIError(code, message, details, reason=reason)
