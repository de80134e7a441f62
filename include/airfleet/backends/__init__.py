"""One backend per cluster type, all with the same verbs (SkyPilot's provision layer is the model).

Every verb is idempotent: it looks at what exists, adopts what is ours, creates only what is
missing, and treats "already gone" as success on teardown. Backends never read an Airflow
connection: the plugin layer builds clients from Airflow hooks and hands them in through
:class:`BackendContext`.

Backends are found through an explicit registry (:data:`BUILTIN`), plus ``AIRFLEET_BACKENDS``
(``type=module:Class,...``) so a deployment or a test can register its own.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from airfleet.endpoints import EndpointSpec, EndpointVersion
from airfleet.errors import AirfleetError, BackendUnavailable
from airfleet.resources import Cluster, ClusterSpec, Condition, NodeStatus

log = logging.getLogger(__name__)

# cluster type -> "module:Class". The product backends register here as they land.
BUILTIN: dict[str, str] = {"ssh": "airfleet.backends.ssh.backend:SSHBackend",
                           "kubernetes": "airfleet.backends.kubernetes.backend:KubernetesBackend"}
ENV_VAR = "AIRFLEET_BACKENDS"


class NotSupported(AirfleetError):
    """A backend was asked for a verb it cannot do."""


@dataclass
class Observation:
    """What a backend saw: the basis of a status write."""

    healthy: bool
    message: str = ""
    nodes: list[NodeStatus] = field(default_factory=list)
    accelerators: dict[str, Any] = field(default_factory=dict)
    conditions: list[Condition] = field(default_factory=list)


@dataclass
class EndpointObservation:
    """What a backend saw of one endpoint version's engines."""

    healthy: bool  # every desired replica ready on the version's latest spec
    message: str = ""
    ready_replicas: int = 0
    replicas: int = 0
    failed: bool = False  # the platform gave up on it (waiting longer is pointless)
    url: str | None = None  # where clients reach the endpoint's model


@dataclass(frozen=True)
class Wait:
    """What a reconcile pass left running, for the flow to wait on (in Airflow's triggerer)
    before it reconciles again: an EKS cluster CREATING, an Azure long-running operation, ...

    ``kind`` names the wait (the plugin layer picks the trigger by it), ``what`` says it for
    people, ``args`` are what the trigger needs: JSON-safe, never a secret.
    """

    kind: str
    what: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "what": self.what, "args": dict(self.args)}


@dataclass
class BackendContext:
    """What a verb gets besides the cluster: the run, clients built from Airflow hooks, and
    callbacks that record progress as it happens."""

    run_id: str
    clients: Mapping[str, Any] = field(default_factory=dict)
    report_node: Callable[[NodeStatus], None] = lambda node: None
    # (reason, message, kind "Normal" | "Warning"): a note in the cluster's history.
    record_event: Callable[[str, str, str], None] = lambda reason, message, kind: None
    # (what, created): a cloud resource the run created (True) or found and adopted (False),
    # recorded the moment it exists so a later failure knows what to clean up.
    record_resource: Callable[[str, bool], None] = lambda what, created: None
    # A kubeconfig fetched from a managed cluster: into the vault, its id on the cluster.
    store_kubeconfig: Callable[[bytes], None] = lambda kubeconfig: None
    # A progress line on the cluster's status (the stage a long step is at).
    progress: Callable[[str], None] = lambda message: None
    log: logging.Logger = log


