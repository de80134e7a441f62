"""Apply semantics over the ``kubernetes`` client: read, compare, create or patch.

:class:`Kube` wraps the ``ApiClient`` the plugin layer builds from the cncf-kubernetes
provider's hook. It reaches every kind Airfleet manages through the typed APIs' uniform method
names (``read_namespaced_config_map``, ...), reads raw JSON (no model round trip that could
drop fields), and retries what a retry can fix: 429, 5xx and slow or broken connections. Writes
are safe to retry because each is checked against what exists first, and a create that meets
an existing object (409) reads it and carries on.
"""

from __future__ import annotations

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

# kind -> (typed API class, method suffix, namespaced)
KINDS: dict[str, tuple[type, str, bool]] = {
    "Namespace": (client.CoreV1Api, "namespace", False),
    "Node": (client.CoreV1Api, "node", False),
    "Secret": (client.CoreV1Api, "secret", True),
    "ConfigMap": (client.CoreV1Api, "config_map", True),
    "Service": (client.CoreV1Api, "service", True),
    "ServiceAccount": (client.CoreV1Api, "service_account", True),
    "PersistentVolumeClaim": (client.CoreV1Api, "persistent_volume_claim", True),
    "Pod": (client.CoreV1Api, "pod", True),
    "Deployment": (client.AppsV1Api, "deployment", True),
    "Ingress": (client.NetworkingV1Api, "ingress", True),
    "Role": (client.RbacAuthorizationV1Api, "role", True),
    "RoleBinding": (client.RbacAuthorizationV1Api, "role_binding", True),
}
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
        api_class, suffix, namespaced = KINDS[kind]
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
        fn, namespaced = self._method("patch", kind)
        args = (name, namespace, body) if namespaced else (name, body)
        return self._json(self.call(f"patch {kind} {name}", fn, *args, _preload_content=False,
                                    _content_type="application/merge-patch+json"))

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
        """Make ``desired`` exist: create it when missing; when it exists and differs, patch
        it to the desired fields (``update``) or leave it (onboarding installs only what is
        missing)."""
        kind, meta = desired["kind"], desired["metadata"]
        name, namespace = meta["name"], meta.get("namespace")
        live = self.get(kind, name, namespace)
        if live is None:
            try:
                self.create(desired)
                return Outcome(kind, name, "created")
            except KubeError as exc:
                if exc.status != 409:
                    raise
                # Created meanwhile (a retried POST that had landed, or a racing run).
                live = self.get(kind, name, namespace)
                if live is None:
                    raise
        if contains(live, desired):
            return Outcome(kind, name, "unchanged")
        if not update:
            return Outcome(kind, name, "adopted")
        body = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind")}
        self.patch(kind, name, namespace, body)
        return Outcome(kind, name, "updated")

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
