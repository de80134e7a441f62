"""A fake Kubernetes API server for tests, speaking the real wire protocol.

No kube-apiserver can run on these machines. `FakeKubeAPIServer` is a Starlette app served by
uvicorn in a background thread on 127.0.0.1, over plain http (`url`) and https (`https_url`,
with a CA of its own); the real `kubernetes` client, `kubernetes_asyncio`, httpx and `kubectl`
talk to it with the kubeconfig it hands out (a bearer token)::

    with FakeKubeAPIServer(ready_delay=0.2) as kube:
        api = kubernetes.config.new_client_from_config_dict(kube.kubeconfig())
        kubernetes.client.CoreV1Api(api).create_namespace({"metadata": {"name": "x"}})
        subprocess.run(["kubectl", "--kubeconfig", kube.write_kubeconfig(path), "get", "ns"])

kubectl (client-go) sends no credentials over plain http, so `write_kubeconfig()` writes the
https kubeconfig by default (`kubeconfig(tls=True)` gives that one as a dict). kubectl 1.32 sends
the bodies of its typed commands as protobuf: the few kinds it sends that way are decoded.

Layout: `RESOURCES` (what exists: group, version, plural, kind, scope, subresources), one store
of objects per resource guarded by one lock, one global resourceVersion counter, a bounded event
history for watches, and a route table (discovery + one resource endpoint that resolves the path
and dispatches on (subresource, verb)). Everything the server answers mirrors kube-apiserver:

- Objects get uid, resourceVersion (one global counter), creationTimestamp and generation
  (bumped when anything outside metadata and status changes; ConfigMap data counts, unlike the
  real server, which keeps no generation on ConfigMaps). A write that changes nothing is a no-op.
- Errors are v1 Status bodies with the real reasons and messages (NotFound, AlreadyExists,
  Conflict, BadRequest, Forbidden, Invalid, Unauthorized, MethodNotAllowed, ...).
- Kinds with a status subresource ignore status on create/update of the main resource; Pods and
  PVCs start Pending, Namespaces Active, Services get a cluster IP, Secret stringData goes to data.
- Controllers (kube_controllers.py) act on every stored write before its response is sent:
  Deployments roll out through ReplicaSets (`<name>-<pod-template-hash>`, revisions, maxSurge /
  maxUnavailable, Recreate, pause, rollback, progressDeadlineSeconds) with the real status
  counts and Available / Progressing conditions (zero counts omitted); ReplicaSets own Pods,
  which turn Running and Ready `ready_delay` seconds after creation, never Ready for a
  Deployment key in `never_ready`, or stay in ImagePullBackOff for an image in `bad_images`;
  deleting an owner deletes its dependents (`propagationPolicy: Orphan` keeps them). A status a
  client writes to deployments/status stays until the controller's next sync.
- Deleting a Namespace marks it Terminating; after `terminate_delay` the namespace controller
  deletes its content, reports what remains in its status conditions and retries; the namespace
  goes once nothing is left. Objects with finalizers (deleted one by one or by collection) get a
  deletionTimestamp and go when the last finalizer is removed.
- Watches replay history from a resourceVersion (410 Expired as an ERROR event once it is older
  than the retained history, see `compact()`), and filter like the watch cache: an object that
  starts matching the selector arrives as ADDED, one that stops matching as DELETED (its last
  matching state).
- Identities (kube_rbac.py): the constructor's `token` is the admin "fake-user", allowed all
  but what `deny()` lists; `service_account_token()` (or the TokenRequest API, `kubectl create
  token`) and `add_user()` give identities that RBAC objects alone authorize, with the real rule
  semantics, 403 messages and SelfSubjectAccessReview reasons; discovery is open to all. Writes
  of Roles and bindings go through RBAC's escalation prevention (escalate / bind verbs).
- Server-side apply and field management (kube_apply.py): `application/apply-patch+yaml`
  patches with fieldManager / force / dryRun, managedFields in the FieldsV1 encoding for every
  write through the API (operation Update under fieldManager or the User-Agent), ownership by
  the OpenAPI list and map types, removal of fields a manager stops applying, 409 conflicts.
- Immutable fields (kube_validation.py) answer 422: a PVC's spec (a bound claim may grow), a
  Deployment's selector, a Service's clusterIPs, a binding's roleRef.
- A fresh server (and `reset()`) holds the namespaces of a fresh cluster: default, kube-system,
  kube-public, kube-node-lease, and no RBAC objects (no bootstrap ClusterRoles such as view or
  edit). Pods using an image of `run_images` run as local processes (kube_kubelet.py): their
  podIP is a loopback address of their own, their readiness follows their probes, and
  `GET .../pods/<name>/log` serves their output. Not implemented: pod exec, limit/continue (lists come whole), watch in Table form,
  aggregated discovery, admission beyond name validation, apply to the scale subresource.

The Python state methods (`create`, `get`, `list`, `update`, `delete`, `add_node`,
`set_pod_ready`) bypass auth, faults, API validation and field management; they raise
`KubeAPIError` for a duplicate or missing object and default a namespaced object's namespace
to "default". `update` replaces the whole object, status included (the controllers then react
to it); `delete` of a Namespace removes it and its content at once, with no controller reacting.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import ipaddress
import json
import logging
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes import kube_apply, kube_rbac, kube_validation
from tests.fakes.kube_controllers import Controllers, default_deployment

log = logging.getLogger(__name__)

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
PROTECTED_NAMESPACES = SYSTEM_NAMESPACES[:3]
USER = "fake-user"
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
HISTORY_LIMIT = 1000  # watch events retained for resuming (the watch cache keeps a window too)


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    fields: tuple[str, ...] = ()  # field selector labels beyond metadata.name / metadata.namespace

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:  # as the real server names it in messages: deployments.apps
        return f"{self.plural}.{self.group}" if self.group else self.plural


_R = Resource
_POD_FIELDS = ("spec.nodeName", "status.phase", "spec.restartPolicy", "spec.schedulerName",
               "spec.serviceAccountName", "status.podIP")
RESOURCES = (
    _R("", "v1", "namespaces", "Namespace", False, ("ns",), ("status",),
       ("create", "delete", "get", "list", "patch", "update", "watch"), ("status.phase",)),
    _R("", "v1", "nodes", "Node", False, ("no",), ("status",), fields=("spec.unschedulable",)),
    _R("", "v1", "pods", "Pod", True, ("po",), ("status", "log"), fields=_POD_FIELDS),
    _R("", "v1", "services", "Service", True, ("svc",), ("status",)),
    _R("", "v1", "secrets", "Secret", True, fields=("type",)),
    _R("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    _R("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",), ("token",)),
    _R("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, ("pvc",), ("status",)),
    _R("", "v1", "events", "Event", True, ("ev",), fields=(
        "involvedObject.kind", "involvedObject.name", "involvedObject.namespace", "reason", "type")),
    _R("apps", "v1", "deployments", "Deployment", True, ("deploy",), ("status", "scale")),
    _R("apps", "v1", "replicasets", "ReplicaSet", True, ("rs",), ("status", "scale")),
    _R("networking.k8s.io", "v1", "ingresses", "Ingress", True, ("ing",), ("status",)),
    _R("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    _R("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    _R("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    _R("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    _R("authorization.k8s.io", "v1", "selfsubjectaccessreviews", "SelfSubjectAccessReview", False,
       verbs=("create",)),
)
NAMESPACES = RESOURCES[0]
NODES = RESOURCES[1]
_BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
_BY_NAME = {n.lower(): r for r in RESOURCES for n in (r.kind, r.plural, *r.short_names)}
IN_CATEGORY_ALL = {"pods", "services", "deployments", "replicasets"}  # `kubectl get all`
RETURNS_OBJECT_ON_DELETE = {"Namespace", "Pod", "Service"}  # the rest answer a Status Success
CLEARS_STATUS_ON_CREATE = {"Pod", "Service", "PersistentVolumeClaim", "Deployment", "ReplicaSet",
                           "Ingress"}
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            405: "MethodNotAllowed", 409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType",
            422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
            503: "ServiceUnavailable", 504: "Timeout"}
_CONFLICT = "the object has been modified; please apply your changes to the latest version and try again"
_SUBRESOURCE_VERBS = ["get", "patch", "update"]
_SUBRESOURCE_KINDS = {  # discovery of the subresources that are another kind: (kind, verbs)
    "scale": ({"group": "autoscaling", "version": "v1", "kind": "Scale"}, _SUBRESOURCE_VERBS),
    "token": ({"group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest"},
              ["create"]),
    "log": ({"kind": "Pod"}, ["get"]),
}


def resource_for(kind: str) -> Resource:
    """The resource of a kind ("Deployment"), plural ("deployments") or short name ("deploy")."""
    try:
        return _BY_NAME[kind.lower()]
    except KeyError:
        raise ValueError(f"unsupported kind {kind!r}") from None


class KubeAPIError(Exception):
    """A failed call, as kube-apiserver reports it: `status()` is the v1 Status body."""

    def __init__(self, code: int, message: str, details: dict | None = None, *,
                 reason: str | None = None):
        self.code, self.message, self.details = code, message, details
        self.reason = reason or _REASONS.get(code, "InternalError" if code >= 500 else "Unknown")
        super().__init__(f"{code} {self.reason}: {message}")

    def status(self) -> dict:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body

    def response(self) -> Response:
        headers = {"Retry-After": "1"} if self.code == 429 else None
        return JSONResponse(self.status(), self.code, headers=headers)


def _details(res: Resource, name: str) -> dict:  # StatusDetails: an empty name is omitted
    return {**({"name": name} if name else {}), **({"group": res.group} if res.group else {}),
            "kind": res.plural}


def _not_found(res: Resource, name: str) -> KubeAPIError:
    return KubeAPIError(404, f'{res.qualified} "{name}" not found', _details(res, name))


def _conflict(res: Resource, name: str, why: str = _CONFLICT) -> KubeAPIError:
    return KubeAPIError(409, f'Operation cannot be fulfilled on {res.qualified} "{name}": {why}',
                        _details(res, name))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(obj: dict) -> dict:
    return obj.setdefault("metadata", {})


def _key(obj: dict) -> tuple[str, str]:
    return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def _spec_part(obj: dict) -> dict:
    """What a generation covers: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


