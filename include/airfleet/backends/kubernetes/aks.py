"""Provisioning an AKS cluster and its agent pools (a library layer over a
``azure.mgmt.containerservice.ContainerServiceClient`` that the caller builds).

The work is done in reconcile passes: each looks before it acts and issues at most one write,
so a retried or re-run flow converges instead of failing:

- The managed cluster carries Airfleet's ownership tags. One that exists with them is adopted
  (and waited for, if an operation still runs on it); one without them is an error that changes
  nothing (it belongs to somebody else).
- The first non-GPU pool of the spec is the System pool, created with the cluster; the others
  are User pools, created one at a time afterwards (AKS refuses a second write on a cluster
  while an operation runs). A GPU pool gets the taint ``nvidia.com/gpu=true:NoSchedule`` and
  the label ``nvidia.com/gpu.present=true``. A pool autoscales when ``min != max``.
- ``on_created`` is called as soon as each resource this run created exists (its PUT was
  accepted), before the wait, so the caller can record it and remove it if a later step fails.
- A pass returns the :class:`~airfleet.backends.Wait` of its write; the flow follows the
  operation in Airflow's triggerer (an async client resumes it from its continuation token)
  and calls again.
- A long-running operation that ends Failed raises :class:`AKSError` with Azure's code and
  message; a resource left Failed is reconciled (PUT again as it is) by the next run.
- Teardown removes the User pools, then the cluster, and waits until they are gone; "already
  gone" is success.

Tag keys: Azure refuses ``<>%&\\?/`` in tag names (ARM ``InvalidTagNameCharacters``), so the
ownership labels of ``manifests`` become tag keys with ``/`` spelled ``_``
(``app.kubernetes.io_managed-by``, ``airfleet.io_cluster``), see :func:`azure_tag_key`.

Never logged: the admin kubeconfig (:meth:`AKSProvisioner.admin_kubeconfig` only returns it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.mgmt.core.polling.arm_polling import ARMPolling

from airfleet.backends import Wait
from airfleet.backends.kubernetes.manifests import CLUSTER_LABEL, MANAGED_BY, MANAGED_BY_VALUE
from airfleet.backends.kubernetes.provisioning import Provisioner
from airfleet.errors import AirfleetError
from airfleet.resources import AKSConfig, NodePool, Taint

_TAG_FORBIDDEN = re.compile(r"[<>%&\\?/]")


def azure_tag_key(label: str) -> str:
    """A Kubernetes label key as an Azure tag name: ``/`` (refused by ARM) becomes ``_``."""
    return label.replace("/", "_")


TAG_MANAGED_BY = azure_tag_key(MANAGED_BY)  # "app.kubernetes.io_managed-by"
TAG_CLUSTER = azure_tag_key(CLUSTER_LABEL)  # "airfleet.io_cluster"
GPU_TAINT = "nvidia.com/gpu=true:NoSchedule"
GPU_LABELS = {"nvidia.com/gpu.present": "true"}
# AKS: a Linux pool name is a lowercase letter then up to 11 lowercase letters or digits.
SYSTEM, USER = "System", "User"
# provisioningState values after which nothing runs on the resource any more.
SETTLED = frozenset({"Succeeded", "Failed", "Canceled"})
# Wait kinds: a long-running operation of this run (followed by its continuation token), and
# a resource busy with an operation somebody else started (followed by GETs).
OPERATION, SETTLED_KIND = "azure_operation", "aks_settled"
WAIT_SECONDS = 3600.0  # AKS takes 5-15 minutes for a cluster, a few for a pool
POLL_SECONDS = 15.0  # between GETs while waiting for an operation this run did not start



class AKSError(AirfleetError):
    """AKS refused a request, an operation ended Failed, or the spec cannot be provisioned.

    :param code: Azure's error code (``QuotaExceeded``, ``InvalidParameter``, ...); None when
        the error is Airfleet's own (a foreign cluster, a bad spec, a timeout).
    :param azure_message: Azure's error message, as Azure sent it.
    """

    def __init__(self, message: str, *, code: str | None = None,
                 azure_message: str | None = None):
        super().__init__(message)
        self.code = code
        self.azure_message = azure_message


def _taint(taint: Taint) -> str:
    """A taint as AKS's ``nodeTaints`` spell it: ``key=value:Effect`` (``key:Effect``)."""
    return f"{taint.key}={taint.value}:{taint.effect}" if taint.value else \
        f"{taint.key}:{taint.effect}"


