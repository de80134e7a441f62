"""Provisioning an EKS cluster and its node groups (a library layer over a boto3 EKS client).

Each step looks before it acts, so a retried or re-run flow converges instead of failing the
way ``EksCreateClusterOperator`` does once the cluster exists:

- The cluster carries Airfleet's ownership tags. One that exists with them is adopted; one
  without them is an error that changes nothing (it belongs to somebody else).
- Node groups are created when missing and their scaling converged when they exist; a GPU pool
  gets the taint ``nvidia.com/gpu=true:NoSchedule``, the label ``nvidia.com/gpu.present=true``
  and a GPU AMI.
- ``on_created`` is called as soon as each resource this run created exists, so the caller can
  record it and remove it if a later step fails.
- Teardown removes the node groups, then the cluster, and waits until they are gone; "already
  gone" is success.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from airfleet.backends.kubernetes.manifests import CLUSTER_LABEL, MANAGED_BY, MANAGED_BY_VALUE
from airfleet.errors import AirfleetError
from airfleet.resources import EKSConfig, NodePool

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"}
GPU_LABEL = {"nvidia.com/gpu.present": "true"}
GPU_AMI = "AL2023_x86_64_NVIDIA"
CPU_AMI = "AL2023_x86_64_STANDARD"
_EFFECTS = {"NoSchedule": "NO_SCHEDULE", "PreferNoSchedule": "PREFER_NO_SCHEDULE",
            "NoExecute": "NO_EXECUTE"}
WAIT_SECONDS = 1800  # EKS takes 10-15 minutes for a cluster, a few for a node group
POLL_SECONDS = 15.0


class EKSError(AirfleetError):
    """EKS refused a request or a resource ended in a failed state; the message says which."""


@dataclass
class ProvisionResult:
    created: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    endpoint: str | None = None
    ca_data: str | None = None


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


class EKSProvisioner:
    def __init__(self, client: Any, cfg: EKSConfig, cluster_name: str, *,
                 log: logging.Logger | None = None,
                 on_created: Callable[[str], None] = lambda what: None,
                 poll_seconds: float = POLL_SECONDS, wait_seconds: float = WAIT_SECONDS,
                 sleep: Callable[[float], None] = time.sleep):
        self.client, self.cfg, self.name = client, cfg, cluster_name
        self.log = log or logging.getLogger(__name__)
        self.on_created = on_created
        self.poll_seconds, self.wait_seconds, self.sleep = poll_seconds, wait_seconds, sleep

    @property
    def tags(self) -> dict[str, str]:
        return {**self.cfg.tags, MANAGED_BY: MANAGED_BY_VALUE, CLUSTER_LABEL: self.name}

    # ---- create or adopt ------------------------------------------------------------------

    def ensure(self) -> ProvisionResult:
        """The cluster and every node group of the spec, ACTIVE."""
        result = ProvisionResult()
        cluster = self._describe_cluster()
        if cluster is None:
            cluster = self._create_cluster()
            result.created.append(f"cluster {self.name}")
        else:
            self._check_ours(cluster)
            result.adopted.append(f"cluster {self.name}")
        cluster = self._wait_cluster("ACTIVE")
        for pool in self.cfg.node_pools:
            what = f"nodegroup {self.name}/{pool.name}"
            if self._describe_nodegroup(pool.name) is None:
                self._create_nodegroup(pool)
                result.created.append(what)
            else:
                self._converge_nodegroup(pool)
                result.adopted.append(what)
        for pool in self.cfg.node_pools:
            self._wait_nodegroup(pool.name, "ACTIVE")
        result.endpoint = cluster.get("endpoint")
        result.ca_data = (cluster.get("certificateAuthority") or {}).get("data")
        return result

    def _create_cluster(self) -> dict[str, Any]:
        cfg = self.cfg
        self.log.info("EKS cluster %s: creating (Kubernetes %s, %s)", self.name, cfg.version,
                      cfg.region)
        try:
            cluster = self.client.create_cluster(
                name=self.name, version=cfg.version, roleArn=cfg.role_arn, tags=self.tags,
                resourcesVpcConfig={"subnetIds": cfg.subnet_ids,
                                    "securityGroupIds": cfg.security_group_ids,
                                    "endpointPublicAccess": cfg.endpoint_public_access,
                                    "endpointPrivateAccess": cfg.endpoint_private_access},
            )["cluster"]
        except ClientError as exc:
            if _code(exc) != "ResourceInUseException":
                raise EKSError(f"EKS cluster {self.name}: create refused: {exc}") from None
            cluster = self._describe_cluster()  # created meanwhile (a retried request)
            self._check_ours(cluster)
            return cluster
        self.on_created(f"cluster {self.name}")
        return cluster

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
            return  # created meanwhile: converged on the next run
        self.on_created(f"nodegroup {self.name}/{pool.name}")

    def _converge_nodegroup(self, pool: NodePool) -> bool:
        """Scaling, labels and taints to the spec; False when nothing differed."""
        live = self._describe_nodegroup(pool.name)
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
        return True

    # ---- scale (update flow) ----------------------------------------------------------------

    def scale(self) -> list[str]:
        """Node groups to the spec: converge the listed ones, create the missing, delete the
        ones of ours the spec dropped. Returns what changed."""
        changed = []
        wanted = {p.name for p in self.cfg.node_pools}
        for pool in self.cfg.node_pools:
            if self._describe_nodegroup(pool.name) is None:
                self._create_nodegroup(pool)
                changed.append(f"nodegroup {pool.name} created")
            elif self._converge_nodegroup(pool):
                changed.append(f"nodegroup {pool.name} updated")
        for name in self._nodegroups():
            group = self._describe_nodegroup(name)
            if name not in wanted and group and \
                    (group.get("tags") or {}).get(CLUSTER_LABEL) == self.name:
                self._delete_nodegroup(name)
                changed.append(f"nodegroup {name} deleted")
        for pool in self.cfg.node_pools:
            self._wait_nodegroup(pool.name, "ACTIVE")
        return changed

    # ---- teardown ---------------------------------------------------------------------------

    def teardown(self, only: list[str] | None = None) -> list[str]:
        """Delete the node groups, then the cluster, and wait until they are gone. ``only``:
        just these resources (as ``on_created`` named them), for cleaning up after a failed
        create. Returns what is left (empty when clean)."""
        cluster = self._describe_cluster()
        if cluster is None:
            self.log.info("EKS cluster %s is already gone", self.name)
            return []
        self._check_ours(cluster)
        groups = [n for n in self._nodegroups()
                  if only is None or f"nodegroup {self.name}/{n}" in only]
        for name in groups:
            self._delete_nodegroup(name)
        try:
            for name in groups:
                self._wait_gone(lambda n=name: self._describe_nodegroup(n),
                                f"EKS node group {self.name}/{name}")
            if only is None or f"cluster {self.name}" in only:
                self.log.info("EKS cluster %s: deleting", self.name)
                try:
                    self.client.delete_cluster(name=self.name)
                except ClientError as exc:
                    if _code(exc) != "ResourceNotFoundException":
                        raise EKSError(f"EKS cluster {self.name}: delete refused: {exc}") \
                            from None
                self._wait_gone(self._describe_cluster, f"EKS cluster {self.name}")
        except EKSError as exc:
            return [str(exc)]
        return []

    def _delete_nodegroup(self, name: str) -> None:
        self.log.info("EKS node group %s/%s: deleting", self.name, name)
        try:
            self.client.delete_nodegroup(clusterName=self.name, nodegroupName=name)
        except ClientError as exc:
            if _code(exc) != "ResourceNotFoundException":
                raise EKSError(f"EKS node group {self.name}/{name}: delete refused: {exc}") \
                    from None

    # ---- reading and waiting ----------------------------------------------------------------

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

    def _wait_cluster(self, status: str) -> dict[str, Any]:
        return self._wait(self._describe_cluster, status, f"EKS cluster {self.name}")

    def _wait_nodegroup(self, name: str, status: str) -> dict[str, Any]:
        return self._wait(lambda: self._describe_nodegroup(name), status,
                          f"EKS node group {self.name}/{name}")

    def _wait(self, describe: Callable[[], dict | None], status: str, what: str) -> dict:
        deadline = time.monotonic() + self.wait_seconds
        while True:
            found = describe()
            state = (found or {}).get("status", "gone")
            if state == status:
                return found
            if state in ("FAILED", "CREATE_FAILED", "DELETE_FAILED", "DEGRADED", "gone"):
                issues = (found or {}).get("health", {}).get("issues") or []
                detail = "; ".join(f"{i.get('code')}: {i.get('message')}" for i in issues)
                raise EKSError(f"{what} is {state}" + (f": {detail}" if detail else ""))
            if time.monotonic() > deadline:
                raise EKSError(f"{what} still {state} after {self.wait_seconds:g}s")
            self.log.info("%s is %s; waiting for %s", what, state, status)
            self.sleep(self.poll_seconds)

    def _wait_gone(self, describe: Callable[[], Any], what: str) -> None:
        deadline = time.monotonic() + self.wait_seconds
        while describe() is not None:
            if time.monotonic() > deadline:
                raise EKSError(f"{what} still present after {self.wait_seconds:g}s")
            self.sleep(self.poll_seconds)
