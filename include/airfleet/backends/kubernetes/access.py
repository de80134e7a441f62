"""Every permission Airfleet needs in a cluster, derived from the objects it will make.

Kubernetes refuses to create a Role that grants what its creator does not hold (RBAC escalation
prevention, https://kubernetes.io/docs/reference/access-authn-authz/rbac/#privilege-escalation-prevention-and-bootstrapping),
so the check covers two things, both read off the manifests so neither can drift from them:

- what :class:`~airfleet.backends.kubernetes.kube.Kube` does to each kind it writes (read,
  apply, list for the sweep of stale objects, delete), plus the reads the flows make (nodes,
  the Deployments' watch);
- every verb on every resource that each Role among the objects grants.

Each permission is asked with a SelfSubjectAccessReview, a few at a time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from airfleet.backends.kubernetes.kube import KINDS, Kube

ACCESS_REVIEWS_AT_ONCE = 8
# What Kube.ensure does to an object it manages (a server-side apply is a "patch"; one that
# creates the object needs "create" too), and what the sweep of stale objects does.
WRITE_VERBS = ("get", "create", "patch", "delete")
SWEEP_VERBS = ("list", "delete")
# Reads beyond the objects: nodes (health, accelerators), the Deployments' list and watch.
READS = (("list", "Node"), ("list", "Deployment"), ("watch", "Deployment"))


class Permission(NamedTuple):
    verb: str
    group: str
    resource: str
    namespaced: bool

    def describe(self, namespace: str) -> str:
        scope = f"in namespace {namespace}" if self.namespaced else "cluster-wide"
        group = f"{self.group}/" if self.group else ""
        return f"{self.verb} {group}{self.resource} ({scope})"


def _of_kind(verb: str, kind: str) -> Permission:
    _, _, namespaced, group, resource = KINDS[kind]
    return Permission(verb, group, resource, namespaced)


def required(objects: list[dict[str, Any]], swept_kinds: tuple[str, ...]) -> list[Permission]:
    """What making ``objects`` (and sweeping ``swept_kinds`` of stale ones) takes, sorted."""
    needed = {_of_kind(verb, kind) for verb, kind in READS}
    needed |= {_of_kind(verb, o["kind"]) for o in objects for verb in WRITE_VERBS}
    needed |= {_of_kind(verb, kind) for kind in swept_kinds for verb in SWEEP_VERBS}
    for obj in objects:
        if obj["kind"] == "Role":  # what it grants, its creator must hold
            needed |= {Permission(verb, group, resource, True)
                       for rule in obj.get("rules", [])
                       for group in rule.get("apiGroups", [""])
                       for resource in rule.get("resources", [])
                       for verb in rule.get("verbs", [])}
    return sorted(needed)


def missing(kube: Kube, namespace: str, permissions: list[Permission]) -> list[str]:
    """Each permission the kubeconfig's identity lacks, described. One access review per
    permission (about 60), a few at a time: in sequence they cost seconds per flow."""
    def lacks(p: Permission) -> str | None:
        ns = namespace if p.namespaced else None
        return None if kube.can(p.verb, p.resource, p.group, ns) else p.describe(namespace)

    with ThreadPoolExecutor(max_workers=ACCESS_REVIEWS_AT_ONCE) as pool:
        return [m for m in pool.map(lacks, permissions) if m]
