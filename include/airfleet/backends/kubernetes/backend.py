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

from typing import Any, NamedTuple

from airfleet.accelerators import cluster_totals, from_node_labels
from airfleet.backends import Backend, BackendContext, EndpointObservation, Observation, Wait
from airfleet.backends.kubernetes import access
from airfleet.backends.kubernetes import manifests as m
from airfleet.backends.kubernetes.kube import Kube, KubeError
from airfleet.endpoints import EndpointVersion
from airfleet.errors import AirfleetError, InvalidRequest
from airfleet.resources import Cluster, ClusterSpec, Condition, NodeStatus, Provider

# How long a deleted namespace may stay Terminating before the delete reports what holds it.
NAMESPACE_GONE_SECONDS = 300
# The namespace controller's conditions that say why a Terminating namespace is not gone yet.
HOLDING = ("NamespaceContentRemaining", "NamespaceFinalizersRemaining",
           "NamespaceDeletionContentFailure", "NamespaceDeletionDiscoveryFailure")
CLOUDS = (Provider.EKS, Provider.AKS)
# Fields of a managed cluster's config that an update cannot change.
FIXED = {Provider.EKS: ("region", "role_arn", "subnet_ids", "version"),
         Provider.AKS: ("subscription_id", "resource_group", "location", "version")}
CLEANUP_KINDS = ("Deployment", "Service", "Ingress", "ConfigMap", "Secret")
COMPONENTS_READY = "ComponentsReady"
# How long the readiness wait goes on past the Deployments' progressDeadlineSeconds, for the
# controller to report ProgressDeadlineExceeded (it rechecks a stuck rollout at the deadline).
VERDICT_GRACE_SECONDS = 10


class MissingPermissions(AirfleetError):
    """The kubeconfig's identity may not do what Airfleet needs; the message lists each."""


# A model cache PVC's fields, as the spec names them.
_PVC_FIELDS = {"spec.storageClassName": "storage_class", "spec.accessModes": "access_mode",
               m.PVC_STORAGE: "size"}


def _refuse_immutable_changes(recorded: Cluster, desired: ClusterSpec) -> None:
    after = recorded.model_copy(update={"spec": desired})
    changes = m.immutable_changes(m.desired_objects(recorded, None),
                                  m.desired_objects(after, None))
    if not changes:
        return
    obj, path, was, wanted = changes[0]
    kind, name = obj["kind"], obj["metadata"]["name"]
    caches = [c.name for c in desired.model_caches]
    if kind == "PersistentVolumeClaim" and name.removeprefix("cache-") in caches:
        index = caches.index(name.removeprefix("cache-"))
        field = f"cluster.spec.model_caches.{index}.pvc.{_PVC_FIELDS[path]}"
        fix = ("give the cache a new name (a new PVC is made; the old one keeps its weights "
               "until you delete it)")
    else:
        field, fix = f"{kind} {name} {path}", "delete the cluster and create it anew"
    how = "may not shrink" if path == m.PVC_STORAGE else "cannot change once created"
    raise InvalidRequest(f"{field}: {how}: Kubernetes refuses it on {kind} {name} (it is "
                         f"{was!r}, the request says {wanted!r}); {fix}")


class Rollout(NamedTuple):
    """A Deployment's rollout as ``kubectl rollout status`` judges it."""

    done: bool
    failed: bool  # Kubernetes gave up on it (ProgressDeadlineExceeded): waiting is pointless
    message: str


def rollout(deployment: dict[str, Any]) -> Rollout:
    """Done when the controller has seen the latest spec and every replica runs it and is
    available, with no old replica left. During a rollout the old replicas keep the
    Deployment "Available", so availability alone would call a broken rollout healthy."""
    name, status = deployment["metadata"]["name"], deployment.get("status") or {}
    generation = deployment["metadata"].get("generation", 0)
    if status.get("observedGeneration", 0) < generation:
        return Rollout(False, False, f"{name}: the controller has not seen generation "
                                     f"{generation} yet")
    progressing = next((c for c in status.get("conditions") or []
                        if c.get("type") == "Progressing"), {})
    if progressing.get("reason") == "ProgressDeadlineExceeded":
        return Rollout(False, True, f"{name}: rollout failed: ProgressDeadlineExceeded: "
                                    f"{progressing.get('message', '')}".rstrip(": "))
    wanted = (deployment.get("spec") or {}).get("replicas", 1)
    replicas, updated, available = (status.get(k) or 0 for k in (
        "replicas", "updatedReplicas", "availableReplicas"))
    if updated < wanted:
        return Rollout(False, False, f"{name}: {updated} of {wanted} replicas updated")
    if replicas > updated:
        return Rollout(False, False, f"{name}: {replicas - updated} old replicas pending "
                                     "termination")
    if available < updated:
        return Rollout(False, False, f"{name}: {available} of {updated} updated replicas "
                                     "available")
    return Rollout(True, False, f"{name}: rolled out")