def _text(value: Any) -> str:
    """A model field as its wire text (the SDK's enums print as ``AgentPoolMode.SYSTEM``)."""
    if isinstance(value, Enum):
        value = value.value
    return "" if value is None else str(value)


def provisioning_state(resource: Any) -> str:
    return _text(getattr(getattr(resource, "properties", None), "provisioning_state", None))


class AKSProvisioner(Provisioner):
    """Create or adopt, converge, and delete one AKS cluster of Airfleet's, in reconcile passes.

    Each pass (:meth:`reconcile`, :meth:`teardown_step`) issues at most one write (AKS refuses
    a second write on a cluster while an operation runs) and returns the :class:`Wait` for it:
    kind :data:`OPERATION` carries the poller's continuation token, which an async client
    resumes in Airflow's triggerer; kind :data:`SETTLED` waits for an operation that another
    run started. :meth:`ensure`, :meth:`scale` and :meth:`teardown` loop over passes in-process.

    :param client: a ``ContainerServiceClient`` for ``cfg.subscription_id`` (built by the hook
        that owns the Azure connection; its retry and polling settings are the caller's).
    :param cfg: the cluster's ``aks`` config block.
    :param cluster_name: the Airfleet cluster name, used as the AKS name and DNS prefix.
    :param log: where progress goes (never a credential).
    :param on_created: called with ``"managedCluster <name>"`` / ``"agentPool <name>/<pool>"``
        as soon as a resource this run created exists (``on_adopted``: one found).
    :param wait_seconds: budget of each wait for an operation.
    :param poll_seconds: pause between GETs while waiting for an operation that another run
        started (operations of this run are followed by the client's poller).
    """

    WAIT_SECONDS, POLL_SECONDS, error = WAIT_SECONDS, POLL_SECONDS, AKSError

    def __init__(self, client: Any, cfg: AKSConfig, cluster_name: str, **kwargs: Any):
        super().__init__(client, cfg, cluster_name, **kwargs)
        self.rg = cfg.resource_group

    @property
    def tags(self) -> dict[str, str]:
        return {**self.cfg.tags, TAG_MANAGED_BY: MANAGED_BY_VALUE, TAG_CLUSTER: self.name}

    @property
    def cluster_what(self) -> str:
        return f"managedCluster {self.name}"

    def pool_what(self, pool: str) -> str:
        return f"agentPool {self.name}/{pool}"

    # ---- reconcile passes -------------------------------------------------------------------

    def reconcile(self, *, create: bool = True, prune: bool = False) -> Wait | None:
        """One pass towards the cluster and every pool of the spec, Succeeded.

        :param create: create the cluster when it is missing (the update flow says False).
        :param prune: delete the pools of ours that the spec no longer lists (pools that are
            not Airfleet's are left alone and logged).
        """
        system = self._check_spec()
        cluster = self._get_cluster()
        if cluster is None:
            if not create:
                raise AKSError(f"AKS cluster {self.name} does not exist in resource group "
                               f"{self.rg}; create it first")
            return self._create_cluster(system)
        self._check_ours(cluster)
        self.on_adopted(self.cluster_what)
        if provisioning_state(cluster) not in SETTLED:
            return self._settled(f"AKS cluster {self.name}", provisioning_state(cluster))
        wait = self._converge_cluster(cluster)
        if wait is not None:
            return wait
        live = self._pools()
        for name, pool in live.items():
            if provisioning_state(pool) not in SETTLED:
                return self._settled(self.pool_what(name), provisioning_state(pool), pool=name)
        for pool in self.cfg.node_pools:
            if pool.name in live:
                self.on_adopted(self.pool_what(pool.name))
            wait = self._ensure_pool(pool, SYSTEM if pool is system else USER,
                                     live.get(pool.name))
            if wait is not None:
                return wait
        if prune:
            return self._prune_pools(live)
        return None

    def teardown_step(self, only: Collection[str] | None = None) -> Wait | None:
        """One pass of teardown: the User pools, then the cluster (which takes its System
        pool). ``only``: just these resources, named as ``on_created`` named them (cleanup of
        what a failed run created, e.g. only the pool it added to an adopted cluster).

        :raises AKSError: the cluster exists and is not Airfleet's (nothing is deleted).
        """
        cluster = self._get_cluster()
        if cluster is None:
            self.log.info("AKS cluster %s is gone", self.name)
            return None
        self._check_ours(cluster)
        if provisioning_state(cluster) not in SETTLED:
            return self._settled(f"AKS cluster {self.name}", provisioning_state(cluster))
        with_cluster = only is None or self.cluster_what in only
        # The cluster's delete takes its System pool(s); alone, the last one cannot go.
        for name, pool in self._pools().items():
            if (only is None or self.pool_what(name) in only) and \
                    not (with_cluster and _text(pool.properties.mode) == SYSTEM):
                if provisioning_state(pool) not in SETTLED:
                    return self._settled(self.pool_what(name), provisioning_state(pool), pool=name)
                return self._delete_pool(name)
        if not with_cluster:
            return None
        self.log.info("AKS cluster %s: deleting", self.name)
        return self._start("managed_clusters.begin_delete", f"AKS cluster {self.name}: delete")

    # ---- in-process waits ---------------------------------------------------------------------

    def _wait_inline(self, wait: Wait) -> None:
        if wait.kind == OPERATION:
            self._follow(resume_operation(self.client, wait.args), wait.what)
        else:
            self.sleep(self.poll_seconds)

    def endpoint(self) -> tuple[str | None, None]:
        cluster = self._get_cluster()
        return (cluster.properties.fqdn if cluster else None), None

    def _follow(self, poller: Any, what: str) -> Any:
        """The poller's result; an operation that ended Failed/Canceled is an AKSError with
        Azure's code and message."""
        with self._azure(what):
            resource = poller.result(timeout=self.wait_seconds)
        if not poller.done():
            raise AKSError(f"{what}: still {poller.status()} after {self.wait_seconds:g}s")
        return resource

    # ---- the cluster ------------------------------------------------------------------------

    def _check_spec(self) -> NodePool:
        """The System pool; an error naming the field for what AKS would refuse, before any
        call."""
        where = f"AKS cluster {self.name}"
        system = next((p for p in self.cfg.node_pools if not p.gpu), None)
        if system is None:
            raise AKSError(f"{where}: node_pools needs a pool with gpu: false (the first one "
                           "becomes the System pool, which AKS requires); nothing was changed")
        names = [p.name for p in self.cfg.node_pools]
        if len(set(names)) != len(names):
            raise AKSError(f"{where}: each node pool name may appear once")
        if system.desired < 1 or (system.min != system.max and system.min < 1):
            raise AKSError(f"{where}: the System pool {system.name} needs min and desired >= 1")
        for key, value in self.cfg.tags.items():
            if _TAG_FORBIDDEN.search(key) or not 0 < len(key) <= 512 or len(value) > 256:
                raise AKSError(f"{where}: tag {key!r} is invalid on Azure (names of 1-512 "
                               "characters without <>%&\\?/, values of at most 256)")
        return system

    def _create_cluster(self, system: NodePool) -> Wait:
        cfg = self.cfg
        self.log.info("AKS cluster %s: creating in %s/%s (Kubernetes %s, System pool %s)",
                      self.name, cfg.resource_group, cfg.location, cfg.version, system.name)
        body = {"location": cfg.location, "tags": self.tags,
                "identity": {"type": "SystemAssigned"},
                "properties": {"dnsPrefix": self.name, "kubernetesVersion": cfg.version,
                               "agentPoolProfiles": [
                                   {"name": system.name, **self._pool_properties(system, SYSTEM)}
                               ]}}
        wait = self._start("managed_clusters.begin_create_or_update",
                           f"AKS cluster {self.name}: create", body)
        self.on_created(self.cluster_what)
        self.on_created(self.pool_what(system.name))
        return wait

    def _check_ours(self, cluster: Any) -> None:
        tags = cluster.tags or {}
        if tags.get(TAG_MANAGED_BY) != MANAGED_BY_VALUE or tags.get(TAG_CLUSTER) != self.name:
            raise AKSError(
                f"AKS cluster {self.name} exists in resource group {self.rg} and is not "
                f"Airfleet's (no {TAG_MANAGED_BY}={MANAGED_BY_VALUE} and "
                f"{TAG_CLUSTER}={self.name} tags); onboard it as provider existing, or choose "
                "another name. Nothing was changed")

    def _converge_cluster(self, cluster: Any) -> Wait | None:
        """An adopted cluster: reconcile it if it was left Failed, add missing tags. No write
        when it already matches. Kubernetes upgrades are not done here."""
        props = cluster.properties
        live_tags = dict(cluster.tags or {})
        tags = {**live_tags, **self.tags}
        current = str(props.current_kubernetes_version or "")
        if self.cfg.version not in (props.kubernetes_version, current) and \
                not current.startswith(f"{self.cfg.version}."):
            self.log.warning("AKS cluster %s runs Kubernetes %s, the spec says %s: not "
                             "upgraded (upgrades are not part of provisioning)", self.name,
                             current or props.kubernetes_version, self.cfg.version)
        state = provisioning_state(cluster)
        if state != "Succeeded":
            # AKS reconciles a Failed/Canceled cluster on a PUT of what it is ("az aks update").
            self.log.info("AKS cluster %s is %s: reconciling it (PUT as it is)", self.name,
                          state)
            cluster.tags = tags
            return self._start("managed_clusters.begin_create_or_update",
                               f"AKS cluster {self.name}: reconcile", cluster)
        if tags != live_tags:
            self.log.info("AKS cluster %s: adding tags %s", self.name,
                          ", ".join(sorted(k for k in tags if live_tags.get(k) != tags[k])))
            return self._start("managed_clusters.begin_update_tags",
                               f"AKS cluster {self.name}: update tags", {"tags": tags})
        return None

    # ---- agent pools ------------------------------------------------------------------------

    def _pool_properties(self, pool: NodePool, mode: str) -> dict[str, Any]:
        """The wire properties of a pool as the spec wants it (new pools)."""
        labels = {**GPU_LABELS, **pool.labels} if pool.gpu else dict(pool.labels)
        taints = [_taint(t) for t in pool.taints]
        if pool.gpu and not any(t.key == "nvidia.com/gpu" for t in pool.taints):
            taints.append(GPU_TAINT)
        props: dict[str, Any] = {
            "mode": mode, "vmSize": pool.instance_types[0], "count": pool.desired,
            "enableAutoScaling": pool.min != pool.max, "type": "VirtualMachineScaleSets",
            "osType": "Linux", "nodeLabels": labels, "nodeTaints": taints, "tags": self.tags}
        if pool.min != pool.max:
            props.update(minCount=pool.min, maxCount=pool.max)
        return props

    def _ensure_pool(self, pool: NodePool, mode: str, live: Any | None) -> Wait | None:
        """Create the pool or converge it; the Wait of the write, None when it matched."""
        what = self.pool_what(pool.name)
        if live is None:
            props = self._pool_properties(pool, mode)
            self.log.info("%s: creating (%s %s, %s)", what, mode, props["vmSize"],
                          f"{pool.min}..{pool.max}, {pool.desired} now"
                          if props["enableAutoScaling"] else f"{pool.desired} nodes")
            wait = self._start("agent_pools.begin_create_or_update", f"{what}: create",
                               {"properties": props}, pool=pool.name)
            self.on_created(what)
            self.changes.append(f"{what} created")
            return wait
        changes = self._converge_pool(live, pool, mode)
        if not changes:
            return None
        self.log.info("%s: updating %s", what, "; ".join(changes))
        wait = self._start("agent_pools.begin_create_or_update", f"{what}: update", live,
                           pool=pool.name)
        self.changes.append(f"{what} updated: {'; '.join(changes)}")
        return wait

    def _converge_pool(self, live: Any, pool: NodePool, mode: str) -> list[str]:
        """Change ``live`` (the GET result, put back as a whole, as ``az aks nodepool update``
        does) to the spec; returns what differed."""
        want = self._pool_properties(pool, mode)
        props = live.properties
        changes: list[str] = []

        def change(attr: str, wire: str, new: Any) -> None:
            old = getattr(props, attr)
            if old != new:
                changes.append(f"{wire} {old} -> {new}")
                setattr(props, attr, new)

        if _text(props.vm_size).lower() != want["vmSize"].lower():
            raise AKSError(f"{self.pool_what(pool.name)} has VM size {props.vm_size}, the spec "
                           f"says {want['vmSize']}: AKS cannot change a pool's VM size; add a "
                           "pool under a new name and remove this one")
        if _text(props.mode) != mode:
            changes.append(f"mode {_text(props.mode)} -> {mode}")
            props.mode = mode
        autoscale = want["enableAutoScaling"]
        if bool(props.enable_auto_scaling) != autoscale:
            changes.append(f"enableAutoScaling {bool(props.enable_auto_scaling)} -> {autoscale}")
            props.enable_auto_scaling = autoscale
        if autoscale:
            change("min_count", "minCount", pool.min)
            change("max_count", "maxCount", pool.max)
            if not pool.min <= (props.count or 0) <= pool.max:  # else the autoscaler's count
                change("count", "count", pool.desired)
        else:
            props.min_count = props.max_count = None
            change("count", "count", pool.desired)
        if dict(props.node_labels or {}) != want["nodeLabels"]:
            changes.append(f"nodeLabels {dict(props.node_labels or {})} -> {want['nodeLabels']}")
            props.node_labels = want["nodeLabels"]
        if sorted(props.node_taints or []) != sorted(want["nodeTaints"]):
            changes.append(f"nodeTaints {list(props.node_taints or [])} -> {want['nodeTaints']}")
            props.node_taints = want["nodeTaints"]
        live_tags = dict(props.tags or {})
        if {**live_tags, **self.tags} != live_tags:
            changes.append("tags")
            props.tags = {**live_tags, **self.tags}
        state = provisioning_state(live)
        if state != "Succeeded" and not changes:
            changes.append(f"reconcile ({state})")
        return changes

    def _prune_pools(self, live: dict[str, Any]) -> Wait | None:
        wanted = {p.name for p in self.cfg.node_pools}
        for name, pool in live.items():
            if name in wanted:
                continue
            if not self._pool_is_ours(pool):
                self.log.info("%s is not in the spec and not Airfleet's: left alone",
                              self.pool_what(name))
                continue
            return self._delete_pool(name)
        return None

    def _pool_is_ours(self, pool: Any) -> bool:
        tags = pool.properties.tags or {}
        return tags.get(TAG_MANAGED_BY) == MANAGED_BY_VALUE and tags.get(TAG_CLUSTER) == self.name

    def _delete_pool(self, name: str) -> Wait:
        what = self.pool_what(name)
        self.log.info("%s: deleting", what)
        wait = self._start("agent_pools.begin_delete", f"{what}: delete", pool=name)
        self.changes.append(f"{what} deleted")
        return wait

    # ---- credentials ------------------------------------------------------------------------

    def admin_kubeconfig(self) -> bytes:
        """The cluster's admin kubeconfig (``listClusterAdminCredential``). Never logged."""
        cluster = self._get_cluster()
        if cluster is None:
            raise AKSError(f"AKS cluster {self.name} does not exist in resource group {self.rg}")
        self._check_ours(cluster)
        with self._azure(f"AKS cluster {self.name}: list admin credentials"):
            creds = self.client.managed_clusters.list_cluster_admin_credentials(
                self.rg, self.name)
        configs = list(creds.kubeconfigs or [])
        chosen = next((c for c in configs if c.name == "clusterAdmin"),
                      configs[0] if configs else None)
        if chosen is None or not chosen.value:
            raise AKSError(f"AKS cluster {self.name}: no admin kubeconfig was returned (local "
                           "accounts disabled?)")
        self.log.info("AKS cluster %s: admin kubeconfig fetched (%d bytes)", self.name,
                      len(chosen.value))
        return bytes(chosen.value)

    # ---- waits --------------------------------------------------------------------------------

    def _args(self, **more: Any) -> dict[str, Any]:
        return {"azure_conn_id": self.cfg.credential.airflow_conn_id,
                "subscription_id": self.cfg.subscription_id, "resource_group": self.rg,
                "cluster": self.name, "timeout": self.wait_seconds, **more}

    def _start(self, method: str, what: str, body: Any = None, *,
               pool: str | None = None) -> Wait:
        """Send a write (``method`` of the client, e.g. ``agent_pools.begin_delete``) without
        waiting for it, and return the Wait that follows it: the continuation token (the
        initial response's URL and body; azure-core keeps no Authorization header in it) lets
        a client in another process, the triggerer's async one, follow it to its end."""
        with self._azure(what):
            poller = _client_method(self.client, method)(
                *_operation_args(self.rg, self.name, pool, method, body), polling=_SendOnly())
        more = {"pool": pool} if pool else {}
        return Wait(OPERATION, what, self._args(operation=method,
                                                continuation_token=poller.continuation_token(),
                                                **more))

    def _settled(self, what: str, state: str, **more: Any) -> Wait:
        self.log.info("%s is %s (an operation runs on it); waiting", what, state)
        return Wait(SETTLED_KIND, f"{what} still {state}", self._args(**more))

    def _leftovers(self, only: Collection[str] | None) -> list[str]:
        try:
            if self._get_cluster() is None:
                return []
            present = [self.pool_what(n) for n in self._pools()]
        except AKSError:
            return [self.cluster_what] if only is None else list(only)
        wanted = present + [self.cluster_what]
        return [w for w in wanted if only is None or w in only]

    # ---- reading ----------------------------------------------------------------------------

    @contextmanager
    def _azure(self, what: str) -> Iterator[None]:
        """Azure's refusal as an AKSError with its code and message."""
        try:
            yield
        except HttpResponseError as exc:
            raise aks_error(what, exc) from None

    def exists(self) -> bool:
        return self._get_cluster() is not None

    def _get_cluster(self) -> Any | None:
        """The cluster, or None when it (or its resource group) does not exist."""
        with self._azure(f"AKS cluster {self.name}: read"):
            try:
                return self.client.managed_clusters.get(self.rg, self.name)
            except ResourceNotFoundError:
                return None

    def _get_pool(self, name: str) -> Any | None:
        with self._azure(f"{self.pool_what(name)}: read"):
            try:
                return self.client.agent_pools.get(self.rg, self.name, name)
            except ResourceNotFoundError:
                return None

    def _pools(self) -> dict[str, Any]:
        with self._azure(f"AKS cluster {self.name}: list agent pools"):
            return {p.name: p for p in self.client.agent_pools.list(self.rg, self.name)}



