"""Provisioning an EKS cluster and its node groups (a library layer over a boto3 EKS client).

The work is done in reconcile passes (kopf's level-based style): each pass looks at what
exists, creates what is missing, converges what is ours, and returns the :class:`Wait` of
whatever is still in progress (a cluster CREATING, a node group UPDATING), or None once all is
ACTIVE. The flow waits in Airflow's triggerer and calls again; :meth:`EKSProvisioner.ensure`,
:meth:`~EKSProvisioner.scale` and :meth:`~EKSProvisioner.teardown` loop over passes in-process.
Because every pass starts from what EKS reports, a retried or re-run flow converges instead of
failing the way ``EksCreateClusterOperator`` does once the cluster exists:

- The cluster carries Airfleet's ownership tags. One that exists with them is adopted; one
  without them is an error that changes nothing (it belongs to somebody else).
- Node groups are created when missing and their scaling converged when they exist; a GPU pool
  gets the taint ``nvidia.com/gpu=true:NoSchedule``, the label ``nvidia.com/gpu.present=true``
  and a GPU AMI.
- ``on_created`` is called as soon as each resource this run created exists (``on_adopted``
  for one found), so the caller can record it and remove it if a later step fails.
- Teardown removes the node groups, then the cluster; "already gone" is success.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from botocore.exceptions import ClientError

from airfleet.backends import Wait
from airfleet.backends.kubernetes.manifests import CLUSTER_LABEL, MANAGED_BY, MANAGED_BY_VALUE
from airfleet.backends.kubernetes.provisioning import Provisioner
from airfleet.errors import AirfleetError
from airfleet.resources import NodePool

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"}
GPU_LABEL = {"nvidia.com/gpu.present": "true"}
GPU_AMI = "AL2023_x86_64_NVIDIA"
CPU_AMI = "AL2023_x86_64_STANDARD"
_EFFECTS = {"NoSchedule": "NO_SCHEDULE", "PreferNoSchedule": "PREFER_NO_SCHEDULE",
            "NoExecute": "NO_EXECUTE"}
WAIT_SECONDS = 1800  # EKS takes 10-15 minutes for a cluster, a few for a node group
POLL_SECONDS = 15.0
BUSY = frozenset({"CREATING", "UPDATING", "DELETING"})
BROKEN = frozenset({"FAILED", "CREATE_FAILED", "DELETE_FAILED", "DEGRADED"})

# Wait kinds (the plugin layer maps each to a trigger on the provider's EKS waiters).
CLUSTER_ACTIVE, NODEGROUP_ACTIVE = "eks_cluster_active", "eks_nodegroup_active"
CLUSTER_DELETED, NODEGROUP_DELETED = "eks_cluster_deleted", "eks_nodegroup_deleted"


class EKSError(AirfleetError):
    """EKS refused a request or a resource ended in a failed state; the message says which."""


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def _issues(resource: dict[str, Any]) -> str:
    issues = (resource.get("health") or {}).get("issues") or []
    return "; ".join(f"{i.get('code')}: {i.get('message')}" for i in issues)


class EKSProvisioner(Provisioner):
    """An EKS cluster and its node groups (see :class:`.provisioning.Provisioner`)."""

    WAIT_SECONDS, POLL_SECONDS, error = WAIT_SECONDS, POLL_SECONDS, EKSError

    @property
    def tags(self) -> dict[str, str]:
        return {**self.cfg.tags, MANAGED_BY: MANAGED_BY_VALUE, CLUSTER_LABEL: self.name}

    @property
    def cluster_what(self) -> str:
        return f"cluster {self.name}"

    def pool_what(self, pool: str) -> str:
        return f"nodegroup {self.name}/{pool}"

    # ---- reconcile passes -------------------------------------------------------------------

    def reconcile(self, *, create: bool = True, prune: bool = False) -> Wait | None:
        """One pass towards the cluster and every node group of the spec, ACTIVE.

        :param create: create the cluster when it is missing (the update flow says False).
        :param prune: delete node groups of ours that the spec no longer lists (update flow).
        """
        cluster = self._describe_cluster()
        if cluster is None:
            if not create:
                raise EKSError(f"EKS cluster {self.name} does not exist in {self.cfg.region}; "
                               "create it first")
            self._create_cluster()
            return self._wait(CLUSTER_ACTIVE, f"EKS cluster {self.name}", "CREATING")
        self._check_ours(cluster)
        self.on_adopted(self.cluster_what)
        state = cluster.get("status")
        if state == "DELETING":
            raise EKSError(f"EKS cluster {self.name} is being deleted; run the flow again once "
                           "it is gone")
        if state in BROKEN:
            raise EKSError(f"EKS cluster {self.name} is {state}: {_issues(cluster)}")
        if state != "ACTIVE":
            return self._wait(CLUSTER_ACTIVE, f"EKS cluster {self.name}", state)
        waits = [self._reconcile_pool(pool) for pool in self.cfg.node_pools]
        if prune:
            waits += self._prune_pools()
        return next((w for w in waits if w is not None), None)

    def _reconcile_pool(self, pool: NodePool) -> Wait | None:
        what = f"EKS node group {self.name}/{pool.name}"
        group = self._describe_nodegroup(pool.name)
        if group is None:
            self._create_nodegroup(pool)
            return self._wait(NODEGROUP_ACTIVE, what, "CREATING", nodegroup=pool.name)
        self.on_adopted(self.pool_what(pool.name))
        state = group.get("status")
        if state in BROKEN:
            raise EKSError(f"{what} is {state}: {_issues(group) or 'no health issue given'}")
        if state == "DELETING":
            raise EKSError(f"{what} is being deleted; run the flow again once it is gone")
        if state == "ACTIVE" and self._converge_nodegroup(pool, group):
            state = "UPDATING"
        if state != "ACTIVE":
            return self._wait(NODEGROUP_ACTIVE, what, state, nodegroup=pool.name)
        return None

    def _prune_pools(self) -> list[Wait]:
        wanted = {p.name for p in self.cfg.node_pools}
        waits = []
        for name in self._nodegroups():
            if name in wanted:
                continue
            group = self._describe_nodegroup(name)
            if group and (group.get("tags") or {}).get(CLUSTER_LABEL) == self.name:
                waits.append(self._delete_nodegroup(name, group))
        return waits

    def teardown_step(self, only: Collection[str] | None = None) -> Wait | None:
        """One pass of teardown: node groups first (EKS refuses to delete a cluster that has
        any), then the cluster. ``only``: just these resources, as ``on_created`` named them
        (the cleanup of a failed create); with the cluster among them, all its node groups go."""
        cluster = self._describe_cluster()
        if cluster is None:
            self.log.info("EKS cluster %s is gone", self.name)
            return None
        self._check_ours(cluster)
        with_cluster = only is None or self.cluster_what in only
        groups = [n for n in self._nodegroups() if with_cluster or self.pool_what(n) in only]
        waits = [self._delete_nodegroup(n) for n in groups]
        if waits:
            return waits[0]
        if not with_cluster:
            return None
        if cluster.get("status") != "DELETING":
            self.log.info("EKS cluster %s: deleting", self.name)
            try:
                self.client.delete_cluster(name=self.name)
            except ClientError as exc:
                if _code(exc) == "ResourceNotFoundException":
                    return None
                raise EKSError(f"EKS cluster {self.name}: delete refused: {exc}") from None
        return self._wait(CLUSTER_DELETED, f"EKS cluster {self.name}", "DELETING")

    # ---- writes -----------------------------------------------------------------------------

    def _create_cluster(self) -> None:
        cfg = self.cfg
        self.log.info("EKS cluster %s: creating (Kubernetes %s, %s)", self.name, cfg.version,
                      cfg.region)
        try:
            self.client.create_cluster(
                name=self.name, version=cfg.version, roleArn=cfg.role_arn, tags=self.tags,
                resourcesVpcConfig={"subnetIds": cfg.subnet_ids,
                                    "securityGroupIds": cfg.security_group_ids,
                                    "endpointPublicAccess": cfg.endpoint_public_access,
                                    "endpointPrivateAccess": cfg.endpoint_private_access})
        except ClientError as exc:
            if _code(exc) != "ResourceInUseException":
                raise EKSError(f"EKS cluster {self.name}: create refused: {exc}") from None
            self._check_ours(self._describe_cluster())  # created meanwhile (a retried request)
            return
        self.on_created(self.cluster_what)

    def _check_ours(self, cluster: dict[str, Any] | None) -> None:
        tags = (cluster or {}).get("tags") or {}
        if tags.get(MANAGED_BY) != MANAGED_BY_VALUE or tags.get(CLUSTER_LABEL) != self.name:
            raise EKSError(
                f"EKS cluster {self.name} exists in {self.cfg.region} and is not Airfleet's (no "
                f"{MANAGED_BY}={MANAGED_BY_VALUE} and {CLUSTER_LABEL}={self.name} tags); "
                "onboard it as provider existing, or choose another name. Nothing was changed")

    def _nodegroup_args(self, pool: NodePool) -> dict[str, Any]:
        taints = [{"key": t.key, "value": t.value, "effect": _EFFECTS[t.effect]}
                  for t in pool.taints]
        labels = dict(pool.labels)
        if pool.gpu:
            labels = {**GPU_LABEL, **labels}
            if not any(t["key"] == GPU_TAINT["key"] for t in taints):
                taints.append(GPU_TAINT)
        return {"scalingConfig": {"minSize": pool.min, "maxSize": pool.max,
                                  "desiredSize": pool.desired},
                "labels": labels, "taints": taints}

    def _create_nodegroup(self, pool: NodePool) -> None:
        self.log.info("EKS node group %s/%s: creating (%s, %d..%d, desired %d%s)", self.name,
                      pool.name, ", ".join(pool.instance_types), pool.min, pool.max,
                      pool.desired, ", GPU" if pool.gpu else "")
        try:
            self.client.create_nodegroup(
                clusterName=self.name, nodegroupName=pool.name, subnets=self.cfg.subnet_ids,
                instanceTypes=pool.instance_types, nodeRole=self.cfg.node_role_arn,
                amiType=pool.ami_type or (GPU_AMI if pool.gpu else CPU_AMI), tags=self.tags,
                **self._nodegroup_args(pool))
        except ClientError as exc:
            if _code(exc) != "ResourceInUseException":
                raise EKSError(f"EKS node group {self.name}/{pool.name}: create refused: "
                               f"{exc}") from None
            return  # created meanwhile: the next pass converges it
        self.on_created(self.pool_what(pool.name))
        self.changes.append(f"nodegroup {pool.name} created")

    def _converge_nodegroup(self, pool: NodePool, live: dict[str, Any]) -> bool:
        """Scaling, labels and taints to the spec; False when nothing differed."""
        want = self._nodegroup_args(pool)
        changes: dict[str, Any] = {}
        if live.get("scalingConfig") != want["scalingConfig"]:
            changes["scalingConfig"] = want["scalingConfig"]
        labels = live.get("labels") or {}
        if labels != want["labels"]:
            changes["labels"] = {"addOrUpdateLabels": want["labels"],
                                 "removeLabels": [k for k in labels if k not in want["labels"]]}
        taints = live.get("taints") or []
        if sorted(map(str, taints)) != sorted(map(str, want["taints"])):
            changes["taints"] = {"addOrUpdateTaints": want["taints"],
                                 "removeTaints": [t for t in taints if t not in want["taints"]]}
        if not changes:
            return False
        self.log.info("EKS node group %s/%s: updating %s", self.name, pool.name,
                      ", ".join(sorted(changes)))
        self.client.update_nodegroup_config(clusterName=self.name, nodegroupName=pool.name,
                                            **changes)
        self.changes.append(f"nodegroup {pool.name} updated")
        return True

    def _delete_nodegroup(self, name: str, group: dict[str, Any] | None = None) -> Wait:
        group = group or self._describe_nodegroup(name) or {}
        what = f"EKS node group {self.name}/{name}"
        if group.get("status") == "DELETE_FAILED":
            raise EKSError(f"{what} is DELETE_FAILED: {_issues(group)}")
        if group.get("status") != "DELETING":
            self.log.info("%s: deleting", what)
            try:
                self.client.delete_nodegroup(clusterName=self.name, nodegroupName=name)
            except ClientError as exc:
                if _code(exc) != "ResourceNotFoundException":
                    raise EKSError(f"{what}: delete refused: {exc}") from None
            self.changes.append(f"nodegroup {name} deleted")
        return self._wait(NODEGROUP_DELETED, what, "DELETING", nodegroup=name)

    # ---- reading ----------------------------------------------------------------------------

    def _wait(self, kind: str, what: str, state: str, **args: Any) -> Wait:
        self.log.info("%s is %s; waiting", what, state)
        return Wait(kind, f"{what} {state}", {"cluster": self.name, "region": self.cfg.region,
                                               "aws_conn_id": self.cfg.credential.airflow_conn_id,
                                               "timeout": self.wait_seconds, **args})

    def _describe_cluster(self) -> dict[str, Any] | None:
        try:
            return self.client.describe_cluster(name=self.name)["cluster"]
        except ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                return None
            raise

    def _describe_nodegroup(self, name: str) -> dict[str, Any] | None:
        try:
            return self.client.describe_nodegroup(clusterName=self.name,
                                                  nodegroupName=name)["nodegroup"]
        except ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                return None
            raise

    def _nodegroups(self) -> list[str]:
        try:
            return self.client.list_nodegroups(clusterName=self.name)["nodegroups"]
        except ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                return []
            raise

    def exists(self) -> bool:
        return self._describe_cluster() is not None

    def endpoint(self) -> tuple[str, str]:
        """The cluster's API endpoint and its CA (base64 PEM), for a token kubeconfig."""
        cluster = self._describe_cluster()
        if cluster is None:
            raise EKSError(f"EKS cluster {self.name} does not exist in {self.cfg.region}")
        return cluster["endpoint"], (cluster.get("certificateAuthority") or {}).get("data", "")

    def _leftovers(self, only: Collection[str] | None) -> list[str]:
        if not self.exists():
            return []
        present = [self.pool_what(n) for n in self._nodegroups()] + [self.cluster_what]
        return [w for w in present if only is None or w in only]
