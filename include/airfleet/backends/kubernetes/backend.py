"""The Kubernetes backend: a dedicated namespace with the router, the metrics collector, the
image pull secret and the model caches, in a cluster reached with a kubeconfig.

``apply`` checks the permissions first (SelfSubjectAccessReview; a missing one fails with the
whole list and nothing is created), then creates or patches each object to its desired state
(:meth:`Kube.ensure`), and removes what a changed spec no longer asks for (an Ingress, the
metrics collector); PVCs are never removed by an update, they hold model weights.
``wait_ready`` watches the Deployments until they are Available. ``teardown`` deletes the
namespace (Kubernetes deletes its content) and waits until it is gone.

``provider: eks | aks`` first provisions the managed cluster (:mod:`.eks`, :mod:`.aks`) in
reconcile passes that return what to wait for (the flow waits in Airflow's triggerer), then
continues exactly as an existing cluster; ``scale`` converges the node pools, ``deprovision``
removes pools and cluster, ``cleanup_failed_run`` what a failed create made.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from airfleet.accelerators import cluster_totals, from_node_labels
from airfleet.backends import Backend, BackendContext, Observation, Wait
from airfleet.backends.kubernetes import manifests as m
from airfleet.backends.kubernetes.kube import Kube, KubeError
from airfleet.errors import AirfleetError, InvalidRequest
from airfleet.resources import Cluster, ClusterSpec, Condition, NodeStatus, Provider

NAMESPACE_GONE_SECONDS = 300
CLOUDS = (Provider.EKS, Provider.AKS)
ACCESS_REVIEWS_AT_ONCE = 8
# Fields of a managed cluster's config that an update cannot change.
FIXED = {Provider.EKS: ("region", "role_arn", "subnet_ids", "version"),
         Provider.AKS: ("subscription_id", "resource_group", "location", "version")}
CLEANUP_KINDS = ("Deployment", "Service", "Ingress", "ConfigMap", "Secret")

# What Airfleet does in a cluster: (verb, API group, resource, namespaced). Creating the Role
# that lets the router watch pods needs those pod permissions too (RBAC escalation check).
_MANAGED = {
    ("", "secrets"), ("", "configmaps"), ("", "services"), ("", "serviceaccounts"),
    ("", "persistentvolumeclaims"), ("apps", "deployments"), ("networking.k8s.io", "ingresses"),
    ("rbac.authorization.k8s.io", "roles"), ("rbac.authorization.k8s.io", "rolebindings")}
PERMISSIONS: tuple[tuple[str, str, str, bool], ...] = (
    *((verb, "", "namespaces", False) for verb in ("get", "create", "delete")),
    ("list", "", "nodes", False),
    *((verb, group, resource, True) for group, resource in sorted(_MANAGED)
      for verb in ("get", "list", "create", "patch", "delete")),
    ("watch", "apps", "deployments", True),
    *((verb, "", "pods", True) for verb in ("get", "list", "watch")),
)


class MissingPermissions(AirfleetError):
    """The kubeconfig's identity may not do what Airfleet needs; the message lists each."""


def _can_i(kube: Kube, namespace: str) -> list[str]:
    """Every missing permission, as ``verb group/resource (scope)``. One access review per
    permission (about 50), a few at a time: in sequence they cost seconds per flow."""
    def missing(permission: tuple[str, str, str, bool]) -> str | None:
        verb, group, resource, namespaced = permission
        ns = namespace if namespaced else None
        if kube.can(verb, resource, group, ns):
            return None
        scope = f"in namespace {ns}" if ns else "cluster-wide"
        return f"{verb} {group + '/' if group else ''}{resource} ({scope})"

    with ThreadPoolExecutor(max_workers=ACCESS_REVIEWS_AT_ONCE) as pool:
        return [m for m in pool.map(missing, PERMISSIONS) if m]


def _available(deployment: dict[str, Any]) -> bool:
    status = deployment.get("status") or {}
    available = any(c.get("type") == "Available" and c.get("status") == "True"
                    for c in status.get("conditions") or [])
    wanted = (deployment.get("spec") or {}).get("replicas", 1)
    return available and (status.get("availableReplicas") or 0) >= wanted and \
        status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 0)