class Backend:
    """The verbs of a cluster type. A verb a backend cannot do raises :class:`NotSupported`."""

    cluster_type: ClassVar[str]
    # Clients the plugin layer builds for each verb (see airfleet_airflow.clients.BUILDERS).
    clients: ClassVar[tuple[str, ...]] = ()

    def validate(self, spec: ClusterSpec) -> None:
        """Checks beyond the schema that need no I/O; raise InvalidRequest naming the field."""

    def validate_update(self, recorded: Cluster, desired: ClusterSpec) -> None:
        """Refuse a change the backend cannot make in place; raise InvalidRequest naming the
        field."""

    def preflight(self, cluster: Cluster, ctx: BackendContext) -> None:
        """Read-only checks against what already runs, made while a flow validates its request
        (before any lease or change): e.g. that the credentials may do everything the flow will
        do. Raise an AirfleetError naming the field and the fix."""

    def provision(self, cluster: Cluster, ctx: BackendContext) -> Wait | None:
        """One reconcile pass over the underlying infrastructure (managed Kubernetes): create
        what is missing, adopt what is ours, and return what is still in progress (the flow
        waits on it, then calls again) or None once everything is ready. No-op where none."""
        return None

    def scale(self, cluster: Cluster, ctx: BackendContext) -> Wait | None:
        """Update flow: one reconcile pass of the node pools to the recorded spec (as
        :meth:`provision`); None where the type has no pools of its own."""
        return None

    def deprovision(self, cluster: Cluster, ctx: BackendContext) -> Wait | None:
        """Delete flow, after :meth:`teardown`: one pass removing the infrastructure
        :meth:`provision` made (as :meth:`provision`); "already gone" is done."""
        return None

    def cleanup_failed_run(self, cluster: Cluster, ctx: BackendContext, *,
                           created: list[str]) -> Wait | None:
        """A create that failed: one pass removing ``created`` (what that run created, as
        ``record_resource`` named it), when the spec asks for it; never what was adopted."""
        return None

    def apply(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        """Converge the cluster to its spec; return what was observed afterwards."""
        raise self._unsupported("apply")

    def install_missing(self, cluster: Cluster, ctx: BackendContext) -> Observation | None:
        """Onboarding: create only the components that are missing, touch nothing that runs.
        None: the type installs nothing of its own."""
        return None

    def ready_timeout(self, cluster: Cluster) -> float:
        """How long :meth:`wait_ready` may take in all; 0 when ``apply`` already waited."""
        return 0.0

    def wait_ready(self, cluster: Cluster, ctx: BackendContext, *,
                   timeout: float | None = None) -> Observation | None:
        """Wait up to ``timeout`` seconds (default :meth:`ready_timeout`; 0 looks once) until
        the cluster's components are ready; read-only. None: nothing to wait for."""
        return None

    def query(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        """Discover a running cluster without changing it (onboarding)."""
        raise self._unsupported("query")

    def health(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        """Probe the cluster read-only."""
        raise self._unsupported("health")

    async def health_async(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        """:meth:`health`, awaitable, so one task probes a whole fleet concurrently. By default
        in a worker thread (a sync client); a backend with async I/O overrides it."""
        return await asyncio.to_thread(self.health, cluster, ctx)

    def detect_accelerators(self, cluster: Cluster, ctx: BackendContext) -> dict[str, Any]:
        raise self._unsupported("detect_accelerators")

    def drain_nodes(self, cluster: Cluster, ctx: BackendContext) -> dict[str, Any]:
        """Start a graceful drain of every recorded node the spec no longer lists.

        Returns ``{"removed": [addresses], "nodes": {address: id being drained},
        "deadline_seconds": ...}``; a type whose nodes are not ours to
        remove (Kubernetes) has nothing to drain."""
        return {"removed": [], "nodes": {}}

    def stop_nodes(self, cluster: Cluster, ctx: BackendContext, *,
                   forced: list[str]) -> None:
        """Stop the removed nodes once drained (``forced``: still busy at the deadline)."""

    def teardown(self, cluster: Cluster, ctx: BackendContext, *, force: bool = False) -> list[str]:
        """Remove everything Airfleet made; return what is left behind, one item each (empty
        when clean). ``force``: go on past what cannot be reached, and report it as left."""
        raise self._unsupported("teardown")

    def teardown_timeout(self, cluster: Cluster) -> float:
        """How long what :meth:`teardown` started may take to be gone (the flow waits in the
        triggerer, looking with :meth:`teardown_done`); 0: teardown already waited."""
        return 0.0

    def teardown_done(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        """Read-only: whether what :meth:`teardown` started is gone (healthy), else what is
        still there (the message)."""
        return Observation(True)

    # ---- endpoints (airfleet.endpoints): one version's engines on the cluster --------------

    def deploy_endpoint(self, cluster: Cluster, endpoint: EndpointVersion,
                        versions: list[EndpointVersion], ctx: BackendContext) -> None:
        """Create or update the engines of ``endpoint`` (one version) and route traffic by the
        weights of ``versions`` (every recorded endpoint version on the cluster, this one
        included); returns without waiting (:meth:`endpoint_ready` looks)."""
        raise self._unsupported("deploy endpoints")

    def validate_endpoint(self, cluster: Cluster, spec: EndpointSpec) -> None:
        """Refuse, before anything changes, an endpoint this backend cannot run; raise
        InvalidRequest naming the field (no I/O)."""

    def endpoint_ready(self, cluster: Cluster, endpoint: EndpointVersion,
                       ctx: BackendContext) -> EndpointObservation:
        """Read-only: whether every replica of the version runs its latest spec and is ready."""
        raise self._unsupported("look at endpoints")

    def endpoint_ready_timeout(self, cluster: Cluster) -> float:
        """How long a deploy may wait in all for a version's engines to be ready (default:
        :meth:`ready_timeout`)."""
        return self.ready_timeout(cluster)

    def delete_endpoint(self, cluster: Cluster, endpoints: list[EndpointVersion],
                        remaining: list[EndpointVersion], ctx: BackendContext) -> list[str]:
        """Remove the engines of ``endpoints`` and route only to ``remaining`` (every other
        endpoint version on the cluster);
        return what could not be removed, each item naming its version (empty: verified
        gone). "Already gone" is done."""
        raise self._unsupported("delete endpoints")

    def _unsupported(self, verb: str) -> NotSupported:
        return NotSupported(f"the {self.cluster_type} backend cannot {verb}")


def registered() -> dict[str, str]:
    """The registry: builtin entries overridden by ``AIRFLEET_BACKENDS``."""
    entries = dict(BUILTIN)
    for item in filter(None, (os.environ.get(ENV_VAR) or "").split(",")):
        cluster_type, sep, target = item.strip().partition("=")
        if not sep or ":" not in target:
            raise BackendUnavailable(f"{ENV_VAR}: {item!r} is not type=module:Class")
        entries[cluster_type.strip()] = target.strip()
    return entries


def get_backend(cluster_type: str) -> Backend:
    entries = registered()
    target = entries.get(str(cluster_type))
    if target is None:
        known = ", ".join(sorted(entries)) or "none yet"
        raise BackendUnavailable(
            f"cluster type {cluster_type} is not available: no backend is registered for it "
            f"(available: {known})")
    module_name, _, class_name = target.partition(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    return backend_class()