# --- selectors --------------------------------------------------------------------------------

def _split_terms(text: str) -> list[str]:
    """Split a selector on the commas that are not inside `in (...)` parentheses."""
    terms, depth, cur = [], 0, ""
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    return [t.strip() for t in [*terms, cur] if t.strip()]


def _parse_labels(text: str) -> list[tuple[str, str, tuple[str, ...]]]:
    reqs = []
    for term in _split_terms(text):
        if m := re.fullmatch(r"([^\s=!<>(),]+)\s+(in|notin)\s+\(([^()]*)\)", term):
            values = tuple(v.strip() for v in m[3].split(",") if v.strip())
            reqs.append((m[1], m[2], values))
        elif m := re.fullmatch(r"([^\s=!<>(),]+)\s*(==|=|!=|<|>)\s*([^\s=!<>(),]*)", term):
            reqs.append((m[1], m[2], (m[3],)))
        elif m := re.fullmatch(r"!\s*([^\s=!<>(),]+)", term):
            reqs.append((m[1], "!", ()))
        elif re.fullmatch(r"[^\s=!<>(),]+", term):
            reqs.append((term, "exists", ()))
        else:
            raise KubeAPIError(400, f"unable to parse requirement: {term!r}")
    return reqs


def _label_ok(labels: dict, key: str, op: str, values: tuple[str, ...]) -> bool:
    has, value = key in labels, labels.get(key)
    if op in ("=", "=="):
        return has and value == values[0]
    if op == "!=":
        return not has or value != values[0]
    if op == "in":
        return has and value in values
    if op == "notin":
        return not has or value not in values
    if op in ("<", ">"):
        with contextlib.suppress(TypeError, ValueError):
            return (int(value) < int(values[0])) if op == "<" else (int(value) > int(values[0]))
        return False
    return has if op == "exists" else not has


