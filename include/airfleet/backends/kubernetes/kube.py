"""Apply semantics over the ``kubernetes`` client: read, compare, server-side apply.

:class:`Kube` wraps the ``ApiClient`` the plugin layer builds from the cncf-kubernetes
provider's hook. It reaches every kind Airfleet manages through the typed APIs' uniform method
names (``read_namespaced_config_map``, ...), reads raw JSON (no model round trip that could
drop fields), and retries what a retry can fix: 429, 5xx and slow or broken connections.

Objects are written with server-side apply under the field manager ``airfleet`` (forcing
conflicts on the fields we apply: they are ours). The API server then removes a field we
applied before and no longer apply (an Ingress class, an ``imagePullSecrets`` entry), which a
merge patch never does, and leaves alone the fields other managers own. An apply is
idempotent, so a retried request is safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from airfleet.errors import AirfleetError

log = logging.getLogger(__name__)

# kind -> (typed API class, method suffix, namespaced, API group, resource)
KINDS: dict[str, tuple[type, str, bool, str, str]] = {
    "Namespace": (client.CoreV1Api, "namespace", False, "", "namespaces"),
    "Node": (client.CoreV1Api, "node", False, "", "nodes"),
    "Secret": (client.CoreV1Api, "secret", True, "", "secrets"),
    "ConfigMap": (client.CoreV1Api, "config_map", True, "", "configmaps"),
    "Service": (client.CoreV1Api, "service", True, "", "services"),
    "ServiceAccount": (client.CoreV1Api, "service_account", True, "", "serviceaccounts"),
    "PersistentVolumeClaim": (client.CoreV1Api, "persistent_volume_claim", True, "",
                              "persistentvolumeclaims"),
    "Pod": (client.CoreV1Api, "pod", True, "", "pods"),
    "Deployment": (client.AppsV1Api, "deployment", True, "apps", "deployments"),
    "Ingress": (client.NetworkingV1Api, "ingress", True, "networking.k8s.io", "ingresses"),
    "Role": (client.RbacAuthorizationV1Api, "role", True, "rbac.authorization.k8s.io", "roles"),
    "RoleBinding": (client.RbacAuthorizationV1Api, "role_binding", True,
                    "rbac.authorization.k8s.io", "rolebindings"),
}
FIELD_MANAGER = "airfleet"
# sha256 of what Airfleet last applied: an object carrying the hash of today's desired state
# and every desired value is up to date, so a re-run sends nothing (a field we stopped
# applying changes the hash, so its removal is never skipped).
APPLIED_ANNOTATION = "airfleet.io/applied"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
REQUEST_TIMEOUT = (5, 20)  # connect, read (seconds)
RETRY_SECONDS = 60  # give up on a request that keeps failing after this long


class KubeError(AirfleetError):
    """The Kubernetes API refused or kept failing a request; the message says which request
    and what the API server answered. ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Outcome:
    kind: str
    name: str
    action: str  # created | updated | unchanged | adopted


def describe(exc: ApiException) -> str:
    """The API server's own message (a v1 Status), never the request body."""
    try:
        return json.loads(exc.body or "{}").get("message") or exc.reason
    except ValueError:
        return f"{exc.status} {exc.reason}"