def _rollouts(components: list[str], deployments: list[dict[str, Any]]) -> list[Rollout]:
    """Each component's rollout (a missing Deployment is not done)."""
    by_name = {d["metadata"]["name"]: d for d in deployments}
    return [rollout(by_name[name]) if name in by_name else Rollout(False, False,
                                                                   f"{name}: missing")
            for name in components]


def _not_done(rollouts: list[Rollout]) -> list[str]:
    return [r.message for r in rollouts if not r.done]


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


# How long a delete waits for an endpoint version's pods to be gone (graceful termination:
# 30 s by default) before it reports them as left behind.
ENDPOINT_GONE_SECONDS = 120


class _Endpoints:
    """The endpoint verbs of :class:`KubernetesBackend`: one Deployment per version, the
    router's weights in the ``airfleet-routes`` ConfigMap (manifests.py)."""

    def deploy_endpoint(self, cluster: Cluster, endpoint: EndpointVersion,
                        versions: list[EndpointVersion], ctx: BackendContext) -> None:
        kube, ns = self._kube(ctx), m.namespace_of(cluster.name)
        registry = ctx.clients.get("registry") or {}
        deployment = m.endpoint_deployment(cluster, endpoint,
                                           [m.PULL_SECRET] if registry.get("password") else [])
        routes = m.routes(cluster, versions)
        lacking = access.missing(kube, ns, access.required([deployment, routes], ()))
        if lacking:
            raise MissingPermissions(
                f"the kubeconfig's identity lacks {len(lacking)} permission(s) an endpoint "
                "needs: " + "; ".join(lacking) + ". Grant them and deploy again; nothing "
                "was changed")
        _refuse_foreign(kube.get("Deployment", deployment["metadata"]["name"], ns), endpoint)
        for obj in (deployment, routes):
            outcome = kube.ensure(obj)
            ctx.log.info("endpoint %s %s: %s %s/%s %s", endpoint.name, endpoint.spec.version,
                         obj["kind"], ns, outcome.name, outcome.action)

    def endpoint_ready(self, cluster: Cluster, endpoint: EndpointVersion,
                       ctx: BackendContext) -> EndpointObservation:
        """Ready as ``kubectl rollout status`` judges the version's Deployment."""
        kube, ns = self._kube(ctx), m.namespace_of(cluster.name)
        name = m.endpoint_deployment_name(endpoint)
        url = f"http://{m.ROUTER}.{ns}.svc/v1"
        live = kube.get("Deployment", name, ns)
        if live is None:
            return EndpointObservation(False, f"Deployment {ns}/{name} is missing", url=url)
        seen = rollout(live)
        status = live.get("status") or {}
        ready, wanted = status.get("readyReplicas") or 0, live["spec"].get("replicas", 1)
        message = (f"{ready}/{wanted} replicas ready; model {endpoint.spec.model.served} "
                   f"at {url} (weight {endpoint.spec.traffic_weight})") if seen.done             else seen.message
        return EndpointObservation(seen.done, message, ready, wanted, seen.failed, url)

    def delete_endpoint(self, cluster: Cluster, endpoints: list[EndpointVersion],
                        remaining: list[EndpointVersion], ctx: BackendContext) -> list[str]:
        """Route away first (the router stops sending to the versions), then delete their
        Deployments and wait until their pods are gone."""
        kube, ns = self._kube(ctx), m.namespace_of(cluster.name)
        kube.ensure(m.routes(cluster, remaining))
        left = []
        for endpoint in endpoints:
            name = m.endpoint_deployment_name(endpoint)
            live = kube.get("Deployment", name, ns)
            if live is not None:
                try:
                    _refuse_foreign(live, endpoint)
                except KubeError as exc:
                    left.append(f"{endpoint.spec.version}: {exc}")
                    continue
                kube.delete("Deployment", name, ns)
            selector = (f"{m.ENDPOINT_LABEL}={endpoint.name},"
                        f"{m.VERSION_LABEL}={endpoint.spec.version}")
            pods = kube.watch_until("Pod", ns, lambda items: not items, ENDPOINT_GONE_SECONDS,
                                    label_selector=selector)
            if pods:
                left.append(f"{endpoint.spec.version}: {len(pods)} pod(s) of Deployment "
                            f"{ns}/{name} still there after {ENDPOINT_GONE_SECONDS}s: "
                            + ", ".join(p["metadata"]["name"] for p in pods))
            else:
                ctx.log.info("endpoint %s %s: Deployment %s/%s and its pods are gone",
                             endpoint.name, endpoint.spec.version, ns, name)
        return left