def _not_available(components: list[str], deployments: list[dict[str, Any]]) -> list[str]:
    """Each component that is not Available, with what Kubernetes says about it."""
    by_name = {d["metadata"]["name"]: d for d in deployments}
    out = []
    for name in components:
        d = by_name.get(name)
        if d is None:
            out.append(f"{name}: missing")
        elif not _available(d):
            status = d.get("status") or {}
            why = next((c.get("message") or c.get("reason", "") for c in status.get("conditions")
                        or [] if c.get("type") == "Available"), "")
            out.append(f"{name}: {status.get('availableReplicas') or 0}/"
                       f"{d['spec'].get('replicas', 1)} available" + (f" ({why})" if why else ""))
    return out


def _node_status(node: dict[str, Any]) -> NodeStatus:
    status = node.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    address = next((a["address"] for a in status.get("addresses") or []
                    if a.get("type") == "InternalIP"), "")
    return NodeStatus(
        name=node["metadata"]["name"], address=address, role="node",
        phase="Ready" if ready.get("status") == "True" else "NotReady",
        message=ready.get("message", ""), labels=node["metadata"].get("labels") or {},
        capacity=status.get("capacity") or {}, allocatable=status.get("allocatable") or {})


class KubernetesBackend(Backend):
    cluster_type = "kubernetes"
    clients = ("kubernetes", "registry", "cloud")

    def validate(self, spec: ClusterSpec) -> None:
        if spec.provider in CLOUDS and not spec.block.credential.airflow_conn_id:
            kind = "AWS" if spec.provider is Provider.EKS else "Azure"
            raise InvalidRequest(
                f"cluster.spec.config.{spec.provider.value}.credential: give an Airflow "
                f"{kind} connection (airflow_conn_id); cloud credentials are read from "
                "Airflow's connections, not from the vault")

    def validate_update(self, recorded: Cluster, desired: ClusterSpec) -> None:
        """What a managed cluster cannot change in place: where it lives, its roles and
        network, its Kubernetes version (upgrades are not done by Airfleet), and a node pool's
        instance types."""
        if recorded.spec.provider not in CLOUDS:
            return
        provider = recorded.spec.provider.value
        before, after = recorded.spec.block, desired.block
        for name in FIXED[recorded.spec.provider]:
            if getattr(before, name) != getattr(after, name):
                raise InvalidRequest(
                    f"cluster.spec.config.{provider}.{name}: cannot change on an existing "
                    f"cluster (it is {getattr(before, name)!r}, the request says "
                    f"{getattr(after, name)!r}); delete the cluster and create it anew")
        kinds = {p.name: p.instance_types for p in before.node_pools}
        for i, pool in enumerate(after.node_pools):
            if pool.name in kinds and kinds[pool.name] != pool.instance_types:
                raise InvalidRequest(
                    f"cluster.spec.config.{provider}.node_pools.{i}.instance_types: a node "
                    f"pool's instance types cannot change (pool {pool.name} has "
                    f"{kinds[pool.name]}); add a pool under a new name and drop this one")

    # ---- the managed cluster (eks, aks) -----------------------------------------------------

    def provision(self, cluster: Cluster, ctx: BackendContext) -> Wait | None:
        """One pass of provisioning (eks, aks): the cluster and its node pools, then (once
        they are ready) the admin kubeconfig into the vault (AKS) and the access and
        permission check. An existing cluster gets the check alone, before anything is made."""
        provisioner = self._provisioner(cluster, ctx)
        if provisioner is not None:
            wait = provisioner.reconcile()
            if wait is not None:
                ctx.progress(f"provisioning: waiting for {wait.what}")
                return wait
            if cluster.spec.provider is Provider.AKS:
                ctx.store_kubeconfig(provisioner.admin_kubeconfig())
            ctx.progress(f"provisioning: {cluster.spec.provider.value} cluster "
                         f"{cluster.name} and its node pools are ready")
        self._check_access(self._kube(ctx), m.namespace_of(cluster.name), ctx)
        return None

    def scale(self, cluster: Cluster, ctx: BackendContext) -> Wait | None:
        """The node pools to the recorded spec: sizes and bounds converged, new pools made,
        pools of ours the spec dropped removed."""
        provisioner = self._provisioner(cluster, ctx)
        if provisioner is None:
            return None
        wait = provisioner.reconcile(create=False, prune=True)
        for change in provisioner.changes:
            ctx.record_event("NodePoolChanged", change, "Normal")
        if wait is not None:
            ctx.progress(f"scaling: waiting for {wait.what}")
        return wait

    def deprovision(self, cluster: Cluster, ctx: BackendContext) -> Wait | None:
        """Node pools, then the managed cluster; "already gone" is done."""
        provisioner = self._provisioner(cluster, ctx)
        if provisioner is None:
            return None
        wait = provisioner.teardown_step()
        if wait is not None:
            ctx.progress(f"deleting: waiting for {wait.what}")
        return wait

    def cleanup_failed_run(self, cluster: Cluster, ctx: BackendContext, *,
                           created: list[str]) -> Wait | None:
        provisioner = self._provisioner(cluster, ctx)
        if provisioner is None or not created:
            return None
        if not cluster.spec.block.delete_on_failure:
            ctx.log.warning("cluster %s: kept what this run created (delete_on_failure is "
                            "false): %s; delete the cluster (airfleet_cluster_delete) or "
                            "remove them by hand", cluster.name, ", ".join(created))
            return None
        wait = provisioner.teardown_step(only=created)
        if wait is not None:  # logged only: the status keeps saying why the create failed
            ctx.log.info("cluster %s: cleaning up after the failed create: waiting for %s",
                         cluster.name, wait.what)
        return wait

    def _provisioner(self, cluster: Cluster, ctx: BackendContext):
        """The EKS or AKS provisioner of the cluster; None for an existing cluster."""
        # Imported here: the cloud SDKs load only where a cloud cluster is handled.
        if cluster.spec.provider is Provider.EKS:
            from airfleet.backends.kubernetes.eks import EKSProvisioner as provisioner_class
        elif cluster.spec.provider is Provider.AKS:
            from airfleet.backends.kubernetes.aks import AKSProvisioner as provisioner_class
        else:
            return None
        return provisioner_class(
            ctx.clients["cloud"], cluster.spec.block, cluster.name, log=ctx.log,
            on_created=lambda what: ctx.record_resource(what, True),
            on_adopted=lambda what: ctx.record_resource(what, False))

    @staticmethod
    def _kube(ctx: BackendContext) -> Kube:
        """The Kubernetes API; a provisioned cluster's client connects on first use."""
        api = ctx.clients["kubernetes"]
        return Kube(api() if callable(api) else api)

    # ---- the Airfleet components --------------------------------------------------------------

    def apply(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        return self._install(cluster, ctx, update=True)

    def install_missing(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        return self._install(cluster, ctx, update=False)

    def _install(self, cluster: Cluster, ctx: BackendContext, *, update: bool) -> Observation:
        kube, ns = self._kube(ctx), m.namespace_of(cluster.name)
        self._check_access(kube, ns, ctx)
        self._own_namespace(kube, cluster)
        desired = m.desired_objects(cluster, ctx.clients.get("registry"))
        counts: dict[str, int] = {}
        for i, obj in enumerate(desired, 1):
            outcome = kube.ensure(obj, update=update)
            ctx.log.info("cluster %s: [%d/%d] %s %s/%s %s", cluster.name, i, len(desired),
                         obj["kind"], ns, outcome.name, outcome.action)
            counts[outcome.action] = counts.get(outcome.action, 0) + 1
        if update:
            for kind, name in self._stale(kube, cluster, desired):
                kube.delete(kind, name, ns)
                ctx.log.info("cluster %s: %s %s/%s removed (no longer in the spec)",
                             cluster.name, kind, ns, name)
                counts["removed"] = counts.get("removed", 0) + 1
        summary = ", ".join(f"{n} {action}" for action, n in sorted(counts.items()))
        return Observation(True, f"namespace {ns}: {summary}")

    def _check_access(self, kube: Kube, ns: str, ctx: BackendContext) -> None:
        ctx.log.info("Kubernetes API %s answers: version %s", kube.api_client.configuration.host,
                     kube.version())
        missing = _can_i(kube, ns)
        if missing:
            raise MissingPermissions(
                f"the kubeconfig's identity lacks {len(missing)} permission(s) Airfleet needs: "
                + "; ".join(missing) + ". Grant them (a ClusterRole bound to that identity) "
                "and run the flow again; this run changed nothing in the cluster")

    @staticmethod
    def _own_namespace(kube: Kube, cluster: Cluster) -> None:
        ns = kube.get("Namespace", m.namespace_of(cluster.name))
        if ns is None:
            return
        labels = ns["metadata"].get("labels") or {}
        if labels.get(m.MANAGED_BY) != m.MANAGED_BY_VALUE or \
                labels.get(m.CLUSTER_LABEL) != cluster.name:
            raise KubeError(f"namespace {ns['metadata']['name']} exists and is not Airfleet's "
                            f"(no {m.MANAGED_BY}={m.MANAGED_BY_VALUE}, {m.CLUSTER_LABEL}="
                            f"{cluster.name} labels); rename the cluster or remove that namespace")
        if (ns.get("status") or {}).get("phase") == "Terminating":
            raise KubeError(f"namespace {ns['metadata']['name']} is still being deleted; run "
                            "the flow again once it is gone")

    @staticmethod
    def _stale(kube: Kube, cluster: Cluster, desired: list[dict]) -> list[tuple[str, str]]:
        """Objects of ours in the namespace that the spec no longer asks for."""
        wanted = {(o["kind"], o["metadata"]["name"]) for o in desired}
        ns = m.namespace_of(cluster.name)
        return [(kind, item["metadata"]["name"]) for kind in CLEANUP_KINDS
                for item in kube.list(kind, ns, label_selector=m.selector(cluster.name))["items"]
                if (kind, item["metadata"]["name"]) not in wanted]

    # ---- readiness and health ---------------------------------------------------------------

    def ready_timeout(self, cluster: Cluster) -> float:
        return float(m.kube_config(cluster).ready_timeout_seconds)

    def wait_ready(self, cluster: Cluster, ctx: BackendContext, *,
                   timeout: float | None = None) -> Observation:
        """Watch the components until every one is Available, for up to ``timeout`` seconds
        (the spec's ``ready_timeout_seconds`` by default; 0 looks once)."""
        kube, ns = self._kube(ctx), m.namespace_of(cluster.name)
        wanted = m.components(cluster)
        seconds = self.ready_timeout(cluster) if timeout is None else timeout
        items = kube.watch_until(
            "Deployment", ns, lambda ds: not _not_available(wanted, ds), seconds,
            label_selector=m.selector(cluster.name))
        pending = _not_available(wanted, items)
        if pending:
            return Observation(False, f"not Available after {seconds:g}s: " + "; ".join(pending),
                               conditions=[_condition("ComponentsAvailable", False, pending)])
        return Observation(True, f"{', '.join(wanted)} Available",
                           conditions=[_condition("ComponentsAvailable", True, wanted)])

    def health(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        """API reachable, components Available, and a node readiness summary."""
        kube, ns = self._kube(ctx), m.namespace_of(cluster.name)
        kube.version()
        nodes = [_node_status(n) for n in kube.list("Node")["items"]]
        ready = sum(n.phase == "Ready" for n in nodes)
        node_summary = f"nodes {ready}/{len(nodes)} Ready"
        deployments = kube.list("Deployment", ns, label_selector=m.selector(cluster.name))
        pending = _not_available(m.components(cluster), deployments["items"])
        conditions = [_condition("ComponentsAvailable", not pending,
                                 pending or m.components(cluster)),
                      Condition(type="NodesReady", status="True" if ready else "False",
                                reason="NodeReadiness", message=node_summary)]
        problems = pending + ([] if ready else ["no node is Ready"])
        message = "; ".join(problems) if problems else f"components Available; {node_summary}"
        return Observation(not problems, message, nodes=nodes, conditions=conditions)

    # ---- onboarding -------------------------------------------------------------------------

    def query(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        """Discover an existing cluster read-only: access, permissions and nodes."""
        kube = self._kube(ctx)
        self._check_access(kube, m.namespace_of(cluster.name), ctx)
        nodes = [_node_status(n) for n in kube.list("Node")["items"]]
        for node in nodes:
            ctx.report_node(node)
        ready = sum(n.phase == "Ready" for n in nodes)
        return Observation(ready > 0, f"nodes {ready}/{len(nodes)} Ready", nodes=nodes)

    def detect_accelerators(self, cluster: Cluster, ctx: BackendContext) -> dict[str, Any]:
        """From node labels (NFD, GPU feature discovery) and allocatable resources."""
        per_node = {}
        for node in self._kube(ctx).list("Node")["items"]:
            name = node["metadata"]["name"]
            report = from_node_labels(node["metadata"].get("labels") or {},
                                      (node.get("status") or {}).get("allocatable") or {})
            per_node[name] = report.to_dict()
            for stage in report.stages:
                ctx.log.info("node %s: %s %s: %s", name, stage.name,
                             {True: "ok", False: "FAILED", None: "n/a"}[stage.ok], stage.message)
        return cluster_totals(per_node)

    # ---- delete -----------------------------------------------------------------------------

    def teardown(self, cluster: Cluster, ctx: BackendContext, *, force: bool = False) -> list[str]:
        """Delete the namespace (its content goes with it: a LoadBalancer Service releases its
        cloud load balancer) and wait until it is gone; :meth:`deprovision` then removes a
        managed cluster. With ``force``, what could not be removed (an unreachable API, a stuck
        namespace) is logged and the cluster is reported Deleted all the same."""
        provisioner = self._provisioner(cluster, ctx)
        if provisioner is not None and not provisioner.exists():
            ctx.log.info("cluster %s: the %s cluster is gone, and its namespace with it",
                         cluster.name, cluster.spec.provider.value)
            return []
        try:
            left = self._delete_namespace(cluster, ctx)
        except KubeError as exc:
            if not force:
                raise
            left = [str(exc)]
        for line in left:
            ctx.log.warning("cluster %s: left behind: %s", cluster.name, line)
        if force and left:
            ctx.log.warning("force: reporting Deleted although %d item(s) remain (manual "
                            "cleanup may be required)", len(left))
            return []
        return left

    def _delete_namespace(self, cluster: Cluster, ctx: BackendContext) -> list[str]:
        kube, ns = self._kube(ctx), m.namespace_of(cluster.name)
        live = kube.get("Namespace", ns)
        if live is None:
            ctx.log.info("cluster %s: namespace %s is already gone", cluster.name, ns)
            return []
        if (live["metadata"].get("labels") or {}).get(m.CLUSTER_LABEL) != cluster.name:
            return [f"namespace {ns} is not Airfleet's (no {m.CLUSTER_LABEL}={cluster.name} "
                    "label): left alone"]
        kube.delete("Namespace", ns)
        ctx.log.info("cluster %s: namespace %s deleted; waiting until it is gone",
                     cluster.name, ns)
        deadline = time.monotonic() + NAMESPACE_GONE_SECONDS
        while kube.get("Namespace", ns) is not None:
            if time.monotonic() > deadline:
                return [f"namespace {ns} still Terminating after {NAMESPACE_GONE_SECONDS}s "
                        "(a finalizer holds it?)"]
            time.sleep(0.5)
        return []


def _condition(kind: str, ok: bool, items: list[str]) -> Condition:
    return Condition(type=kind, status="True" if ok else "False",
                     reason="Available" if ok else "NotAvailable", message="; ".join(items))