class _SendOnly(ARMPolling):
    """ARM's polling, stopped before it starts: the request is sent and its response read
    (so the continuation token can be made), but no thread polls in this process."""

    def finished(self) -> bool:
        return True


def resume_operation(client: Any, args: dict[str, Any]) -> Any:
    """Follow the operation of an :data:`OPERATION` Wait's ``args`` with ``client`` (sync: the
    poller; ``aio``: an awaitable of it)."""
    method = args["operation"]
    return _client_method(client, method)(
        *_operation_args(args["resource_group"], args["cluster"], args.get("pool"), method,
                         None), continuation_token=args["continuation_token"])


def _client_method(client: Any, dotted: str) -> Callable[..., Any]:
    group, name = dotted.split(".")
    return getattr(getattr(client, group), name)


def _operation_args(rg: str, cluster: str, pool: str | None, method: str,
                    body: Any) -> list[Any]:
    """The positional arguments of a ``begin_*`` method (a resumed one gets no body)."""
    return [rg, cluster, *([pool] if pool else []),
            *([] if method.endswith("begin_delete") else [body])]


def aks_error(what: str, exc: HttpResponseError) -> AKSError:
    """Azure's refusal (or a failed operation) as an AKSError: ``<what>: <code>: <message>``."""
    error = getattr(exc, "error", None)
    code = getattr(error, "code", None) or None
    message = getattr(error, "message", None) or exc.reason or str(exc)
    text = f"{what}: {code}: {message}" if code else f"{what}: {message}"
    return AKSError(text, code=code, azure_message=message)