class Kube:
    def __init__(self, api_client: client.ApiClient, *, sleep: Callable[[float], None] = time.sleep):
        self.api_client = api_client
        self.sleep = sleep
        self._apis: dict[type, Any] = {}

    # ---- one request ----------------------------------------------------------------------

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, retried with backoff on 429/5xx and connection errors."""
        deadline, delay = time.monotonic() + RETRY_SECONDS, 0.25
        while True:
            try:
                return fn(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
            except ApiException as exc:
                reason = f"{exc.status} {describe(exc)}"
                if exc.status not in RETRY_STATUS or time.monotonic() > deadline:
                    raise KubeError(f"{what}: {reason}", exc.status) from None
            except HTTPError as exc:  # timeouts, refused or reset connections
                if time.monotonic() > deadline:
                    raise KubeError(f"{what}: the Kubernetes API did not answer: {exc}") from None
                reason = type(exc).__name__
            log.warning("%s: %s; retrying in %.2fs", what, reason, delay)
            self.sleep(delay)
            delay = min(delay * 2, 4.0)

    def _method(self, verb: str, kind: str, *, all_namespaces: bool = False
                ) -> tuple[Callable[..., Any], bool]:
        """The typed API method for ``verb`` on ``kind``, and whether it takes a namespace."""
        api_class, suffix, namespaced, _, _ = KINDS[kind]
        api = self._apis.setdefault(api_class, api_class(self.api_client))
        if namespaced and all_namespaces:
            return getattr(api, f"{verb}_{suffix}_for_all_namespaces"), False
        if namespaced:
            return getattr(api, f"{verb}_namespaced_{suffix}"), True
        return getattr(api, f"{verb}_{suffix}"), False

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        return json.loads(response.data)

    # ---- CRUD by kind -----------------------------------------------------------------------

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        fn, namespaced = self._method("read", kind)
        args = (name, namespace) if namespaced else (name,)
        try:
            return self._json(self.call(f"read {kind} {name}", fn, *args, _preload_content=False))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str | None = None, **selectors: Any) -> dict[str, Any]:
        """The raw list (``items`` and ``metadata.resourceVersion``); all namespaces when a
        namespaced kind is listed without one."""
        fn, namespaced = self._method("list", kind, all_namespaces=not namespace)
        args = (namespace,) if namespaced else ()
        return self._json(self.call(f"list {kind}", fn, *args, _preload_content=False,
                                    **selectors))

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind, meta = obj["kind"], obj["metadata"]
        fn, namespaced = self._method("create", kind)
        args = (meta["namespace"], obj) if namespaced else (obj,)
        return self._json(self.call(f"create {kind} {meta['name']}", fn, *args,
                                    _preload_content=False))

    def patch(self, kind: str, name: str, namespace: str | None, body: dict[str, Any]) -> dict:
        """A JSON merge patch (e.g. removing a finalizer); objects are written by :meth:`apply`."""
        fn, namespaced = self._method("patch", kind)
        args = (name, namespace, body) if namespaced else (name, body)
        return self._json(self.call(f"patch {kind} {name}", fn, *args, _preload_content=False,
                                    _content_type="application/merge-patch+json"))

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of ``obj`` as field manager ``airfleet``: creates it when missing,
        sets every field it names, and removes the fields we applied before and not now."""
        kind, meta = obj["kind"], obj["metadata"]
        fn, namespaced = self._method("patch", kind)
        args = (meta["name"], meta["namespace"], obj) if namespaced else (meta["name"], obj)
        return self._json(self.call(f"apply {kind} {meta['name']}", fn, *args,
                                    field_manager=FIELD_MANAGER, force=True,
                                    _preload_content=False,
                                    _content_type="application/apply-patch+yaml"))

    def delete(self, kind: str, name: str, namespace: str | None = None) -> bool:
        """Delete; False when it was already gone."""
        fn, namespaced = self._method("delete", kind)
        args = (name, namespace) if namespaced else (name,)
        try:
            self.call(f"delete {kind} {name}", fn, *args, _preload_content=False)
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise

    # ---- apply ------------------------------------------------------------------------------

    def ensure(self, desired: dict[str, Any], *, update: bool = True) -> Outcome:
        """Make ``desired`` exist: applied when missing; when it exists and differs, applied
        again (``update``) or left as it is (onboarding installs only what is missing)."""
        desired = with_applied_hash(desired)
        kind, meta = desired["kind"], desired["metadata"]
        live = self.get(kind, meta["name"], meta.get("namespace"))
        if live is not None and contains(live, desired):
            return Outcome(kind, meta["name"], "unchanged")
        if live is not None and not update:
            return Outcome(kind, meta["name"], "adopted")
        self.apply(desired)
        return Outcome(kind, meta["name"], "created" if live is None else "updated")

    # ---- permissions ------------------------------------------------------------------------

    def can(self, verb: str, resource: str, group: str = "", namespace: str | None = None) -> bool:
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": {"verb": verb, "resource": resource,
                                                  "group": group, "namespace": namespace}}}
        api = client.AuthorizationV1Api(self.api_client)
        answer = self.call(f"access review {verb} {resource}",
                           api.create_self_subject_access_review, review, _preload_content=False)
        return bool(self._json(answer).get("status", {}).get("allowed"))

    def version(self) -> str:
        info = self._json(self.call("version", client.VersionApi(self.api_client).get_code,
                                    _preload_content=False))
        return info.get("gitVersion", "unknown")

    # ---- watch ------------------------------------------------------------------------------

    def watch_until(self, kind: str, namespace: str, done: Callable[[list[dict]], bool],
                    timeout: float, **selectors: Any) -> list[dict[str, Any]]:
        """List, then watch, until ``done(items)`` holds or ``timeout`` passes; returns the
        last items seen. A broken or expired watch is resumed with a fresh list."""
        deadline = time.monotonic() + timeout
        while True:
            listing = self.list(kind, namespace, **selectors)
            items = {i["metadata"]["name"]: i for i in listing.get("items", [])}
            if done(list(items.values())):
                return list(items.values())
            left = deadline - time.monotonic()
            if left <= 0:
                return list(items.values())
            fn, _ = self._method("list", kind)
            stream = watch.Watch().stream(
                fn, namespace, resource_version=listing["metadata"].get("resourceVersion"),
                timeout_seconds=max(1, int(left)), _request_timeout=(5, left + 5), **selectors)
            try:
                for event in stream:
                    obj = event["raw_object"]
                    if event["type"] == "ERROR":
                        break  # 410 Gone: the resourceVersion expired; list again
                    name = obj["metadata"]["name"]
                    if event["type"] == "DELETED":
                        items.pop(name, None)
                    else:
                        items[name] = obj
                    if done(list(items.values())):
                        return list(items.values())
            except (ApiException, HTTPError, KubeError) as exc:
                log.warning("watch of %s in %s broke (%s); listing again", kind, namespace, exc)
                self.sleep(0.5)
            if time.monotonic() >= deadline:
                return list(items.values())


def with_applied_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` annotated with the hash of itself (see :data:`APPLIED_ANNOTATION`)."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
    meta = obj["metadata"]
    annotations = {**(meta.get("annotations") or {}), APPLIED_ANNOTATION: digest}
    return {**obj, "metadata": {**meta, "annotations": annotations}}


def contains(live: Any, desired: Any) -> bool:
    """Whether every field of ``desired`` has the same value in ``live`` (server-added fields,
    such as a Service's clusterIP or a container's defaults, are ignored)."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(
            contains(live.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(
            contains(a, b) for a, b in zip(live, desired, strict=True))
    return live == desired