def _refuse_foreign(live: dict[str, Any] | None, endpoint: EndpointVersion) -> None:
    """A Deployment of that name that is not this endpoint's is left alone."""
    if live is None:
        return
    labels = live["metadata"].get("labels") or {}
    if labels.get(m.ENDPOINT_LABEL) != endpoint.name or \
            labels.get(m.MANAGED_BY) != m.MANAGED_BY_VALUE:
        raise KubeError(f"Deployment {live['metadata']['name']} exists and is not endpoint "
                        f"{endpoint.name}'s; rename the endpoint or remove that Deployment")


class KubernetesBackend(_Endpoints, Backend):
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
        """What cannot change in place: a field Kubernetes keeps immutable on an object we
        made (a model cache PVC's storage class, access mode, a smaller size); and for a
        managed cluster where it lives, its roles and network, its Kubernetes version
        (upgrades are not done by Airfleet), and a node pool's instance types."""
        _refuse_immutable_changes(recorded, desired)
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

    def preflight(self, cluster: Cluster, ctx: BackendContext) -> None:
        """An existing cluster: its API answers and the kubeconfig's identity holds every
        permission the flow needs, so a missing one fails before anything is made. A cluster
        Airfleet provisions (eks, aks) is checked once it exists (:meth:`provision`)."""
        if cluster.spec.provider in CLOUDS:
            return
        try:
            self._check_access(self._kube(ctx), cluster, ctx)
        except (MissingPermissions, KubeError) as exc:
            raise InvalidRequest(f"cluster.spec.config.kubernetes.credential: {exc}") from None

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
        self._check_access(self._kube(ctx), cluster, ctx)
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
        self._check_access(kube, cluster, ctx)
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

    def _check_access(self, kube: Kube, cluster: Cluster, ctx: BackendContext) -> None:
        """The API answers and its identity holds every permission the cluster's objects
        need (:mod:`.access`); raises :class:`MissingPermissions` listing each one missing."""
        ns = m.namespace_of(cluster.name)
        ctx.log.info("Kubernetes API %s answers: version %s", kube.api_client.configuration.host,
                     kube.version())
        objects = m.desired_objects(cluster, ctx.clients.get("registry"))
        lacking = access.missing(kube, ns, access.required(objects, CLEANUP_KINDS))
        if lacking:
            raise MissingPermissions(
                f"the kubeconfig's identity lacks {len(lacking)} permission(s) Airfleet needs: "
                + "; ".join(lacking) + ". Grant them (a ClusterRole bound to that identity) "
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
        """Objects of ours in the namespace that the spec no longer asks for (the endpoints'
        are the endpoint flows' business)."""
        wanted = {(o["kind"], o["metadata"]["name"]) for o in desired}
        ns = m.namespace_of(cluster.name)
        return [(kind, item["metadata"]["name"]) for kind in CLEANUP_KINDS
                for item in kube.list(kind, ns, label_selector=m.selector(cluster.name))["items"]
                if (kind, item["metadata"]["name"]) not in wanted
                and (item["metadata"].get("labels") or {}).get(m.COMPONENT_LABEL)
                not in m.ENDPOINT_COMPONENTS]

    # ---- readiness and health ---------------------------------------------------------------

    def ready_timeout(self, cluster: Cluster) -> float:
        # The Deployments carry the same progressDeadlineSeconds: Kubernetes' own verdict on a
        # stuck rollout arrives before the wait gives up, so the failure names its reason.
        return float(m.kube_config(cluster).ready_timeout_seconds) + VERDICT_GRACE_SECONDS

    def wait_ready(self, cluster: Cluster, ctx: BackendContext, *,
                   timeout: float | None = None) -> Observation:
        """Watch the components until every rollout is done or one has failed (Kubernetes
        reports ProgressDeadlineExceeded), for up to ``timeout`` seconds (the spec's
        ``ready_timeout_seconds`` by default; 0 looks once)."""
        kube, ns = self._kube(ctx), m.namespace_of(cluster.name)
        wanted = m.components(cluster)
        seconds = self.ready_timeout(cluster) if timeout is None else timeout

        def settled(deployments: list[dict[str, Any]]) -> bool:
            return all(r.done or r.failed for r in _rollouts(wanted, deployments))

        items = kube.watch_until("Deployment", ns, settled, seconds,
                                 label_selector=m.selector(cluster.name))
        seen = _components_ready(wanted, _rollouts(wanted, items))
        if not seen.healthy and not any(r.failed for r in _rollouts(wanted, items)):
            seen.message = f"not rolled out after {seconds:g}s: {seen.message}"
        return seen

    def health(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        """API reachable, every component rolled out, and a node readiness summary."""
        kube, ns = self._kube(ctx), m.namespace_of(cluster.name)
        kube.version()
        nodes = [_node_status(n) for n in kube.list("Node")["items"]]
        ready = sum(n.phase == "Ready" for n in nodes)
        node_summary = f"nodes {ready}/{len(nodes)} Ready"
        deployments = kube.list("Deployment", ns, label_selector=m.selector(cluster.name))
        components = _components_ready(m.components(cluster),
                                       _rollouts(m.components(cluster), deployments["items"]))
        conditions = [*components.conditions,
                      Condition(type="NodesReady", status="True" if ready else "False",
                                reason="NodeReadiness", message=node_summary)]
        problems = ([components.message] if not components.healthy else []) + \
            ([] if ready else ["no node is Ready"])
        message = "; ".join(problems) if problems else f"components ready; {node_summary}"
        return Observation(not problems, message, nodes=nodes, conditions=conditions)

    # ---- onboarding -------------------------------------------------------------------------

    def query(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        """Discover an existing cluster read-only: access, permissions and nodes."""
        kube = self._kube(ctx)
        self._check_access(kube, cluster, ctx)
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
        cloud load balancer) without waiting: Kubernetes keeps it Terminating while it deletes
        the content, minutes on a real cluster, and the flow waits for that in Airflow's
        triggerer (:meth:`teardown_done`). :meth:`deprovision` then removes a managed cluster.
        Returns what cannot be removed (a namespace that is not ours; with ``force``, an API
        that does not answer); the flow decides what that means."""
        provisioner = self._provisioner(cluster, ctx)
        if provisioner is not None and not provisioner.exists():
            ctx.log.info("cluster %s: the %s cluster is gone, and its namespace with it",
                         cluster.name, cluster.spec.provider.value)
            return []
        try:
            return self._delete_namespace(cluster, ctx)
        except KubeError as exc:
            if not force:
                raise
            return [str(exc)]

    def teardown_timeout(self, cluster: Cluster) -> float:
        return float(NAMESPACE_GONE_SECONDS)

    def teardown_done(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        """Whether the namespace is gone; while it is not, what holds it (the namespace
        controller's conditions: content remaining, finalizers remaining)."""
        provisioner = self._provisioner(cluster, ctx)
        if provisioner is not None and not provisioner.exists():
            return Observation(True, f"the {cluster.spec.provider.value} cluster is gone")
        ns = m.namespace_of(cluster.name)
        live = self._kube(ctx).get("Namespace", ns)
        if live is None:
            return Observation(True, f"namespace {ns} is gone")
        held = [c.get("message", "") for c in (live.get("status") or {}).get("conditions") or []
                if c.get("type") in HOLDING and c.get("status") == "True"]
        phase = (live.get("status") or {}).get("phase", "Active")
        return Observation(False, f"namespace {ns} still {phase}"
                           + (": " + "; ".join(held) if held else ""))

    def _delete_namespace(self, cluster: Cluster, ctx: BackendContext) -> list[str]:
        kube, ns = self._kube(ctx), m.namespace_of(cluster.name)
        live = kube.get("Namespace", ns)
        if live is None:
            ctx.log.info("cluster %s: namespace %s is already gone", cluster.name, ns)
            return []
        if (live["metadata"].get("labels") or {}).get(m.CLUSTER_LABEL) != cluster.name:
            return [f"namespace {ns} is not Airfleet's (no {m.CLUSTER_LABEL}={cluster.name} "
                    "label): left alone"]
        if not live["metadata"].get("deletionTimestamp"):
            kube.delete("Namespace", ns)
        ctx.log.info("cluster %s: namespace %s is being deleted", cluster.name, ns)
        return []


def _components_ready(components: list[str], rollouts: list[Rollout]) -> Observation:
    """The ComponentsReady condition: True when every rollout is done; reason RolloutFailed
    when Kubernetes gave up on one, else RollingOut."""
    pending = _not_done(rollouts)
    if not pending:
        return Observation(True, f"{', '.join(components)} rolled out", conditions=[Condition(
            type=COMPONENTS_READY, status="True", reason="RolledOut",
            message="; ".join(components))])
    reason = "RolloutFailed" if any(r.failed for r in rollouts) else "RollingOut"
    return Observation(False, "; ".join(pending), conditions=[Condition(
        type=COMPONENTS_READY, status="False", reason=reason, message="; ".join(pending))])