def _field_value(obj: dict, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


class _Selector:
    """Which objects of one resource a list or watch sees: scope, labels, fields."""

    def __init__(self, res: Resource, namespace: str | None, labels: str = "", fields: str = ""):
        self.res, self.namespace = res, namespace
        self.labels = _parse_labels(labels or "")
        self.fields = []
        for term in _split_terms(fields or ""):
            m = re.fullmatch(r"([^=!]+?)\s*(==|!=|=)\s*(.*)", term)
            if not m:
                raise KubeAPIError(400, f"invalid selector: '{fields}'; can't understand '{term}'")
            if m[1] not in ("metadata.name", "metadata.namespace", *res.fields):
                raise KubeAPIError(400, f'field label not supported: {m[1]}')
            self.fields.append((m[1], m[2] != "!=", m[3]))

    def matches(self, obj: dict) -> bool:
        meta = obj["metadata"]
        if self.namespace and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        return (all(_label_ok(labels, *req) for req in self.labels)
                and all((_field_value(obj, f) == v) == eq for f, eq, v in self.fields))


# --- patches ----------------------------------------------------------------------------------

_MERGE_KEYS = {"containers": "name", "initContainers": "name", "ephemeralContainers": "name",
               "env": "name", "volumes": "name", "volumeMounts": "mountPath",
               "imagePullSecrets": "name"}


def merge_patch(target: Any, patch: Any, *, strategic: bool = False) -> Any:
    """RFC 7386 JSON merge patch; `strategic` also merges the known lists (containers, env,
    volumes, ...) by their merge key and honours `$patch: delete|replace`, dropping the other
    `$` directives (as kubectl's `$setElementOrder` ones)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if strategic and patch.get("$patch") == "replace":
        return {k: v for k, v in patch.items() if not k.startswith("$")}
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        elif strategic and key in _MERGE_KEYS and isinstance(value, list) \
                and isinstance(result.get(key), list):
            result[key] = _merge_list(result[key], value, _MERGE_KEYS[key])
        else:
            result[key] = merge_patch(result.get(key), value, strategic=strategic)
    return result


def _merge_list(current: list, patch: list, merge_key: str) -> list:
    merged = copy.deepcopy(current)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            return copy.deepcopy(patch)
        index = next((i for i, c in enumerate(merged) if c.get(merge_key) == item[merge_key]), None)
        if item.get("$patch") == "delete":
            if index is not None:
                merged.pop(index)
        elif index is None:
            merged.append(merge_patch({}, item, strategic=True))
        else:
            merged[index] = merge_patch(merged[index], item, strategic=True)
    return merged


def json_patch(doc: Any, ops: list) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    doc = copy.deepcopy(doc)

    def walk(pointer: str) -> tuple[Any, str]:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
        if not parts:
            raise ValueError("the root cannot be patched")
        node = doc
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node, parts[-1]

    def read(pointer: str) -> Any:
        node, last = walk(pointer)
        return copy.deepcopy(node[int(last)] if isinstance(node, list) else node[last])

    def remove(pointer: str) -> Any:
        node, last = walk(pointer)
        return node.pop(int(last)) if isinstance(node, list) else node.pop(last)

    def add(pointer: str, value: Any) -> None:
        node, last = walk(pointer)
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), value)
        else:
            node[last] = value

    if not isinstance(ops, list):
        raise ValueError("a JSON patch is a list of operations")
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        try:
            if kind == "add":
                add(path, op["value"])
            elif kind == "remove":
                remove(path)
            elif kind == "replace":
                remove(path)
                add(path, op["value"])
            elif kind in ("move", "copy"):
                value = remove(op["from"]) if kind == "move" else read(op["from"])
                add(path, value)
            elif kind == "test":
                if read(path) != op.get("value"):
                    raise ValueError(f"testing value {path} failed")
            else:
                raise ValueError(f"unexpected kind of operation: {kind!r}")
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{kind} operation does not apply: doc is missing path: {path}") from exc
    return doc


PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json",
               "application/strategic-merge-patch+json")


def apply_patch(content_type: str, base: dict, patch: Any) -> Any:
    ctype = content_type.split(";")[0].strip()
    if ctype not in PATCH_TYPES:
        raise KubeAPIError(415, f'the body of the request was in an unknown format - accepted media '
                                f'types include: {", ".join(PATCH_TYPES)}')
    try:
        if ctype == "application/json-patch+json":
            return json_patch(base, patch)
        return merge_patch(base, patch, strategic=ctype.startswith("application/strategic"))
    except ValueError as exc:
        raise KubeAPIError(422, f"the server rejected our request due to an error in our "
                                f"request: {exc}") from exc


# --- protobuf request bodies -------------------------------------------------------------------
# kubectl >= 1.32 sends the built-in types of its typed commands (create namespace / configmap /
# secret / serviceaccount, auth can-i) as Kubernetes protobuf: "k8s\0" + runtime.Unknown
# {typeMeta, raw}. The fields below (numbers from k8s.io/api generated.proto) are decoded; other
# kinds answer 415.
_S, _B = "string", "bytes"
_META = {1: ("name", _S), 2: ("generateName", _S), 3: ("namespace", _S), 6: ("resourceVersion", _S),
         11: ("labels", ("map", _S)), 12: ("annotations", ("map", _S)), 14: ("finalizers", ("list", _S))}
_PB_SCHEMAS: dict[str, dict] = {
    "Namespace": {1: ("metadata", _META)},
    "ServiceAccount": {1: ("metadata", _META)},
    "ConfigMap": {1: ("metadata", _META), 2: ("data", ("map", _S)), 3: ("binaryData", ("map", _B)),
                  4: ("immutable", "bool")},
    "Secret": {1: ("metadata", _META), 2: ("data", ("map", _B)), 3: ("type", _S),
               4: ("stringData", ("map", _S)), 5: ("immutable", "bool")},
    "SelfSubjectAccessReview": {1: ("metadata", _META), 2: ("spec", {
        1: ("resourceAttributes", {i + 1: (f, _S) for i, f in enumerate(
            ("namespace", "verb", "group", "version", "resource", "subresource", "name"))}),
        2: ("nonResourceAttributes", {1: ("path", _S), 2: ("verb", _S)})})},
    "TokenRequest": {1: ("metadata", _META), 2: ("spec", {
        1: ("audiences", ("list", _S)), 4: ("expirationSeconds", "int"),
        3: ("boundObjectRef", {i + 1: (f, _S) for i, f in enumerate(
            ("kind", "apiVersion", "name", "uid"))})})},
}


def _pb_fields(buf: bytes) -> list[tuple[int, Any]]:
    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[i]
            value |= (byte & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if byte < 0x80:
                return value, i

    fields, i = [], 0
    while i < len(buf):
        key, i = varint(i)
        if key & 7 == 0:
            value, i = varint(i)
        elif key & 7 == 2:
            size, i = varint(i)
            value, i = buf[i:i + size], i + size
        else:
            size = 8 if key & 7 == 1 else 4
            value, i = buf[i:i + size], i + size
        fields.append((key >> 3, value))
    return fields


def _pb_decode(buf: bytes, schema: dict) -> dict:
    def scalar(kind: str, value: Any) -> Any:
        return {_S: lambda: value.decode(), _B: lambda: base64.b64encode(value).decode(),
                "bool": lambda: bool(value), "int": lambda: value, "raw": lambda: value}[kind]()

    out: dict[str, Any] = {}
    for number, value in _pb_fields(buf):
        if number not in schema:
            continue
        name, kind = schema[number]
        if isinstance(kind, dict):
            out[name] = _pb_decode(value, kind)
        elif isinstance(kind, tuple) and kind[0] == "map":
            entry = _pb_decode(value, {1: ("key", _S), 2: ("value", kind[1])})
            out.setdefault(name, {})[entry.get("key", "")] = entry.get("value", "")
        elif isinstance(kind, tuple):
            out.setdefault(name, []).append(scalar(kind[1], value))
        elif value:  # gogo-protobuf writes empty strings and false; JSON omits them
            out[name] = scalar(kind, value)
    return out


def decode_protobuf(body: bytes) -> dict:
    if not body.startswith(b"k8s\x00"):
        raise ValueError("no protobuf envelope")
    unknown = _pb_decode(body[4:], {1: ("typeMeta", {1: ("apiVersion", _S), 2: ("kind", _S)}),
                                    2: ("raw", "raw")})
    type_meta = unknown.get("typeMeta", {})
    schema = _PB_SCHEMAS.get(type_meta.get("kind", ""))
    if schema is None:
        raise KubeAPIError(415, f"the fake kube-apiserver decodes no protobuf {type_meta}: send JSON")
    return {**type_meta, **_pb_decode(unknown.get("raw", b""), schema)}


# --- controllers' view of status --------------------------------------------------------------

def scale_of(dep: dict) -> dict:
    """A Deployment or ReplicaSet as its autoscaling/v1 Scale subresource."""
    meta = dep["metadata"]
    labels = (dep.get("spec", {}).get("selector") or {}).get("matchLabels") or {}
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                              "creationTimestamp") if k in meta},
            "spec": {"replicas": dep.get("spec", {}).get("replicas", 1)},
            "status": {"replicas": dep.get("status", {}).get("replicas", 0),
                       "selector": ",".join(f"{k}={v}" for k, v in sorted(labels.items()))}}


def _age(obj: dict) -> str:
    created = datetime.strptime(obj["metadata"]["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
    s = int((datetime.now(UTC) - created.replace(tzinfo=UTC)).total_seconds())
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h" \
        if s < 172800 else f"{s // 86400}d"


def _node_ready(node: dict) -> str:
    conds = node.get("status", {}).get("conditions", [])
    return "Ready" if any(c["type"] == "Ready" and c["status"] == "True" for c in conds) \
        else "NotReady"


def _pod_phase(pod: dict) -> str:
    """The STATUS kubectl prints: Terminating, a waiting container's reason, or the phase."""
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    waiting = [(c.get("state") or {}).get("waiting", {}).get("reason")
               for c in pod.get("status", {}).get("containerStatuses", [])]
    return next((w for w in waiting if w), pod.get("status", {}).get("phase", ""))


# Server-side printing (kubectl get asks for a meta.k8s.io Table): kind -> extra columns.
_COLUMNS: dict[str, list[tuple[str, Callable[[dict], Any]]]] = {
    "Namespace": [("Status", lambda o: o.get("status", {}).get("phase", ""))],
    "Node": [("Status", _node_ready), ("Roles", lambda o: "<none>"),
             ("Version", lambda o: o.get("status", {}).get("nodeInfo", {}).get("kubeletVersion", ""))],
    "Pod": [("Ready", lambda o: "{}/{}".format(
                sum(bool(c.get("ready")) for c in o.get("status", {}).get("containerStatuses", [])),
                len(o.get("spec", {}).get("containers", [])))),
            ("Status", _pod_phase)],
    "Deployment": [("Ready", lambda o: "{}/{}".format(o.get("status", {}).get("readyReplicas", 0),
                                                      o["spec"].get("replicas", 1))),
                   ("Up-to-date", lambda o: o.get("status", {}).get("updatedReplicas", 0)),
                   ("Available", lambda o: o.get("status", {}).get("availableReplicas", 0))],
    "ReplicaSet": [("Desired", lambda o: o["spec"].get("replicas", 1)),
                   ("Current", lambda o: o.get("status", {}).get("replicas", 0)),
                   ("Ready", lambda o: o.get("status", {}).get("readyReplicas", 0))],
    "ConfigMap": [("Data", lambda o: len(o.get("data", {})) + len(o.get("binaryData", {})))],
    "Secret": [("Type", lambda o: o.get("type", "Opaque")), ("Data", lambda o: len(o.get("data", {})))],
    "Service": [("Type", lambda o: o["spec"].get("type", "")),
                ("Cluster-IP", lambda o: o["spec"].get("clusterIP", "<none>"))],
}


def _table(res: Resource, objs: list[dict], rv: str, include: str) -> dict:
    columns = [("Name", lambda o: o["metadata"]["name"]), *_COLUMNS.get(res.kind, []),
               ("Age", _age)]
    rows = []
    for obj in objs:
        row: dict[str, Any] = {"cells": [fn(obj) for _, fn in columns]}
        if include == "Object":
            row["object"] = obj
        elif include != "None":
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": obj["metadata"]}
        rows.append(row)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv},
            "columnDefinitions": [{"name": n, "type": "string", "format": "name" if n == "Name" else "",
                                   "description": n, "priority": 0} for n, _ in columns],
            "rows": rows}


# --- watch plumbing ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Event:
    rv: int
    type: str  # ADDED / MODIFIED / DELETED
    res: Resource
    obj: dict
    prev: dict | None  # the object before the change (the deleted state for DELETED)

    def seen_by(self, selector: _Selector) -> dict | None:
        """The event a watcher with `selector` receives, as the watch cache computes it."""
        if self.res != selector.res:
            return None
        now_ok = self.type != "DELETED" and selector.matches(self.obj)
        before_ok = self.prev is not None and selector.matches(self.prev)
        if now_ok:
            return {"type": "MODIFIED" if before_ok else "ADDED", "object": self.obj}
        if before_ok:
            gone = copy.deepcopy(self.prev)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            return {"type": "DELETED", "object": gone}
        return None


@dataclass(eq=False)
class _Watcher:
    selector: _Selector
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop

    def push(self, item: _Event | None) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed: the stream is gone
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class _Fault:
    count: int
    method: str | None
    path: str | None
    status: int = 0
    seconds: float = 0.0

    def take(self, method: str, path: str) -> bool:
        if self.count <= 0 or (self.method and self.method.upper() != method) \
                or (self.path and not re.search(self.path, path)):
            return False
        self.count -= 1
        return True


@dataclass(frozen=True)
class _Target:
    res: Resource
    namespace: str | None
    name: str | None
    sub: str  # "", "status" or "scale"


class FakeKubeAPIServer:
    """kube-apiserver's behaviour for tests; see the module docstring."""

    def __init__(self, *, ready_delay: float = 0.0, terminate_delay: float = 0.2,
                 token: str = "fake-token", run_images: dict[str, Any] | None = None):
        """`run_images`: image repository -> runner (kube_kubelet.py): pods using one of
        those images run as local processes; `processes` tells their pids and logs."""
        self.ready_delay, self.terminate_delay, self.token = ready_delay, terminate_delay, token
        self.run_images: dict[str, Any] = dict(run_images or {})
        self._defaults = (ready_delay, terminate_delay, dict(self.run_images))
        self.never_ready: set[tuple[str, str]] = set()
        self.bad_images: set[str] = set()  # pods using one of these stay in ImagePullBackOff
        self.requests: list[tuple[str, str, int]] = []
        self.bookmark_interval = 1.0  # seconds between BOOKMARKs when a watch allows them
        self.url = ""
        self._lock = threading.RLock()
        self._rv = 0
        self._objects: dict[Resource, dict[tuple[str, str], dict]] = {r: {} for r in RESOURCES}
        self._history: deque[_Event] = deque()
        self._compacted_rv = 0  # events up to this resourceVersion are no longer retained
        self._watchers: set[_Watcher] = set()
        self._faults: list[_Fault] = []
        self._denials: list[tuple[str, str, str, str | None, str]] = []
        self._rbac = kube_rbac.RBAC(self._stored, self._denials, lambda: self.token)
        self._timers: list[threading.Timer] = []
        self._epoch = 0  # bumped by reset(): timers of an earlier epoch do nothing
        self._controllers = Controllers(self, resource_for)  # see tests/fakes/kube_controllers.py
        self._next_ip = 1
        self.https_url = ""
        self.ca_pem = b""
        self._servers: list[tuple[uvicorn.Server, socket.socket]] = []
        self._thread: threading.Thread | None = None
        self._tls_dir = Path()
        self._handlers = {
            ("", "list"): self._list, ("", "watch"): self._watch, ("", "create"): self._create,
            ("", "deletecollection"): self._delete_collection, ("", "get"): self._get,
            ("", "update"): self._update, ("", "patch"): self._update, ("", "delete"): self._delete,
            **{(sub, verb): self._get if verb == "get" else self._update
               for sub in ("status", "scale") for verb in ("get", "update", "patch")},
            ("token", "create"): self._create_token, ("log", "get"): self._pod_log,
        }
        routes = [  # (path, handler); discovery and health are read-only
            ("/version", self._version), ("/api", self._core_versions), ("/apis", self._group_list),
            ("/api/{version}", self._resource_list), ("/apis/{group}", self._group),
            ("/apis/{group}/{version}", self._resource_list), ("/openapi/v3", self._openapi_index),
            ("/openapi/v3/{gv:path}", self._openapi_doc),
            *((p, self._health) for p in ("/healthz", "/livez", "/readyz")),
            ("/api/{version}/{rest:path}", self._resource_endpoint),
            ("/apis/{group}/{version}/{rest:path}", self._resource_endpoint),
            ("/{rest:path}", self._no_route),
        ]
        self._app = Starlette(routes=[  # with and without a trailing slash (the client asks /version/)
            Route(p, self._endpoint(handler), methods=_METHODS)
            for path, handler in routes for p in dict.fromkeys((path, path.rstrip("/") + "/"))])
        self._seed()

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeKubeAPIServer:
        """Serve on two free ports of 127.0.0.1: plain http (`url`) and https (`https_url`,
        certificate from a CA of its own, `ca_pem`), in one background thread."""
        if self._thread:
            return self
        self._tls_dir = Path(tempfile.mkdtemp(prefix="fake-kube-apiserver-"))
        self.ca_pem = _make_certificates(self._tls_dir)
        plain, tls = _listen(), _listen()
        self.url = f"http://127.0.0.1:{plain.getsockname()[1]}"
        self.https_url = f"https://127.0.0.1:{tls.getsockname()[1]}"
        common = {"log_config": None, "log_level": "warning", "access_log": False,
                  "lifespan": "off", "ws": "none", "http": "h11", "timeout_graceful_shutdown": 2}
        self._servers = [
            (uvicorn.Server(uvicorn.Config(self._app, **common)), plain),
            (uvicorn.Server(uvicorn.Config(self._app, **common,
                                           ssl_certfile=self._tls_dir / "server.pem",
                                           ssl_keyfile=self._tls_dir / "server-key.pem")), tls),
        ]

        async def serve() -> None:
            await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in self._servers))

        self._thread = threading.Thread(target=asyncio.run, args=(serve(),),
                                        name="fake-kube-apiserver", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not all(server.started for server, _ in self._servers):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the fake kube-apiserver did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if not self._thread:
            return
        self.processes.cleanup()  # outside the lock: the pods' supervisors take it
        with self._lock:
            self._cancel_timers()
            self._close_watches()
        for server, _ in self._servers:
            server.should_exit = True
        self._thread.join(10)
        shutil.rmtree(self._tls_dir, ignore_errors=True)
        self._thread, self._servers = None, []

    @property
    def processes(self) -> Any:
        """The kubelet running pods as processes (kube_kubelet.PodProcesses): `pids()`,
        `log_path()`."""
        return self._controllers.processes

    def __enter__(self) -> FakeKubeAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """A fresh cluster again (system namespaces only); no faults, denials or recorded
        requests; knobs back to the constructor's values; open watches are closed; every pod
        process is stopped."""
        self.processes.reset()  # outside the lock: the pods' supervisors take it
        with self._lock:
            self._cancel_timers()
            self._close_watches()
            for objects in self._objects.values():
                objects.clear()
            self._history.clear()
            self._compacted_rv = self._rv
            self._faults.clear()
            self._denials.clear()
            self._rbac.reset()
            self.requests.clear()
            self.never_ready.clear()
            self.bad_images.clear()
            self.ready_delay, self.terminate_delay = self._defaults[:2]
            self.run_images = dict(self._defaults[2])
            self._controllers.reset()
            self._seed()

    def _seed(self) -> None:
        for name in SYSTEM_NAMESPACES:
            self._insert(NAMESPACES, {"metadata": {"name": name}}, via_api=False)

    # --- kubeconfig ---------------------------------------------------------------------------

    def kubeconfig(self, *, namespace: str | None = None, tls: bool = False,
                   token: str | None = None) -> dict:
        """A kubeconfig for the plain http `url`, or with `tls` for `https_url` with the CA.
        kubectl (client-go) sends no credentials over plain http: give it `tls=True`.
        `token`: another identity's (`service_account_token`, `add_user`); the admin's else."""
        context = {"cluster": "fake", "user": USER, **({"namespace": namespace} if namespace else {})}
        cluster = {"server": self.https_url, "certificate-authority-data":
                   base64.b64encode(self.ca_pem).decode()} if tls else {"server": self.url}
        return {"apiVersion": "v1", "kind": "Config", "preferences": {},
                "clusters": [{"name": "fake", "cluster": cluster}],
                "users": [{"name": USER, "user": {"token": token or self.token}}],
                "contexts": [{"name": "fake", "context": context}],
                "current-context": "fake"}

    def kubeconfig_yaml(self, *, namespace: str | None = None, tls: bool = False,
                        token: str | None = None) -> str:
        return yaml.safe_dump(self.kubeconfig(namespace=namespace, tls=tls, token=token),
                              sort_keys=False)

    def write_kubeconfig(self, path: str | Path, *, namespace: str | None = None,
                         tls: bool = True, token: str | None = None) -> Path:
        """The kubeconfig as a file; https by default, since a file is what kubectl reads."""
        path = Path(path)
        path.write_text(self.kubeconfig_yaml(namespace=namespace, tls=tls, token=token))
        path.chmod(0o600)
        return path

    # --- state, bypassing the API -------------------------------------------------------------

    def create(self, obj: dict) -> dict:
        with self._lock:
            return self._insert(resource_for(obj["kind"]), copy.deepcopy(obj), via_api=False)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        res = resource_for(kind)
        with self._lock:
            obj = self._objects[res].get(self._scope(res, namespace, name))
            return copy.deepcopy(obj)

    def list(self, kind: str, namespace: str | None = None) -> list[dict]:
        res = resource_for(kind)
        with self._lock:
            return copy.deepcopy(self._select(_Selector(res, namespace)))

    def update(self, obj: dict) -> dict:
        res = resource_for(obj["kind"])
        obj = copy.deepcopy(obj)
        meta = _meta(obj)
        with self._lock:
            current = self._require(res, meta.get("namespace"), meta["name"])
            meta["resourceVersion"] = current["metadata"]["resourceVersion"]
            return self._replace(res, current, obj)

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        res = resource_for(kind)
        with self._lock:
            current = self._require(res, namespace, name)
            if res is NAMESPACES:
                self._purge_namespace(name)
            else:
                self._remove(res, current)

    def add_node(self, name: str, *, labels: dict | None = None, capacity: dict | None = None,
                 allocatable: dict | None = None, ready: bool = True) -> dict:
        """A Node as a kubelet registers it (hostname/os/arch labels added under yours)."""
        capacity = capacity or {"cpu": "8", "memory": "32Gi", "pods": "110"}
        condition = {"type": "Ready", "status": "True" if ready else "False",
                     "reason": "KubeletReady" if ready else "KubeletNotReady",
                     "message": "kubelet is posting ready status" if ready else "kubelet stopped",
                     "lastHeartbeatTime": _now(), "lastTransitionTime": _now()}
        return self.create({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                                  "kubernetes.io/os": "linux",
                                                  "kubernetes.io/arch": "amd64", **(labels or {})}},
            "spec": {},
            "status": {"capacity": capacity, "allocatable": allocatable or dict(capacity),
                       "conditions": [condition],
                       "addresses": [{"type": "Hostname", "address": name}],
                       "nodeInfo": {"kubeletVersion": "v1.32.0", "architecture": "amd64",
                                    "operatingSystem": "linux"}}})

    def set_pod_ready(self, namespace: str, name: str, ready: bool) -> dict:
        """What the kubelet reports for a running pod whose containers are (not) ready."""
        flag, now = "True" if ready else "False", _now()
        res = resource_for("Pod")
        with self._lock:
            current = self._require(res, namespace, name)
            pod = copy.deepcopy(current)
            status = pod.setdefault("status", {})
            status["phase"] = "Running"
            status.setdefault("startTime", now)
            status["conditions"] = [{"type": t, "status": s, "lastTransitionTime": now}
                                    for t, s in (("PodScheduled", "True"), ("Initialized", "True"),
                                                 ("ContainersReady", flag), ("Ready", flag))]
            status["containerStatuses"] = [
                {"name": c["name"], "image": c.get("image", ""), "ready": ready, "started": True,
                 "imageID": f"fake://{c.get('image', '')}", "containerID": f"fake://{uuid.uuid4().hex}",
                 "restartCount": 0, "state": {"running": {"startedAt": now}}}
                for c in pod.get("spec", {}).get("containers", [])]
            return self._replace(res, current, pod)

    # --- behaviour knobs ----------------------------------------------------------------------

    def deny(self, verb: str, resource: str, *, group: str = "", namespace: str | None = None,
             subresource: str = "") -> None:
        """SelfSubjectAccessReviews answer allowed=false for this, and matching requests get 403.
        `verb`/`resource`/`group` may be "*"; namespace None means every namespace. Applies to
        the admin token only. While any denial is in effect the admin also lacks the verbs
        escalate, bind, impersonate and "*", so it cannot create or bind a Role granting what
        it was denied (see kube_rbac)."""
        with self._lock:
            self._denials.append((verb, resource, group, namespace, subresource))

    def service_account_token(self, namespace: str, name: str, *,
                              expiration_seconds: int = 3600,
                              audiences: list[str] | None = None) -> str:
        """A bound token of a ServiceAccount, as the TokenRequest API issues it (KubeAPIError
        404 when the ServiceAccount does not exist). It authenticates as
        system:serviceaccount:<namespace>:<name>, whose permissions come from RBAC objects only,
        until it expires or the ServiceAccount is deleted."""
        with self._lock:
            account = self._objects[resource_for("ServiceAccount")].get((namespace, name))
            spec = {"expirationSeconds": expiration_seconds, "audiences": audiences}
            answer = self._rbac.token_request(account, {"spec": spec}, namespace, name)
        return answer["status"]["token"]

    def add_user(self, token: str, name: str, groups: list[str] | tuple[str, ...] = ()) -> None:
        """A bearer token for user `name` in `groups` (plus system:authenticated), authorized by
        RBAC objects only; the group system:masters may do anything. reset() forgets it."""
        with self._lock:
            self._rbac.add_user(token, name, groups)

    def _stored(self, kind: str) -> list[dict]:
        return list(self._objects[resource_for(kind)].values())

    def fail_next(self, count: int, *, status: int = 500, method: str | None = None,
                  path: str | None = None) -> None:
        with self._lock:
            self._faults.append(_Fault(count, method, path, status=status))

    def slow_next(self, count: int, seconds: float, *, method: str | None = None,
                  path: str | None = None) -> None:
        with self._lock:
            self._faults.append(_Fault(count, method, path, seconds=seconds))

    def compact(self) -> None:
        """Forget the watch history, as an etcd compaction does: every watch that resumes from
        an earlier resourceVersion gets 410 Expired."""
        with self._lock:
            self._history.clear()
            self._compacted_rv = self._rv

    # --- the store ----------------------------------------------------------------------------

    def _scope(self, res: Resource, namespace: str | None, name: str) -> tuple[str, str]:
        return ((namespace or "default") if res.namespaced else ""), name

    def _require(self, res: Resource, namespace: str | None, name: str) -> dict:
        obj = self._objects[res].get(self._scope(res, namespace, name))
        if obj is None:
            raise _not_found(res, name)
        return obj

    def _select(self, selector: _Selector) -> list[dict]:
        objs = self._objects[selector.res]
        return [objs[k] for k in sorted(objs) if selector.matches(objs[k])]

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _emit(self, kind: str, res: Resource, obj: dict, prev: dict | None) -> None:
        event = _Event(int(obj["metadata"]["resourceVersion"]), kind, res, copy.deepcopy(obj),
                       copy.deepcopy(prev))
        self._history.append(event)
        while len(self._history) > HISTORY_LIMIT:
            self._compacted_rv = self._history.popleft().rv
        for watcher in self._watchers:
            if watcher.selector.res == res:
                watcher.push(event)
        self._controllers.observe(kind, res, obj, prev)  # they act before the write returns

    def _default(self, res: Resource, obj: dict) -> None:
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        if res.kind == "Deployment":
            default_deployment(obj)
        elif res.kind == "ReplicaSet":
            obj.setdefault("spec", {}).setdefault("replicas", 1)
        elif res.kind == "Secret":  # stringData is write-only: merged into data
            obj.setdefault("type", "Opaque")
            obj["data"] = {**(obj.get("data") or {}), **{
                k: base64.b64encode(v.encode()).decode() for k, v in obj.pop("stringData", {}).items()}}
        elif res.kind == "Service":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            if spec["type"] != "ExternalName" and "clusterIP" not in spec:
                spec["clusterIP"] = f"10.96.{self._next_ip // 250}.{self._next_ip % 250 + 1}"
                self._next_ip += 1
            if spec.get("clusterIP") and not spec.get("clusterIPs"):  # as the registry fills it
                spec["clusterIPs"] = [spec["clusterIP"]]

    def _insert(self, res: Resource, obj: dict, *, via_api: bool, dry_run: bool = False) -> dict:
        meta = _meta(obj)
        if res.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        if _key(obj) in self._objects[res]:
            raise KubeAPIError(409, f'{res.qualified} "{meta["name"]}" already exists',
                               _details(res, meta["name"]), reason="AlreadyExists")
        self._default(res, obj)
        for server_owned in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(server_owned, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        if via_api and res.kind in CLEARS_STATUS_ON_CREATE:
            obj["status"] = {}
        if res.kind in ("Pod", "PersistentVolumeClaim"):
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        elif res.kind == "Namespace":
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj["status"] = {"phase": "Active"}
        if dry_run:
            return obj
        meta["resourceVersion"] = self._next_rv()
        self._objects[res][_key(obj)] = obj
        self._emit("ADDED", res, obj, None)
        return copy.deepcopy(self._objects[res].get(_key(obj), obj))  # with what controllers did

    def _replace(self, res: Resource, old: dict, new: dict, *, dry_run: bool = False) -> dict:
        """Store `new` in place of `old`: server-owned metadata kept, resourceVersion bumped,
        generation bumped on a spec change; a write that changes nothing changes nothing."""
        meta, old_meta = _meta(new), old["metadata"]
        for field in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                      "generation", "resourceVersion"):
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        if res.kind == "Service" and "clusterIP" in old.get("spec", {}):
            new.setdefault("spec", {}).setdefault("clusterIP", old["spec"]["clusterIP"])
        self._default(res, new)
        if new == old:
            return copy.deepcopy(old)
        spec_changed = _spec_part(new) != _spec_part(old)
        if spec_changed:
            meta["generation"] = old_meta.get("generation", 1) + 1
        if dry_run:
            return new
        if meta.get("deletionTimestamp") and not meta.get("finalizers") \
                and not (res is NAMESPACES and (new.get("spec") or {}).get("finalizers")):
            self._remove(res, old)
            return new
        self._put(res, new, old)
        return copy.deepcopy(self._objects[res].get(_key(new), new))  # with what controllers did

    def _put(self, res: Resource, new: dict, old: dict) -> None:
        new["metadata"]["resourceVersion"] = self._next_rv()
        self._objects[res][_key(new)] = new
        self._emit("MODIFIED", res, new, old)

    def _remove(self, res: Resource, obj: dict) -> dict:
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = self._next_rv()
        del self._objects[res][_key(obj)]
        self._emit("DELETED", res, gone, obj)
        return gone

    # --- controllers (timers) -----------------------------------------------------------------

    def _later(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        epoch = self._epoch

        def fire() -> None:
            with self._lock:
                if self._epoch == epoch:
                    fn(*args)

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()

    def _cancel_timers(self) -> None:
        self._epoch += 1
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def _purge_namespace(self, name: str) -> None:
        """Everything in the namespace, then the namespace, at once (no controller reacts)."""
        with self._controllers.suspended():
            for res in RESOURCES:
                if res.namespaced:
                    for key in [k for k in self._objects[res] if k[0] == name]:
                        self._remove(res, self._objects[res][key])
            if ns := self._objects[NAMESPACES].get(("", name)):
                self._remove(NAMESPACES, ns)

    def _close_watches(self) -> None:
        for watcher in self._watchers:
            watcher.push(None)
        self._watchers.clear()

    # --- HTTP: the pipeline every request goes through ----------------------------------------

    def _endpoint(self, handler: Callable[..., Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            path = request.url.path
            full = path + (f"?{request.url.query}" if request.url.query else "")
            try:
                with self._lock:  # at most one slow and one failing fault per request
                    slow = next((f for f in self._faults if f.seconds and f.take(request.method, path)), None)
                    fail = next((f for f in self._faults if f.status and f.take(request.method, path)), None)
                if slow:
                    await asyncio.sleep(slow.seconds)
                if fail:
                    why = _CONFLICT if fail.status == 409 else f"injected fault ({fail.status})"
                    raise KubeAPIError(fail.status, why)
                self._authenticate(request)
                if request.method != "GET" and handler != self._resource_endpoint:
                    raise KubeAPIError(405, "the server does not allow this method on the "
                                            "requested resource")
                response = await handler(request)
            except KubeAPIError as exc:
                response = exc.response()
            except Exception as exc:  # a bug in the fake: say so, as the real server would
                log.exception("fake kube-apiserver failed on %s %s", request.method, full)
                response = KubeAPIError(500, f"fake kube-apiserver: {exc!r}").response()
            with self._lock:
                self.requests.append((request.method, full, response.status_code))
            return response

        return endpoint

    def _authenticate(self, request: Request) -> None:
        """The identity of the bearer token (kube_rbac) goes to request.state.identity."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        with self._lock:
            who = self._rbac.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if who is None:
            raise KubeAPIError(401, "Unauthorized")
        request.state.identity = who

    def _authorize(self, request: Request, verb: str, t: _Target) -> None:
        if t.res.kind == "SelfSubjectAccessReview":  # everyone may ask (system:basic-user)
            return
        namespace = t.name if t.res is NAMESPACES and t.name else (t.namespace or "")
        who = request.state.identity
        with self._lock:
            allowed, reason = self._rbac.authorize(who, kube_rbac.Attributes(
                verb, t.res.group, t.res.plural, t.sub, namespace, t.name or ""))
        if allowed:
            return
        resource = f"{t.res.plural}/{t.sub}" if t.sub else t.res.plural
        what = f'{t.res.qualified} "{t.name}"' if t.name else t.res.qualified
        where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        raise KubeAPIError(403, f'{what} is forbidden: User "{who.user}" cannot {verb} resource '
                                f'"{resource}" in API group "{t.res.group}" {where}'
                                + (f": {reason}" if reason else ""),
                           _details(t.res, t.name or ""))

    def _denied(self, verb: str, resource: str, group: str, namespace: str, sub: str) -> bool:
        with self._lock:
            return any(v in ("*", verb) and r in ("*", resource) and g in ("*", group)
                       and (ns is None or ns == namespace) and s == sub
                       for v, r, g, ns, s in self._denials)

    # --- HTTP: discovery ----------------------------------------------------------------------

    async def _version(self, request: Request) -> Response:
        return JSONResponse({"major": "1", "minor": "32", "gitVersion": "v1.32.0-fake",
                             "gitCommit": "0" * 40, "gitTreeState": "clean",
                             "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23.0",
                             "compiler": "gc", "platform": "linux/amd64"})

    async def _health(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def _core_versions(self, request: Request) -> Response:
        return JSONResponse({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs":
                             [{"clientCIDR": "0.0.0.0/0", "serverAddress": request.url.netloc}]})

    @staticmethod
    def _group_doc(group: str) -> dict:
        version = {"groupVersion": f"{group}/v1", "version": "v1"}
        return {"name": group, "versions": [version], "preferredVersion": version}

    async def _group_list(self, request: Request) -> Response:
        groups = dict.fromkeys(r.group for r in RESOURCES if r.group)
        return JSONResponse({"kind": "APIGroupList", "apiVersion": "v1",
                             "groups": [self._group_doc(g) for g in groups]})

    async def _group(self, request: Request) -> Response:
        group = request.path_params["group"]
        if not any(r.group == group for r in RESOURCES):
            raise KubeAPIError(404, "the server could not find the requested resource")
        return JSONResponse({"kind": "APIGroup", "apiVersion": "v1", **self._group_doc(group)})

    async def _resource_list(self, request: Request) -> Response:
        group, version = request.path_params.get("group", ""), request.path_params["version"]
        found = [r for r in RESOURCES if (r.group, r.version) == (group, version)]
        if not found:
            raise KubeAPIError(404, "the server could not find the requested resource")
        entries = []
        for r in found:
            entries.append({"name": r.plural, "singularName": r.kind.lower(), "namespaced": r.namespaced,
                            "kind": r.kind, "verbs": list(r.verbs),
                            **({"categories": ["all"]} if r.plural in IN_CATEGORY_ALL else {}),
                            **({"shortNames": list(r.short_names)} if r.short_names else {})})
            for sub in r.subresources:
                kind, verbs = _SUBRESOURCE_KINDS.get(sub, ({"kind": r.kind}, _SUBRESOURCE_VERBS))
                entries.append({"name": f"{r.plural}/{sub}", "singularName": "",
                                "namespaced": r.namespaced, **kind, "verbs": verbs})
        return JSONResponse({"kind": "APIResourceList", "apiVersion": "v1",
                             "groupVersion": found[0].api_version, "resources": entries})

    async def _openapi_index(self, request: Request) -> Response:
        """Just enough OpenAPI v3 for kubectl to see that server-side field validation exists
        (otherwise `kubectl create -f` / `apply -f` insist on downloading /openapi/v2)."""
        gvs = dict.fromkeys(("api/v1" if not r.group else f"apis/{r.group}/{r.version}")
                            for r in RESOURCES)
        return JSONResponse({"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash=fake"}
                                       for gv in gvs}})

    async def _openapi_doc(self, request: Request) -> Response:
        gv = request.path_params["gv"]
        found = [r for r in RESOURCES if gv == ("api/v1" if not r.group else f"apis/{r.group}/{r.version}")]
        if not found:
            raise KubeAPIError(404, "the server could not find the requested resource")
        params = [{"name": p, "in": "query", "schema": {"type": "string"}}
                  for p in ("dryRun", "fieldManager", "fieldValidation")]
        paths = {}
        for r in found:
            scope = "/namespaces/{namespace}" if r.namespaced else ""
            gvk = {"group": r.group, "version": r.version, "kind": r.kind}
            paths[f"/{gv}{scope}/{r.plural}/{{name}}"] = {"patch": {
                "x-kubernetes-group-version-kind": gvk, "parameters": params}}
            paths[f"/{gv}{scope}/{r.plural}"] = {"post": {
                "x-kubernetes-group-version-kind": gvk, "parameters": params}}
        return JSONResponse({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"},
                             "paths": paths, "components": {"schemas": {}}})

    async def _no_route(self, request: Request) -> Response:
        raise KubeAPIError(404, "the server could not find the requested resource")

    # --- HTTP: resources ----------------------------------------------------------------------

    def _resolve(self, group: str, version: str, rest: str) -> _Target:
        parts = [p for p in rest.split("/") if p]
        namespace = None
        if len(parts) >= 3 and parts[0] == "namespaces" and (group, version, parts[2]) in _BY_PATH:
            namespace, parts = parts[1], parts[2:]
        res = _BY_PATH.get((group, version, parts[0])) if parts else None
        if res is None or len(parts) > 3 or (namespace and not res.namespaced) \
                or (len(parts) > 1 and res.namespaced and not namespace) \
                or (len(parts) == 3 and parts[2] not in res.subresources):
            raise KubeAPIError(404, "the server could not find the requested resource")
        return _Target(res, namespace, parts[1] if len(parts) > 1 else None,
                       parts[2] if len(parts) > 2 else "")

    async def _resource_endpoint(self, request: Request) -> Response:
        p = request.path_params
        t = self._resolve(p.get("group", ""), p["version"], p["rest"])
        watching = _flag(request, "watch")
        verb = {"GET": "get" if t.name else "watch" if watching else "list", "POST": "create",
                "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if t.name else "deletecollection"}.get(request.method, "")
        handler = self._handlers.get((t.sub, verb))
        if handler is None or (not t.sub and verb not in t.res.verbs) \
                or (verb == "create" and t.res.namespaced and not t.namespace) \
                or (t.name is None) != (verb in ("list", "watch", "create", "deletecollection")
                                        and not t.sub):
            raise KubeAPIError(405, "the server does not allow this method on the requested resource")
        self._authorize(request, verb, t)
        return await handler(request, t)

    @staticmethod
    async def _body(request: Request) -> Any:
        raw = await request.body()
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if not raw:
            return None
        if ctype.endswith("yaml"):
            return yaml.safe_load(raw)
        if ctype == "application/vnd.kubernetes.protobuf":
            return decode_protobuf(raw)
        if ctype != "application/json" and ctype not in PATCH_TYPES:
            raise KubeAPIError(415, 'the body of the request was in an unknown format - accepted '
                                    'media types include: application/json, application/yaml')
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise KubeAPIError(400, f"couldn't get version/kind; json parse error: {exc}") from exc

    @staticmethod
    def _check_identity(t: _Target, body: Any, kind: str) -> None:
        if not isinstance(body, dict):
            raise KubeAPIError(400, "the body of the request must be a JSON object")
        meta = body.get("metadata") or {}
        if body.get("kind") not in (None, "", kind):
            raise KubeAPIError(400, f"the API version in the data ({body.get('apiVersion')}) "
                                    f"and kind ({body.get('kind')}) do not match {kind}")
        if t.name and meta.get("name") not in (None, t.name):
            raise KubeAPIError(400, f"the name of the object ({meta['name']}) does not match the "
                                    f"name on the URL ({t.name})")
        if t.namespace and meta.get("namespace") not in (None, "", t.namespace):
            raise KubeAPIError(400, "the namespace of the provided object does not match the "
                                    "namespace sent on the request")

    def _respond(self, request: Request, res: Resource, objs: list[dict], rv: str,
                 single: bool, code: int = 200) -> Response:
        if "as=Table" in request.headers.get("accept", ""):
            include = request.query_params.get("includeObject", "Metadata")
            return JSONResponse(_table(res, objs, rv, include), code)
        if single:
            return JSONResponse(objs[0], code)
        items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in objs]
        return JSONResponse({"kind": f"{res.kind}List", "apiVersion": res.api_version,
                             "metadata": {"resourceVersion": rv}, "items": items}, code)

    async def _get(self, request: Request, t: _Target) -> Response:
        with self._lock:
            obj = copy.deepcopy(self._require(t.res, t.namespace, t.name))
        if t.sub == "scale":
            return JSONResponse(scale_of(obj))
        return self._respond(request, t.res, [obj], obj["metadata"]["resourceVersion"], True)

    def _selector(self, request: Request, t: _Target) -> _Selector:
        q = request.query_params
        return _Selector(t.res, t.namespace, q.get("labelSelector", ""), q.get("fieldSelector", ""))

    async def _list(self, request: Request, t: _Target) -> Response:
        selector = self._selector(request, t)
        with self._lock:
            objs, rv = copy.deepcopy(self._select(selector)), str(self._rv)
        return self._respond(request, t.res, objs, rv, False)

    async def _create(self, request: Request, t: _Target) -> Response:
        body = await self._body(request)
        self._check_identity(t, body, t.res.kind)
        if t.res.kind == "SelfSubjectAccessReview":
            return self._review(body, request.state.identity)
        meta = _meta(body)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        self._validate_name(t.res, meta.get("name", ""))
        if t.namespace:
            meta["namespace"] = t.namespace
        with self._lock:
            if t.namespace:
                self._check_namespace_open(t.res, t.namespace, meta["name"])
            self._admit(request, t, body, None)
            obj = self._insert(t.res, body, via_api=True, dry_run=_dry_run(request))
        return JSONResponse(obj, 201)

    @staticmethod
    def _validate_name(res: Resource, name: str) -> None:
        if res.kind in ("Namespace", "Service"):
            pattern, what = _DNS_LABEL, "a lowercase RFC 1123 label"
        elif res.group == "rbac.authorization.k8s.io":
            pattern, what = re.compile(r"[^/%]+"), "a path segment name"
        else:
            pattern, what = _DNS_SUBDOMAIN, "a lowercase RFC 1123 subdomain"
        if not name:
            cause = {"reason": "FieldValueRequired", "field": "metadata.name",
                     "message": "Required value: name or generateName is required"}
        elif not pattern.fullmatch(name) or name in (".", ".."):
            cause = {"reason": "FieldValueInvalid", "field": "metadata.name",
                     "message": f'Invalid value: "{name}": must be {what}'}
        else:
            return
        raise KubeAPIError(422, f'{res.kind} "{name}" is invalid: metadata.name: '
                                f'{cause["message"]}',
                           {"name": name, **({"group": res.group} if res.group else {}),
                            "kind": res.kind, "causes": [cause]})

    def _check_namespace_open(self, res: Resource, namespace: str, name: str) -> None:
        ns = self._objects[NAMESPACES].get(("", namespace))
        if ns is None:
            raise _not_found(NAMESPACES, namespace)
        if ns["metadata"].get("deletionTimestamp"):
            raise KubeAPIError(403, f'{res.qualified} "{name}" is forbidden: unable to create new '
                                    f'content in namespace {namespace} because it is being terminated',
                               {**_details(res, name), "causes": [{
                                   "reason": "NamespaceTerminating", "field": "metadata.namespace",
                                   "message": f"namespace {namespace} is being terminated"}]})

    def _review(self, body: dict, who: kube_rbac.Identity) -> Response:
        with self._lock:
            allowed, reason = self._rbac.review(who, body.get("spec") or {})
        body.update(apiVersion="authorization.k8s.io/v1", kind="SelfSubjectAccessReview")
        _meta(body)["creationTimestamp"] = None
        # RBAC gives a reason for an allow; a denial has one only when rule resolution failed
        body["status"] = {"allowed": allowed, **({"reason": reason} if reason else {})}
        return JSONResponse(body, 201)

    async def _update(self, request: Request, t: _Target) -> Response:
        """PUT or PATCH of an object, its status or its scale."""
        if request.method == "PATCH" and kube_apply.check_patch_options(
                request.headers.get("content-type", ""), request.query_params):
            return await self._server_side_apply(request, t)
        body = await self._body(request)
        with self._lock:
            current = self._require(t.res, t.namespace, t.name)
            base = scale_of(current) if t.sub == "scale" else current
            if request.method == "PATCH":
                desired = apply_patch(request.headers.get("content-type", ""), base, body)
            else:
                desired = body
            self._check_identity(t, desired, "Scale" if t.sub == "scale" else t.res.kind)
            wanted_rv = (desired.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
                raise _conflict(t.res, t.name)
            new = copy.deepcopy(current)
            if t.sub == "scale":
                new["spec"]["replicas"] = (desired.get("spec") or {}).get("replicas", 0)
            elif t.sub == "status":
                new["status"] = desired.get("status") or {}
            else:
                new = copy.deepcopy(desired)
                if "status" in t.res.subresources:  # the main resource ignores status
                    new.pop("status", None)
                    if "status" in current:
                        new["status"] = copy.deepcopy(current["status"])
            self._admit(request, t, new, current)
            result = self._replace(t.res, current, new, dry_run=_dry_run(request))
        return JSONResponse(scale_of(result) if t.sub == "scale" else result)

    async def _server_side_apply(self, request: Request, t: _Target) -> Response:
        """PATCH application/apply-patch+yaml of an object or its status (kube_apply); creates
        a missing object (201)."""
        if t.sub not in ("", "status"):
            raise KubeAPIError(415, "the fake kube-apiserver applies no Scale: use a merge patch")
        config = await self._body(request)
        self._check_identity(t, config, t.res.kind)
        meta = _meta(config)
        with self._lock:
            live = self._objects[t.res].get(self._scope(t.res, t.namespace, t.name))
            if live is None and t.sub:
                raise _not_found(t.res, t.name)
            wanted_rv = meta.get("resourceVersion")
            if live is not None and wanted_rv and wanted_rv != live["metadata"]["resourceVersion"]:
                raise _conflict(t.res, t.name)
            meta.setdefault("name", t.name)
            if t.namespace:
                meta.setdefault("namespace", t.namespace)
            new = kube_apply.apply(t.res.kind, t.res.api_version, live, config,
                                   request.query_params["fieldManager"], _flag(request, "force"),
                                   t.sub, "status" in t.res.subresources)
            self._admit(request, t, new, live, track=False)
            if live is not None:
                return JSONResponse(self._replace(t.res, live, new, dry_run=_dry_run(request)))
            self._validate_name(t.res, t.name)
            if t.namespace:
                self._check_namespace_open(t.res, t.namespace, t.name)
            return JSONResponse(self._insert(t.res, new, via_api=True, dry_run=_dry_run(request)),
                                201)

    def _admit(self, request: Request, t: _Target, new: dict, old: dict | None, *,
               track: bool = True) -> None:
        """What the handler and the registry do to a write before it is stored (under the
        lock): managedFields of a non-apply write (kube_apply), RBAC escalation prevention
        (kube_rbac), immutable fields (kube_validation)."""
        if track:
            manager = kube_apply.manager_of(request.query_params.get("fieldManager"),
                                            request.headers.get("user-agent", ""))
            kube_apply.track_update(t.res.kind, t.res.api_version, old, new, manager, t.sub,
                                    "status" in t.res.subresources)
        self._rbac.check_write(request.state.identity, t.res.kind, t.namespace or "", t.name,
                               new, old)
        if old is not None:
            kube_validation.check_update(t.res.kind, new, old)

    async def _create_token(self, request: Request, t: _Target) -> Response:
        """The TokenRequest subresource of a ServiceAccount (`kubectl create token`)."""
        body = await self._body(request) or {}
        with self._lock:
            account = self._objects[t.res].get(self._scope(t.res, t.namespace, t.name))
            answer = self._rbac.token_request(account, body, t.namespace or "", t.name or "")
        return JSONResponse(answer, 201)

    async def _delete(self, request: Request, t: _Target) -> Response:
        options = await self._body(request) or {}
        policy = request.query_params.get("propagationPolicy") or options.get("propagationPolicy")
        if policy not in (None, "Orphan", "Background", "Foreground"):
            raise KubeAPIError(400, f"DeleteOptions.meta.k8s.io \"\" is invalid: propagationPolicy: "
                                    f"Unsupported value: \"{policy}\"")
        with self._lock:
            obj = self._require(t.res, t.namespace, t.name)
            meta = obj["metadata"]
            pre = options.get("preconditions") or {}
            for field in ("uid", "resourceVersion"):
                if pre.get(field) and pre[field] != meta.get(field):
                    raise _conflict(t.res, t.name, f"Precondition failed: {field} in precondition: "
                                                   f"{pre[field]}, {field} in object meta: {meta.get(field)}")
            if _dry_run(request):
                return self._deleted_response(t.res, obj)
            if t.res is NAMESPACES:
                if t.name in PROTECTED_NAMESPACES:
                    raise KubeAPIError(403, f'namespaces "{t.name}" is forbidden: this namespace '
                                            'may not be deleted', _details(t.res, t.name))
                if meta.get("deletionTimestamp"):
                    raise _conflict(t.res, t.name, "The system is ensuring all content is removed "
                                    "from this namespace.  Upon completion, this namespace will "
                                    "automatically be purged by the system.")
                new = copy.deepcopy(obj)
                new["metadata"]["deletionTimestamp"] = _now()
                new.setdefault("status", {})["phase"] = "Terminating"
                self._put(t.res, new, obj)  # the namespace controller takes it from here
                return JSONResponse(copy.deepcopy(new))
            if meta.get("finalizers"):
                new = copy.deepcopy(obj)
                new["metadata"].setdefault("deletionTimestamp", _now())
                if new != obj:
                    self._put(t.res, new, obj)
                return JSONResponse(copy.deepcopy(new))
            if policy == "Orphan" or options.get("orphanDependents") is True:
                obj = self._controllers.gc.orphan(t.res, obj)  # else the GC deletes them
            return self._deleted_response(t.res, self._remove(t.res, obj))

    async def _pod_log(self, request: Request, t: _Target) -> Response:
        """pods/log of a pod run as processes (container, previous, tailLines); a pod the
        timer kubelet runs has an empty log."""
        q = request.query_params
        with self._lock:
            pod = copy.deepcopy(self._require(t.res, t.namespace, t.name))
        names = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        container = q.get("container") or (names[0] if len(names) == 1 else None)
        if container is None:
            raise KubeAPIError(400, f"a container name must be specified for pod {t.name}, "
                                    f"choose one of: [{' '.join(names)}]")
        if container not in names:
            raise KubeAPIError(400, f"container {container} is not valid for pod {t.name}")
        previous = _flag(request, "previous")
        path = self.processes.log_path(t.namespace, t.name, container, previous=previous)
        if path is None and previous:
            raise KubeAPIError(400, f'previous terminated container "{container}" in pod '
                                    f'"{t.name}" not found')
        text = path.read_text(errors="replace") if path is not None and path.exists() else ""
        if q.get("tailLines", "").isdigit():
            lines = text.splitlines(keepends=True)
            text = "".join(lines[len(lines) - int(q["tailLines"]):]) if int(q["tailLines"]) \
                else ""
        return PlainTextResponse(text)

    @staticmethod
    def _deleted_response(res: Resource, obj: dict) -> Response:
        if res.kind in RETURNS_OBJECT_ON_DELETE:
            return JSONResponse(obj)
        meta = obj["metadata"]
        return JSONResponse({"kind": "Status", "apiVersion": "v1", "metadata": {},
                             "status": "Success",
                             "details": {**_details(res, meta["name"]), "uid": meta["uid"]}})

    async def _delete_collection(self, request: Request, t: _Target) -> Response:
        selector = self._selector(request, t)
        with self._lock:
            gone = []
            for obj in self._select(selector):
                if self._objects[t.res].get(_key(obj)) is not obj:
                    continue  # the garbage collector took it meanwhile
                if obj["metadata"].get("finalizers"):  # marked; it stays until they are removed
                    self._controllers.store.delete(t.res, obj)
                    gone.append(copy.deepcopy(self._objects[t.res][_key(obj)]))
                else:
                    gone.append(self._remove(t.res, obj))
            rv = str(self._rv)
        return self._respond(request, t.res, gone, rv, False)

    async def _watch(self, request: Request, t: _Target) -> Response:
        q = request.query_params
        selector = self._selector(request, t)
        since = q.get("resourceVersion", "")
        timeout = float(q.get("timeoutSeconds") or 1800)
        bookmarks = _flag(request, "allowWatchBookmarks")
        watcher = _Watcher(selector, asyncio.Queue(), asyncio.get_running_loop())
        with self._lock:
            if since in ("", "0") or _flag(request, "sendInitialEvents"):
                initial = [{"type": "ADDED", "object": o} for o in copy.deepcopy(self._select(selector))]
                if _flag(request, "sendInitialEvents") and bookmarks:
                    initial.append(self._bookmark(t.res, initial_end=True))
            else:
                if not since.isdigit():
                    raise KubeAPIError(400, f'invalid resource version: "{since}"')
                if int(since) < self._compacted_rv:
                    oldest = self._history[0].rv if self._history else self._rv + 1
                    gone = KubeAPIError(410, f"too old resource version: {since} ({oldest - 1})")
                    stream = self._stream(watcher, [{"type": "ERROR", "object": gone.status()}], 0, False)
                    return StreamingResponse(stream, media_type="application/json")
                initial = [seen for e in self._history if e.rv > int(since)
                           if (seen := e.seen_by(selector))]
            self._watchers.add(watcher)
        deadline = time.monotonic() + timeout
        return StreamingResponse(self._stream(watcher, initial, deadline, bookmarks),
                                 media_type="application/json")

    def _bookmark(self, res: Resource, *, initial_end: bool = False) -> dict:
        meta: dict[str, Any] = {"resourceVersion": str(self._rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {"type": "BOOKMARK", "object": {"kind": res.kind, "apiVersion": res.api_version,
                                               "metadata": meta}}

    async def _stream(self, watcher: _Watcher, initial: list[dict], deadline: float,
                      bookmarks: bool) -> AsyncIterator[bytes]:
        """Newline-delimited watch events until the deadline, stop()/reset() or disconnect."""
        try:
            for event in initial:
                yield _line(event)
            while (left := deadline - time.monotonic()) > 0:
                wait = min(left, self.bookmark_interval) if bookmarks else left
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    if bookmarks and deadline - time.monotonic() > 0:
                        with self._lock:
                            bookmark = self._bookmark(watcher.selector.res)
                        yield _line(bookmark)
                    continue
                if item is None:
                    return
                if seen := item.seen_by(watcher.selector):
                    yield _line(seen)
        finally:
            with self._lock:
                self._watchers.discard(watcher)


def _listen() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _make_certificates(directory: Path) -> bytes:
    """A CA of its own and a server certificate for 127.0.0.1 / localhost signed by it;
    returns the CA certificate (PEM)."""
    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
             signer: ec.EllipticCurvePrivateKey, extensions: list) -> x509.Certificate:
        now = datetime.now(UTC)
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=2)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("fake-kube-apiserver-ca", ca_key, "fake-kube-apiserver-ca", ca_key,
              [(x509.BasicConstraints(ca=True, path_length=None), True)])
    server = cert("kube-apiserver", key, "fake-kube-apiserver-ca", ca_key, [
        (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                      x509.DNSName("localhost")]), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    (directory / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (directory / "server-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return ca.public_bytes(serialization.Encoding.PEM)


def _line(event: dict) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


def _flag(request: Request, name: str) -> bool:  # Go's strconv.ParseBool
    return request.query_params.get(name, "") in ("1", "t", "T", "true", "True", "TRUE")


def _dry_run(request: Request) -> bool:
    return "All" in request.query_params.getlist("dryRun")
