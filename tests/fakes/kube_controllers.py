"""kube-controller-manager and the kubelet, as far as clients can see them, for the fake
Kubernetes API server (tests/fakes/kube_apiserver.py).

The server calls `Controllers.observe()` for every write it stores (what the informers' event
handlers see) and the work it queues runs at once, under the server's lock, before the write's
response is sent: a response already carries what the controllers made of it, where a real
cluster reports it a few milliseconds later. Timers stand in for time passing (pods starting,
progress deadlines, namespace deletion retries). Each controller follows the real one (paths in
kubernetes/kubernetes):

- Deployments (pkg/controller/deployment; https://kubernetes.io/docs/concepts/workloads/
  controllers/deployment/): one ReplicaSet per pod template, `<deployment>-<pod-template-hash>`,
  labelled and selected by `pod-template-hash`, owned by the Deployment, with the
  `deployment.kubernetes.io/revision` (and desired-replicas / max-replicas) annotations; rolling
  updates within maxSurge / maxUnavailable (25% each by default, surge rounded up, unavailable
  down), Recreate, proportional scaling, pause / resume, rollback to an earlier template (that
  ReplicaSet takes the newest revision), revisionHistoryLimit; status counts (zeros omitted) and
  the Available / Progressing conditions with the real reasons, messages and times, including
  ProgressDeadlineExceeded once progressDeadlineSeconds pass without progress.
- ReplicaSets (pkg/controller/replicaset): create and delete pods to match spec.replicas
  (not-ready pods go first), adopt orphans matching the selector; status counts from the pods,
  availability after minReadySeconds.
- The kubelet: `ready_delay` seconds after a ReplicaSet creates a pod it is Running and Ready;
  a pod of a Deployment in `never_ready` runs but never turns Ready (a failing readiness probe);
  a pod using an image in `bad_images` stays Pending in ImagePullBackOff. Pods are not bound
  to nodes, and a deleted pod goes at once (no graceful termination). Opt-in: a pod (created by
  anyone) using an image of the server's `run_images` is run as local processes by
  kube_kubelet.py instead, its status following the processes and their probes.
- The garbage collector (pkg/controller/garbagecollector): deleting an owner deletes its
  dependents (background propagation), or strips their ownerReferences when the delete asks
  for `propagationPolicy: Orphan`.
- Namespaces (pkg/controller/namespace/deletion): `terminate_delay` after a Namespace is marked
  Terminating, its content is deleted (objects with finalizers get a deletionTimestamp and
  stay), the five deletion conditions are written, and the pass is retried until nothing is
  left; then the `kubernetes` finalizer is dropped and the Namespace goes. The real controller
  retries after 8 s while finalizers hold content; this one retries sooner (at most
  `NAMESPACE_RETRY_CAP` apart).

Not modelled: Events, the ReplicaFailure condition, pod scheduling and graceful termination,
the deprecated spec.rollbackTo, deployment status `terminatingReplicas` (alpha in 1.33).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
DESIRED_REPLICAS = "deployment.kubernetes.io/desired-replicas"
MAX_REPLICAS = "deployment.kubernetes.io/max-replicas"
HASH_LABEL = "pod-template-hash"
# never copied between a Deployment and its ReplicaSets (deployment_util.go annotationsToSkip)
ANNOTATIONS_TO_SKIP = frozenset({
    "kubectl.kubernetes.io/last-applied-configuration", REVISION, REVISION_HISTORY,
    DESIRED_REPLICAS, MAX_REPLICAS, "deprecated.deployment.rollback.to"})
MAX_REV_HISTORY_CHARS = 2000  # the deployment controller's cap on revision-history
MAX_INT32 = 2**31 - 1  # progressDeadlineSeconds / revisionHistoryLimit meaning "no limit"
SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand
BURST_REPLICAS = 500  # pods a ReplicaSet creates in one sync
PROGRESSING, AVAILABLE = "Progressing", "Available"
NAMESPACE_FINALIZER = "kubernetes"
NAMESPACE_RETRY_CAP = 1.0  # seconds between namespace deletion passes, at most
# the namespace deleter's condition types, in its order, with the reason / message of "all well"
NAMESPACE_CONDITIONS = {
    "NamespaceDeletionDiscoveryFailure":
        ("ResourcesDiscovered", "All resources successfully discovered"),
    "NamespaceDeletionGroupVersionParsingFailure":
        ("ParsedGroupVersions", "All legacy kube types successfully parsed"),
    "NamespaceDeletionContentFailure":
        ("ContentDeleted", "All content successfully deleted, may be waiting on finalization"),
    "NamespaceContentRemaining": ("ContentRemoved", "All content successfully removed"),
    "NamespaceFinalizersRemaining": ("ContentRemoved", "All content successfully removed"),
}


class Conflict(Exception):
    """A write based on a stale object: the controller's sync is retried, as a real one is
    requeued after a 409 from the API server."""


# --- small helpers ----------------------------------------------------------------------------

def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(stamp: str | None) -> float:
    if not stamp:
        return 0.0
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def labels_of(obj: dict) -> dict:
    return obj["metadata"].get("labels") or {}


def annotations_of(obj: dict) -> dict:
    return obj["metadata"].get("annotations") or {}


def deleting(obj: dict) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


def replicas_of(obj: dict | None) -> int:
    """spec.replicas (defaulted to 1 by the API server)."""
    return 0 if obj is None else (obj.get("spec") or {}).get("replicas", 1)


def count(obj: dict | None, field: str) -> int:
    return 0 if obj is None else (obj.get("status") or {}).get(field, 0)


def by_creation(obj: dict) -> tuple[str, str]:
    """controller.ReplicaSetsByCreationTimestamp: oldest first, the name breaks ties."""
    return obj["metadata"].get("creationTimestamp", ""), obj["metadata"]["name"]


def active(replica_sets: list[dict | None]) -> list[dict]:
    """controller.FilterActiveReplicaSets: those asked for at least one pod."""
    return [rs for rs in replica_sets if rs is not None and replicas_of(rs) > 0]


def controller_ref(obj: dict) -> dict | None:
    return next((r for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")),
                None)


def owned_by(obj: dict, owner: dict) -> bool:
    ref = controller_ref(obj)
    return ref is not None and ref.get("uid") == owner["metadata"]["uid"]


def new_controller_ref(owner: dict) -> dict:
    m = owner["metadata"]
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": m["name"],
            "uid": m["uid"], "controller": True, "blockOwnerDeletion": True}


def set_owner_references(obj: dict, refs: list[dict]) -> None:
    """Set them; an empty list is omitted (omitempty), as the real server returns it."""
    if refs:
        obj["metadata"]["ownerReferences"] = refs
    else:
        obj["metadata"].pop("ownerReferences", None)


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """metav1.LabelSelectorAsSelector: no selector selects nothing, an empty one everything."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}.get(op, False)
        if not ok:
            return False
    return True


def semantic(value: Any) -> Any:
    """What apiequality.Semantic compares: null, {} and [] are the same as an absent field."""
    if isinstance(value, dict):
        pruned = {k: semantic(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v is not None and v != {} and v != []}
    if isinstance(value, list):
        return [semantic(v) for v in value]
    return value


def without_hash(template: dict) -> dict:
    template = copy.deepcopy(template or {})
    (template.get("metadata") or {}).get("labels", {}).pop(HASH_LABEL, None)
    return semantic(template)


def equal_ignore_hash(a: dict, b: dict) -> bool:
    """deployment_util.EqualIgnoreHash: the same pod template but for pod-template-hash."""
    return without_hash(a) == without_hash(b)


def template_hash(template: dict, collision_count: int | None) -> str:
    """controller.ComputeHash: FNV-32a of the pod template (and collisionCount), its decimal
    digits spelt in the safe alphabet (rand.SafeEncodeString): "66b6c48dd5" and the like."""
    data = json.dumps(semantic(template), sort_keys=True, separators=(",", ":")).encode()
    if collision_count:
        data += collision_count.to_bytes(8, "little")
    value = 0x811C9DC5
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return "".join(SAFE_ALPHABET[ord(digit) % len(SAFE_ALPHABET)] for digit in str(value))


def random_suffix(length: int = 5) -> str:
    return "".join(random.choices(SAFE_ALPHABET, k=length))


# --- conditions -------------------------------------------------------------------------------

def new_condition(kind: str, status: str, reason: str, message: str) -> dict:
    stamp = now()
    return {"type": kind, "status": status, "lastUpdateTime": stamp, "lastTransitionTime": stamp,
            "reason": reason, "message": message}


def get_condition(status: dict, kind: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), None)


def set_condition(status: dict, condition: dict) -> None:
    """deployment_util.SetDeploymentCondition: the same status and reason is no change; the
    same status keeps its lastTransitionTime; the new condition goes last."""
    current = get_condition(status, condition["type"])
    if current and current["status"] == condition["status"] \
            and current.get("reason") == condition.get("reason"):
        return
    if current and current["status"] == condition["status"]:
        condition = {**condition, "lastTransitionTime": current["lastTransitionTime"]}
    remove_condition(status, condition["type"])
    status["conditions"] = [*status.get("conditions", []), condition]


def remove_condition(status: dict, kind: str) -> None:
    status["conditions"] = [c for c in status.get("conditions") or [] if c.get("type") != kind]


# --- Deployment arithmetic (deployment_util.go) -----------------------------------------------

def default_deployment(obj: dict) -> None:
    """The apps/v1 defaults the API server fills in (SetDefaults_Deployment)."""
    spec = obj.setdefault("spec", {})
    if spec.get("replicas") is None:
        spec["replicas"] = 1
    if not isinstance(spec.get("strategy"), dict):
        spec["strategy"] = {}
    strategy = spec["strategy"]
    if not strategy.get("type"):
        strategy["type"] = "RollingUpdate"
    if strategy["type"] == "RollingUpdate":
        if not isinstance(strategy.get("rollingUpdate"), dict):
            strategy["rollingUpdate"] = {}
        strategy["rollingUpdate"].setdefault("maxUnavailable", "25%")
        strategy["rollingUpdate"].setdefault("maxSurge", "25%")
    if spec.get("revisionHistoryLimit") is None:
        spec["revisionHistoryLimit"] = 10
    if spec.get("progressDeadlineSeconds") is None:
        spec["progressDeadlineSeconds"] = 600


def scaled_value(value: int | str | None, total: int, *, round_up: bool) -> int:
    """intstr.GetScaledValueFromIntOrPercent: an int as is, "25%" of `total` rounded."""
    if value is None:
        return 0
    if isinstance(value, str) and value.endswith("%"):
        share = int(value[:-1]) * total / 100
        return math.ceil(share) if round_up else math.floor(share)
    return int(value)


def rolling_update(d: dict) -> dict | None:
    strategy = d["spec"].get("strategy") or {}
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        return None
    return strategy.get("rollingUpdate") or {}


def fenceposts(d: dict) -> tuple[int, int]:
    """ResolveFenceposts: maxSurge rounded up, maxUnavailable down; never both zero."""
    rolling, desired = rolling_update(d) or {}, replicas_of(d)
    surge = scaled_value(rolling.get("maxSurge"), desired, round_up=True)
    unavailable = scaled_value(rolling.get("maxUnavailable"), desired, round_up=False)
    return surge, 1 if surge == 0 and unavailable == 0 else unavailable


def max_surge(d: dict) -> int:
    return 0 if rolling_update(d) is None else fenceposts(d)[0]


def max_unavailable(d: dict) -> int:
    if rolling_update(d) is None or replicas_of(d) == 0:
        return 0
    return min(fenceposts(d)[1], replicas_of(d))


def has_progress_deadline(d: dict) -> bool:
    return d["spec"].get("progressDeadlineSeconds") not in (None, MAX_INT32)


def revision(obj: dict) -> int:
    try:
        return int(annotations_of(obj).get(REVISION, "0"))
    except ValueError:
        return 0


def new_rs_new_replicas(d: dict, all_rs: list[dict], new_rs: dict) -> int:
    """NewRSNewReplicas: how far the new ReplicaSet may grow now."""
    if rolling_update(d) is None:
        return replicas_of(d)
    most = replicas_of(d) + scaled_value(rolling_update(d).get("maxSurge"), replicas_of(d),
                                         round_up=True)
    current = sum(replicas_of(rs) for rs in all_rs)
    if current >= most:
        return replicas_of(new_rs)
    return replicas_of(new_rs) + min(most - current, replicas_of(d) - replicas_of(new_rs))


def set_replicas_annotations(rs: dict, desired: int, most: int) -> bool:
    annotations = rs["metadata"].setdefault("annotations", {})
    wanted = {DESIRED_REPLICAS: str(desired), MAX_REPLICAS: str(most)}
    changed = any(annotations.get(k) != v for k, v in wanted.items())
    annotations.update(wanted)
    return changed


def set_new_rs_annotations(d: dict, rs: dict, new_revision: str, *, exists: bool) -> bool:
    """SetNewReplicaSetAnnotations: copy the Deployment's annotations, raise the revision (an
    existing ReplicaSet taking a new revision is a rollback: its old one goes to the history)."""
    annotations = rs["metadata"].setdefault("annotations", {})
    changed = False
    for key, value in annotations_of(d).items():
        if key not in ANNOTATIONS_TO_SKIP and annotations.get(key) != value:
            annotations[key], changed = value, True
    old = annotations.get(REVISION)
    if old is not None and not old.isdigit():
        return changed
    if int(old or 0) < int(new_revision):
        annotations[REVISION], changed = new_revision, True
        if old is not None:
            _append_revision_history(annotations, old)
    if not exists:
        changed |= set_replicas_annotations(rs, replicas_of(d), replicas_of(d) + max_surge(d))
    return changed


def _append_revision_history(annotations: dict, old: str) -> None:
    history = [r for r in annotations.get(REVISION_HISTORY, "").split(",") if r]
    while history and len(",".join([*history, old])) > MAX_REV_HISTORY_CHARS:
        history.pop(0)
    annotations[REVISION_HISTORY] = ",".join([*history, old])


def set_deployment_revision(d: dict, value: str) -> bool:
    annotations = d["metadata"].setdefault("annotations", {})
    if annotations.get(REVISION) == value:
        return False
    annotations[REVISION] = value
    return True


def calculate_status(all_rs: list[dict], new_rs: dict | None, d: dict) -> dict:
    """sync.go calculateStatus: counts from the ReplicaSets (zeros omitted, as the real
    server's omitempty does), the Available condition from maxUnavailable."""
    old = d.get("status") or {}
    available = sum(count(rs, "availableReplicas") for rs in all_rs)
    counts = {"observedGeneration": d["metadata"].get("generation", 1),
              "replicas": sum(count(rs, "replicas") for rs in all_rs),
              "updatedReplicas": count(new_rs, "replicas"),
              "readyReplicas": sum(count(rs, "readyReplicas") for rs in all_rs),
              "availableReplicas": available,
              "unavailableReplicas": max(sum(replicas_of(rs) for rs in all_rs) - available, 0)}
    status: dict[str, Any] = {k: v for k, v in counts.items() if v}
    status["conditions"] = copy.deepcopy(old.get("conditions") or [])
    if "collisionCount" in old:
        status["collisionCount"] = old["collisionCount"]
    if available >= replicas_of(d) - max_unavailable(d):
        set_condition(status, new_condition(AVAILABLE, "True", "MinimumReplicasAvailable",
                                            "Deployment has minimum availability."))
    else:
        set_condition(status, new_condition(AVAILABLE, "False", "MinimumReplicasUnavailable",
                                            "Deployment does not have minimum availability."))
    return status


def deployment_complete(d: dict, status: dict) -> bool:
    want = replicas_of(d)
    return (status.get("updatedReplicas", 0) == want and status.get("replicas", 0) == want
            and status.get("availableReplicas", 0) == want
            and status.get("observedGeneration", 0) >= d["metadata"].get("generation", 1))


def deployment_progressing(d: dict, new: dict) -> bool:
    """New pods scaled up, ready or available, or old ones scaled down, since the last status."""
    old = d.get("status") or {}

    def old_pods(s: dict) -> int:
        return s.get("replicas", 0) - s.get("updatedReplicas", 0)

    return (new.get("updatedReplicas", 0) > old.get("updatedReplicas", 0)
            or old_pods(new) < old_pods(old)
            or new.get("readyReplicas", 0) > old.get("readyReplicas", 0)
            or new.get("availableReplicas", 0) > old.get("availableReplicas", 0))


def deployment_timed_out(d: dict, status: dict) -> bool:
    condition = get_condition(status, PROGRESSING)
    if not has_progress_deadline(d) or condition is None \
            or condition.get("reason") == "NewReplicaSetAvailable":
        return False
    if condition.get("reason") == "ProgressDeadlineExceeded":
        return True
    deadline = epoch(condition.get("lastUpdateTime")) + d["spec"]["progressDeadlineSeconds"]
    return deadline < time.time()


def round_half_away(value: float) -> int:  # integer.RoundToInt32
    return int(value - 0.5) if value < 0 else int(value + 0.5)


def rs_proportion(rs: dict, d: dict, to_add: int, added: int) -> int:
    """GetReplicaSetProportion: this ReplicaSet's share of a scaling mid-rollout."""
    if replicas_of(rs) == 0 or to_add == 0 or to_add == added:
        return 0
    fraction, allowed = _rs_fraction(rs, d), to_add - added
    return min(fraction, allowed) if to_add > 0 else max(fraction, allowed)


def _rs_fraction(rs: dict, d: dict) -> int:
    if replicas_of(d) == 0:
        return -replicas_of(rs)
    try:
        before = int(annotations_of(rs).get(MAX_REPLICAS, "0"))
    except ValueError:
        before = 0
    before = before or count(d, "replicas")
    if before == 0:
        return 0
    most = replicas_of(d) + max_surge(d)
    return round_half_away(replicas_of(rs) * most / before) - replicas_of(rs)


def clean_status(status: dict) -> dict:
    return {k: v for k, v in status.items() if k != "conditions" or v}


# --- pods -------------------------------------------------------------------------------------

def is_ready(pod: dict) -> bool:
    condition = get_condition(pod.get("status") or {}, "Ready")
    return condition is not None and condition.get("status") == "True"


def ready_since(pod: dict) -> float:
    return epoch((get_condition(pod.get("status") or {}, "Ready") or {}).get("lastTransitionTime"))


def is_available(pod: dict, min_ready: int, at: float) -> bool:
    """podutil.IsPodAvailable: Ready for at least minReadySeconds."""
    return is_ready(pod) and (min_ready == 0 or ready_since(pod) + min_ready < at)


def is_active(pod: dict) -> bool:
    return not deleting(pod) and (pod.get("status") or {}).get("phase") not in ("Succeeded",
                                                                                   "Failed")


def deletion_rank(pod: dict) -> tuple:
    """controller.ActivePodsWithRanks, less node co-location: pending before running, not
    ready before ready, lower controller.kubernetes.io/pod-deletion-cost first, recently
    ready before long ready, newer before older."""
    phase = {"Pending": 0, "Unknown": 1, "Running": 2}.get((pod.get("status") or {})
                                                           .get("phase", ""), 0)
    try:
        cost = int(annotations_of(pod).get("controller.kubernetes.io/pod-deletion-cost", "0"))
    except ValueError:
        cost = 0
    return (phase, is_ready(pod), cost, -ready_since(pod),
            -epoch(pod["metadata"].get("creationTimestamp")), pod["metadata"]["name"])


def qos_class(spec: dict) -> str:
    containers = [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    for r in resources:
        limits = r.get("limits") or {}
        requests = {**limits, **(r.get("requests") or {})}
        if any(k not in limits or str(requests[k]) != str(limits[k]) for k in ("cpu", "memory")):
            return "Burstable"
    return "Guaranteed"


def pod_from_template(rs: dict) -> dict:
    """controller.GetPodFromTemplate: the template's labels, annotations, finalizers and spec,
    owned by the ReplicaSet, named by generateName."""
    template, m = rs["spec"].get("template") or {}, rs["metadata"]
    template_meta = template.get("metadata") or {}
    metadata = {"name": f"{m['name']}-{random_suffix()}", "generateName": f"{m['name']}-",
                "namespace": m["namespace"], "labels": dict(template_meta.get("labels") or {}),
                "ownerReferences": [new_controller_ref(rs)]}
    for field in ("annotations", "finalizers"):
        if template_meta.get(field):
            metadata[field] = copy.deepcopy(template_meta[field])
    spec = copy.deepcopy(template.get("spec") or {})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec,
            "status": {"phase": "Pending", "qosClass": qos_class(spec)}}


def pod_status(pod: dict, outcome: str, ip: str) -> dict:
    """What the kubelet reports once it tried to start `pod`: "ready", "unready" (running, its
    readiness probe failing) or "pull-failed" (ImagePullBackOff)."""
    stamp, ready = now(), outcome == "ready"
    containers = (pod.get("spec") or {}).get("containers") or []
    names = " ".join(c.get("name", "") for c in containers)
    not_ready = {} if ready else {"reason": "ContainersNotReady",
                                  "message": f"containers with unready status: [{names}]"}
    conditions = [{"type": kind, "status": "True" if ok else "False", "lastProbeTime": None,
                   "lastTransitionTime": stamp, **({} if ok else not_ready)}
                  for kind, ok in (("PodReadyToStartContainers", True), ("Initialized", True),
                                   ("Ready", ready), ("ContainersReady", ready),
                                   ("PodScheduled", True))]
    return {"phase": "Pending" if outcome == "pull-failed" else "Running",
            "conditions": conditions, "podIP": ip, "podIPs": [{"ip": ip}], "startTime": stamp,
            "containerStatuses": [_container_status(c, outcome, stamp) for c in containers],
            "qosClass": qos_class(pod.get("spec") or {})}


def _container_status(container: dict, outcome: str, stamp: str) -> dict:
    image = container.get("image", "")
    status = {"name": container.get("name", ""), "image": image, "restartCount": 0,
              "lastState": {}}
    if outcome == "pull-failed":
        return {**status, "imageID": "", "ready": False, "started": False, "state": {
            "waiting": {"reason": "ImagePullBackOff",
                        "message": f'Back-off pulling image "{image}"'}}}
    digest = hashlib.sha256(image.encode()).hexdigest()
    return {**status, "imageID": f"{image.split(':')[0]}@sha256:{digest}",
            "containerID": f"containerd://{uuid.uuid4().hex}{uuid.uuid4().hex}",
            "ready": outcome == "ready", "started": True,
            "state": {"running": {"startedAt": stamp}}}


def images_of(spec: dict) -> set[str]:
    return {c.get("image", "") for c in [*(spec.get("containers") or []),
                                          *(spec.get("initContainers") or [])]}


def claim(owner: dict, candidates: list[dict], write: Callable[[dict, dict], dict]) -> list[dict]:
    """ControllerRefManager: the candidates `owner` controls, adopting the orphans its selector
    matches and releasing those it no longer matches (`write(old, new)` stores a change)."""
    selector, owned = (owner.get("spec") or {}).get("selector"), []
    for obj in candidates:
        matches, ref = selector_matches(selector, labels_of(obj)), controller_ref(obj)
        if ref is not None and owned_by(obj, owner):
            if matches or deleting(owner):
                owned.append(obj)
            else:
                write(obj, _with_owner(obj, owner, adopt=False))
        elif ref is None and matches and not deleting(owner) and not deleting(obj):
            owned.append(write(obj, _with_owner(obj, owner, adopt=True)))
    return owned


def _with_owner(obj: dict, owner: dict, *, adopt: bool) -> dict:
    new = copy.deepcopy(obj)
    refs = [r for r in new["metadata"].get("ownerReferences") or []
            if r.get("uid") != owner["metadata"]["uid"]]
    set_owner_references(new, [*refs, new_controller_ref(owner)] if adopt else refs)
    return new


# --- the store, as the controllers' client sees it --------------------------------------------

class Store:
    """Reads and writes of the fake's store, under its lock; writes based on a stale object
    raise Conflict, as the API server answers 409."""

    def __init__(self, server: Any, resource_for: Callable[[str], Any]):
        self.server, self.resource_for = server, resource_for

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        return self.server._objects[self.resource_for(kind)].get((namespace, name))

    def list(self, kind: str, namespace: str) -> list[dict]:
        objects = self.server._objects[self.resource_for(kind)]
        return [objects[k] for k in sorted(objects) if k[0] == namespace]

    def namespaced(self, namespace: str) -> Iterator[tuple[Any, dict]]:
        for res, objects in self.server._objects.items():
            if res.namespaced:
                yield from ((res, objects[k]) for k in sorted(objects) if k[0] == namespace)

    def uid_exists(self, namespace: str, uid: str) -> bool:
        return any(o["metadata"].get("uid") == uid for _, o in self.namespaced(namespace))

    def create(self, obj: dict) -> tuple[dict | None, str]:
        """Create as a controller does: refused in a namespace that is gone or terminating."""
        res, m = self.resource_for(obj["kind"]), obj["metadata"]
        ns = self.get("Namespace", "", m["namespace"])
        if ns is None:
            return None, f'namespaces "{m["namespace"]}" not found'
        if deleting(ns):
            return None, (f'{res.qualified} "{m["name"]}" is forbidden: unable to create new '
                          f'content in namespace {m["namespace"]} because it is being terminated')
        self.server._insert(res, obj, via_api=False)
        return self.get(obj["kind"], m["namespace"], m["name"]), ""

    def current(self, old: dict) -> dict:
        m = old["metadata"]
        current = self.get(old["kind"], m.get("namespace", ""), m["name"])
        if current is None or current["metadata"]["resourceVersion"] != m["resourceVersion"]:
            raise Conflict(f'{old["kind"]} {m["name"]} changed')
        return current

    def update(self, old: dict, new: dict) -> dict:
        """A write of the main resource (generation bumped on a spec change)."""
        current = self.current(old)
        self.server._replace(self.resource_for(old["kind"]), current, new)
        return self.get(old["kind"], old["metadata"].get("namespace", ""),
                        old["metadata"]["name"]) or new

    def put(self, old: dict, new: dict) -> dict:
        """A write of status (or metadata) that leaves the generation alone."""
        current = self.current(old)
        if new == current:
            return current
        self.server._put(self.resource_for(old["kind"]), new, current)
        return new

    def delete(self, res: Any, obj: dict) -> None:
        """Delete, or only mark deleted while finalizers remain."""
        if not obj["metadata"].get("finalizers"):
            self.server._remove(res, obj)
        elif not deleting(obj):
            marked = copy.deepcopy(obj)
            marked["metadata"]["deletionTimestamp"] = now()
            self.server._put(res, marked, obj)

    def remove(self, res: Any, obj: dict) -> None:
        self.server._remove(res, obj)


# --- the controllers --------------------------------------------------------------------------

class Controllers:
    """The work queue all controllers share; `observe` is the informers' event handler."""

    MAX_ITEMS_PER_DRAIN = 20000  # a ping-pong between controllers is a bug: stop and say so

    def __init__(self, server: Any, resource_for: Callable[[str], Any]):
        self.server = server
        self.store = Store(server, resource_for)
        self._queue: dict[tuple, None] = {}  # ordered and deduplicated, as a workqueue
        self._draining = False
        self._suspended = False
        self.deployments = DeploymentController(self)
        self.replicasets = ReplicaSetController(self)
        self.kubelet = Kubelet(self)
        from tests.fakes.kube_kubelet import PodProcesses  # it imports this module's helpers
        self.processes = PodProcesses(server, self.store)
        self.gc = GarbageCollector(self)
        self.namespaces = NamespaceController(self)
        self._handlers: dict[str, Callable[..., None]] = {
            "deployment": self.deployments.sync, "replicaset": self.replicasets.sync,
            "kubelet": self.kubelet.start, "gc": self.gc.sync,
            "namespace": self.namespaces.sync}

    def reset(self) -> None:
        self._queue.clear()
        self.deployments.reset()
        self.kubelet.reset()
        self.namespaces.reset()

    # --- events in, work out ------------------------------------------------------------------

    def observe(self, event: str, res: Any, obj: dict, prev: dict | None) -> None:
        if res.kind == "Pod":  # even when suspended: a purged pod's processes must stop
            self.processes.observe(event, obj)
        if self._suspended:
            return
        for item in self._work_for(event, res.kind, obj, prev):
            self.enqueue(*item)
        self.drain()

    def _work_for(self, event: str, kind: str, obj: dict, prev: dict | None) -> list[tuple]:
        m = obj["metadata"]
        ns, name = m.get("namespace", ""), m["name"]
        work: list[tuple] = [("gc", ns, m["uid"])] if event == "DELETED" and ns else []
        changed = event == "ADDED" or (event == "MODIFIED" and not _status_only(obj, prev))
        if kind == "Deployment" and changed:
            work.append(("deployment", ns, name))
        elif kind == "ReplicaSet":
            work += [("replicaset", ns, name)] if changed else []
            work += self._owners_of(obj, prev, "Deployment", "deployment")
        elif kind == "Pod":
            work += self._owners_of(obj, prev, "ReplicaSet", "replicaset")
        elif kind == "Namespace" and event != "DELETED" and deleting(obj):
            self.namespaces.terminating(name)
        return work

    def _owners_of(self, obj: dict, prev: dict | None, kind: str, work: str) -> list[tuple]:
        """The controller of the object (before and after the change), or for an orphan every
        controller whose selector matches it (it may adopt it)."""
        ns = obj["metadata"].get("namespace", "")
        refs = [r for o in (obj, prev) if o for r in [controller_ref(o)] if r]
        if refs:
            return [(work, ns, r["name"]) for r in refs if r.get("kind") == kind]
        return [(work, ns, o["metadata"]["name"]) for o in self.store.list(kind, ns)
                if selector_matches((o.get("spec") or {}).get("selector"), labels_of(obj))]

    def enqueue(self, *item: Any) -> None:
        self._queue[item] = None

    def drain(self) -> None:
        """Run queued work until there is none left (nested calls just queue)."""
        if self._draining:
            return
        self._draining = True
        try:
            for _ in range(self.MAX_ITEMS_PER_DRAIN):
                if not self._queue:
                    return
                self._run(next(iter(self._queue)))
            log.error("fake kube controllers: work did not settle; dropped %s", list(self._queue))
            self._queue.clear()
        finally:
            self._draining = False

    def _run(self, item: tuple) -> None:
        del self._queue[item]
        try:
            self._handlers[item[0]](*item[1:])
        except Conflict:
            self.enqueue(*item)  # requeued, as after a 409
        except Exception:  # a bug in the fake: log it, keep the API answering
            log.exception("fake kube controller failed on %s", item)

    def later(self, delay: float, *item: Any) -> None:
        """Queue `item` after `delay` seconds (the server's timers; reset() cancels them)."""
        self.server._later(max(delay, 0.0), self._fire, item)

    def _fire(self, item: tuple) -> None:
        self.enqueue(*item)
        self.drain()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """No controller reacts meanwhile (the Python state method deleting a namespace)."""
        self._suspended = True
        try:
            yield
        finally:
            self._suspended = False


def _status_only(obj: dict, prev: dict | None) -> bool:
    """Only status (or resourceVersion / managedFields) changed: the controllers that own the
    status ignore it. A client writing a Deployment's status keeps it until the next sync
    (the real controller would overwrite it at once)."""
    def rest(o: dict) -> dict:
        m = {k: v for k, v in o["metadata"].items() if k not in ("resourceVersion",
                                                                  "managedFields")}
        return {**{k: v for k, v in o.items() if k != "status"}, "metadata": m}

    return prev is not None and rest(obj) == rest(prev)


class DeploymentController:
    """pkg/controller/deployment (deployment_controller.go, sync.go, rolling.go, recreate.go,
    progress.go)."""

    def __init__(self, controllers: Controllers):
        self.c, self.store = controllers, controllers.store
        self._checks: set[tuple] = set()  # progress checks already timed

    def reset(self) -> None:
        self._checks.clear()

    def sync(self, namespace: str, name: str) -> None:
        """syncDeployment."""
        stored = self.store.get("Deployment", namespace, name)
        if stored is None:
            return
        d = copy.deepcopy(stored)
        rs_list = self._claim(d)
        if deleting(d):
            return self._sync_status_only(d, rs_list)
        self._check_paused_conditions(d)
        if d["spec"].get("paused") or self._is_scaling_event(d, rs_list):
            return self._sync(d, rs_list)
        if rolling_update(d) is None:
            return self._rollout_recreate(d, rs_list)
        return self._rollout_rolling(d, rs_list)

    # --- ReplicaSets of a Deployment ----------------------------------------------------------

    def _claim(self, d: dict) -> list[dict]:
        """getReplicaSetsForDeployment."""
        return claim(d, self.store.list("ReplicaSet", d["metadata"]["namespace"]),
                     self.store.update)

    def _all_rs(self, d: dict, rs_list: list[dict], *,
                create: bool) -> tuple[dict | None, list[dict]]:
        """getAllReplicaSetsAndSyncRevision: the new ReplicaSet (the one with the
        Deployment's template; created if asked) and the old ones."""
        existing = next((rs for rs in sorted(rs_list, key=by_creation)
                         if equal_ignore_hash(rs["spec"].get("template"),
                                              d["spec"].get("template"))), None)
        old = [rs for rs in rs_list if rs is not existing]
        new_revision = str(max((revision(rs) for rs in old), default=0) + 1)
        if existing is not None:
            return self._sync_new_rs(d, existing, new_revision), old
        return (self._create_new_rs(d, old, new_revision) if create else None), old

    def _sync_new_rs(self, d: dict, existing: dict, new_revision: str) -> dict:
        rs = copy.deepcopy(existing)
        annotated = set_new_rs_annotations(d, rs, new_revision, exists=True)
        min_ready = d["spec"].get("minReadySeconds", 0)
        if annotated or rs["spec"].get("minReadySeconds", 0) != min_ready:
            _set_or_drop(rs["spec"], "minReadySeconds", min_ready)
            return self.store.update(existing, rs)
        needs_update = set_deployment_revision(d, annotations_of(rs).get(REVISION, ""))
        status = d.setdefault("status", {})
        if has_progress_deadline(d) and get_condition(status, PROGRESSING) is None:
            set_condition(status, new_condition(PROGRESSING, "True", "FoundNewReplicaSet",
                                                f'Found new replica set "{rs["metadata"]["name"]}"'))
            needs_update = True
        if needs_update:
            self._update_status(d)
        return existing

    def _create_new_rs(self, d: dict, old: list[dict], new_revision: str) -> dict | None:
        status = d.setdefault("status", {})
        rs = self._new_rs_object(d, status.get("collisionCount"))
        rs["spec"]["replicas"] = new_rs_new_replicas(d, [*old, rs], rs)
        set_new_rs_annotations(d, rs, new_revision, exists=False)
        m = rs["metadata"]
        clash = self.store.get("ReplicaSet", m["namespace"], m["name"])
        if clash is not None and not (owned_by(clash, d) and equal_ignore_hash(
                clash["spec"].get("template"), d["spec"].get("template"))):
            status["collisionCount"] = status.get("collisionCount", 0) + 1  # a hash collision
            self._update_status(d)
            raise Conflict("pod-template-hash collision")
        created, error = (clash, "") if clash is not None else self.store.create(rs)
        if created is None:  # e.g. the namespace is terminating
            if has_progress_deadline(d):
                set_condition(status, new_condition(
                    PROGRESSING, "False", "ReplicaSetCreateError",
                    f'Failed to create new replica set "{m["name"]}": {error}'))
                self._update_status(d)
            return None
        needs_update = set_deployment_revision(d, new_revision)
        if has_progress_deadline(d) and clash is None:
            set_condition(status, new_condition(PROGRESSING, "True", "NewReplicaSetCreated",
                                                f'Created new replica set "{m["name"]}"'))
            needs_update = True
        if needs_update:
            self._update_status(d)
        return created

    @staticmethod
    def _new_rs_object(d: dict, collisions: int | None) -> dict:
        template = copy.deepcopy(d["spec"].get("template") or {})
        pod_hash = template_hash(template, collisions)
        template_meta = template.get("metadata") or {}
        template["metadata"] = template_meta
        template_meta["labels"] = {**(template_meta.get("labels") or {}), HASH_LABEL: pod_hash}
        selector = copy.deepcopy(d["spec"].get("selector") or {})
        selector["matchLabels"] = {**(selector.get("matchLabels") or {}), HASH_LABEL: pod_hash}
        m = d["metadata"]
        spec = {"replicas": 0, "selector": selector, "template": template}
        _set_or_drop(spec, "minReadySeconds", d["spec"].get("minReadySeconds", 0))
        return {"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {"name": f"{m['name']}-{pod_hash}", "namespace": m["namespace"],
                             "labels": dict(template_meta["labels"]),
                             "ownerReferences": [new_controller_ref(d)]},
                "spec": spec}

    def _scale_rs(self, rs: dict, size: int, d: dict, *, if_needed: bool = True) -> bool:
        """scaleReplicaSet(AndRecordEvent): set the size and the replicas annotations;
        True when the size changed."""
        if if_needed and replicas_of(rs) == size:
            return False
        new = copy.deepcopy(rs)
        annotated = set_replicas_annotations(new, replicas_of(d), replicas_of(d) + max_surge(d))
        if replicas_of(rs) == size and not annotated:
            return False
        new["spec"]["replicas"] = size
        self.store.update(rs, new)
        return replicas_of(rs) != size

    def _update_status(self, d: dict) -> None:
        """UpdateStatus with the Deployment as this sync read it: a second write in one sync
        conflicts and the sync runs again, as in the real controller."""
        new = copy.deepcopy(self.store.current(d))
        new["status"] = clean_status(copy.deepcopy(d.get("status") or {}))
        if annotations_of(d):
            new["metadata"]["annotations"] = copy.deepcopy(annotations_of(d))
        self.store.put(d, new)

    # --- the kinds of sync --------------------------------------------------------------------

    def _sync_status_only(self, d: dict, rs_list: list[dict]) -> None:
        new_rs, old = self._all_rs(d, rs_list, create=False)
        self._sync_deployment_status([*old, *([new_rs] if new_rs else [])], new_rs, d)

    def _check_paused_conditions(self, d: dict) -> None:
        """Progressing Unknown while paused, so a pause never counts against the deadline."""
        status = d.setdefault("status", {})
        current = get_condition(status, PROGRESSING)
        if not has_progress_deadline(d) or (current or {}).get("reason") == \
                "ProgressDeadlineExceeded":
            return
        paused_shown = (current or {}).get("reason") == "DeploymentPaused"
        if d["spec"].get("paused") and not paused_shown:
            set_condition(status, new_condition(PROGRESSING, "Unknown", "DeploymentPaused",
                                                "Deployment is paused"))
        elif not d["spec"].get("paused") and paused_shown:
            set_condition(status, new_condition(PROGRESSING, "Unknown", "DeploymentResumed",
                                                "Deployment is resumed"))
        else:
            return
        self._update_status(d)

    def _is_scaling_event(self, d: dict, rs_list: list[dict]) -> bool:
        """An active ReplicaSet was made for another spec.replicas than the current one."""
        new_rs, old = self._all_rs(d, rs_list, create=False)
        for rs in active([*old, new_rs]):
            desired = annotations_of(rs).get(DESIRED_REPLICAS, "")
            if desired.isdigit() and int(desired) != replicas_of(d):
                return True
        return False

    def _sync(self, d: dict, rs_list: list[dict]) -> None:
        """sync: a scaling event or a paused Deployment, no rollout."""
        new_rs, old = self._all_rs(d, rs_list, create=False)
        self._scale(d, new_rs, old)
        if d["spec"].get("paused"):
            self._cleanup(old, d)
        self._sync_deployment_status([*old, *([new_rs] if new_rs else [])], new_rs, d)

    def _scale(self, d: dict, new_rs: dict | None, old: list[dict]) -> None:
        """scale: the one active ReplicaSet takes the new size; mid-rollout every active one
        takes its proportion."""
        if (only := _active_or_latest(new_rs, old)) is not None:
            self._scale_rs(only, replicas_of(d), d)
        elif _saturated(d, new_rs):
            for rs in active(old):
                self._scale_rs(rs, 0, d)
        elif rolling_update(d) is not None:
            self._scale_proportionally(d, active([*old, new_rs]))

    def _scale_proportionally(self, d: dict, all_rs: list[dict]) -> None:
        allowed = replicas_of(d) + max_surge(d) if replicas_of(d) > 0 else 0
        to_add = allowed - sum(replicas_of(rs) for rs in all_rs)
        newer_first = to_add > 0  # ties: scale newer ones up first, older ones down first
        all_rs = sorted(all_rs, key=by_creation, reverse=newer_first)
        all_rs.sort(key=lambda rs: -replicas_of(rs))
        sizes, added = [], 0
        for rs in all_rs:
            share = rs_proportion(rs, d, to_add, added) if to_add else 0
            sizes.append(replicas_of(rs) + share)
            added += share
        for i, rs in enumerate(all_rs):
            size = max(sizes[i] + to_add - added, 0) if i == 0 and to_add else sizes[i]
            self._scale_rs(rs, size, d, if_needed=False)

    def _rollout_rolling(self, d: dict, rs_list: list[dict]) -> None:
        new_rs, old = self._all_rs(d, rs_list, create=True)
        if new_rs is None:
            return
        all_rs = [*old, new_rs]
        if self._reconcile_new_rs(all_rs, new_rs, d) \
                or self._reconcile_old_rss(all_rs, active(old), new_rs, d):
            return self._sync_rollout_status(all_rs, new_rs, d)
        if deployment_complete(d, d.get("status") or {}):
            self._cleanup(old, d)
        self._sync_rollout_status(all_rs, new_rs, d)

    def _reconcile_new_rs(self, all_rs: list[dict], new_rs: dict, d: dict) -> bool:
        if replicas_of(new_rs) >= replicas_of(d):
            return self._scale_rs(new_rs, replicas_of(d), d)
        return self._scale_rs(new_rs, new_rs_new_replicas(d, all_rs, new_rs), d)

    def _reconcile_old_rss(self, all_rs: list[dict], old: list[dict], new_rs: dict,
                           d: dict) -> bool:
        """Scale old ReplicaSets down only as far as maxUnavailable allows, unhealthy
        replicas first."""
        if sum(replicas_of(rs) for rs in old) == 0:
            return False
        min_available = replicas_of(d) - max_unavailable(d)
        new_unavailable = replicas_of(new_rs) - count(new_rs, "availableReplicas")
        most = sum(replicas_of(rs) for rs in all_rs) - min_available - new_unavailable
        if most <= 0:
            return False
        old, cleaned = self._cleanup_unhealthy(old, d, most)
        return cleaned + self._scale_down_old(old, [*old, new_rs], d) > 0

    def _cleanup_unhealthy(self, old: list[dict], d: dict,
                           most: int) -> tuple[list[dict], int]:
        old, total = sorted(old, key=by_creation), 0
        for i, rs in enumerate(old):
            unhealthy = replicas_of(rs) - count(rs, "availableReplicas")
            if total >= most:
                break
            if replicas_of(rs) == 0 or unhealthy <= 0:
                continue
            scaled_down = min(most - total, unhealthy)
            self._scale_rs(rs, replicas_of(rs) - scaled_down, d)
            old[i] = self.store.get("ReplicaSet", rs["metadata"]["namespace"],
                                    rs["metadata"]["name"]) or rs
            total += scaled_down
        return old, total

    def _scale_down_old(self, old: list[dict], all_rs: list[dict], d: dict) -> int:
        min_available = replicas_of(d) - max_unavailable(d)
        available = sum(count(rs, "availableReplicas") for rs in all_rs)
        if available <= min_available:
            return 0
        total, wanted = 0, available - min_available
        for rs in sorted(old, key=by_creation):
            if total >= wanted:
                break
            if replicas_of(rs) == 0:
                continue
            scaled_down = min(replicas_of(rs), wanted - total)
            self._scale_rs(rs, replicas_of(rs) - scaled_down, d)
            total += scaled_down
        return total

    def _rollout_recreate(self, d: dict, rs_list: list[dict]) -> None:
        """Recreate: every old pod gone before the new ReplicaSet is created and scaled up."""
        new_rs, old = self._all_rs(d, rs_list, create=False)
        all_rs = [*old, *([new_rs] if new_rs else [])]
        scaled_down = [self._scale_rs(rs, 0, d) for rs in active(old)]
        if any(scaled_down) or self._old_pods_running(new_rs, old):
            return self._sync_rollout_status(all_rs, new_rs, d)
        if new_rs is None:
            new_rs, old = self._all_rs(d, rs_list, create=True)
            if new_rs is None:
                return
            all_rs = [*old, new_rs]
        self._scale_rs(new_rs, replicas_of(d), d)
        if deployment_complete(d, d.get("status") or {}):
            self._cleanup(old, d)
        self._sync_rollout_status(all_rs, new_rs, d)

    def _old_pods_running(self, new_rs: dict | None, old: list[dict]) -> bool:
        if sum(count(rs, "replicas") for rs in old) > 0:
            return True
        old_uids = {rs["metadata"]["uid"] for rs in old}
        return any((controller_ref(p) or {}).get("uid") in old_uids
                   and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
                   for p in self.store.list("Pod", self._ns(new_rs, old)))

    @staticmethod
    def _ns(new_rs: dict | None, old: list[dict]) -> str:
        some = new_rs or (old[0] if old else None)
        return some["metadata"]["namespace"] if some else ""

    def _cleanup(self, old: list[dict], d: dict) -> None:
        """cleanupDeployment: keep revisionHistoryLimit old ReplicaSets, delete the oldest
        revisions among the empty ones."""
        limit = d["spec"].get("revisionHistoryLimit")
        if limit in (None, MAX_INT32):
            return
        alive = [rs for rs in old if not deleting(rs)]
        alive.sort(key=lambda rs: (revision(rs), *by_creation(rs)))
        for rs in alive[:max(len(alive) - limit, 0)]:
            if count(rs, "replicas") or replicas_of(rs) \
                    or rs["metadata"].get("generation", 1) > count(rs, "observedGeneration"):
                continue
            self.store.delete(self.store.resource_for("ReplicaSet"), rs)

    # --- status -------------------------------------------------------------------------------

    def _sync_deployment_status(self, all_rs: list[dict], new_rs: dict | None, d: dict) -> None:
        status = calculate_status(all_rs, new_rs, d)
        if status != (d.get("status") or {}):
            d["status"] = status
            self._update_status(d)

    def _sync_rollout_status(self, all_rs: list[dict], new_rs: dict | None, d: dict) -> None:
        """syncRolloutStatus: the Progressing condition (progress.go)."""
        status = calculate_status(all_rs, new_rs, d)
        if not has_progress_deadline(d):
            remove_condition(status, PROGRESSING)
        current = get_condition(d.get("status") or {}, PROGRESSING)
        done_before = status.get("replicas", 0) == status.get("updatedReplicas", 0) \
            and (current or {}).get("reason") == "NewReplicaSetAvailable"
        if has_progress_deadline(d) and not done_before:
            self._progress(d, status, new_rs, current)
        remove_condition(status, "ReplicaFailure")
        self._check_progress_later(d, status)
        if status != (d.get("status") or {}):
            d["status"] = status
            self._update_status(d)

    @staticmethod
    def _progress(d: dict, status: dict, new_rs: dict | None, current: dict | None) -> None:
        what = f'ReplicaSet "{new_rs["metadata"]["name"]}"' if new_rs \
            else f'Deployment "{d["metadata"]["name"]}"'
        if deployment_complete(d, status):
            set_condition(status, new_condition(PROGRESSING, "True", "NewReplicaSetAvailable",
                                                f"{what} has successfully progressed."))
        elif deployment_progressing(d, status):
            condition = new_condition(PROGRESSING, "True", "ReplicaSetUpdated",
                                      f"{what} is progressing.")
            if current is not None:  # progress refreshes lastUpdateTime, even for one reason
                if current["status"] == "True":
                    condition["lastTransitionTime"] = current["lastTransitionTime"]
                remove_condition(status, PROGRESSING)
            set_condition(status, condition)
        elif deployment_timed_out(d, status):
            set_condition(status, new_condition(PROGRESSING, "False", "ProgressDeadlineExceeded",
                                                f"{what} has timed out progressing."))

    def _check_progress_later(self, d: dict, status: dict) -> None:
        """requeueStuckDeployment: look again when the progress deadline passes."""
        current = get_condition(status, PROGRESSING)
        if not has_progress_deadline(d) or current is None or deployment_complete(d, status) \
                or current.get("reason") == "ProgressDeadlineExceeded":
            return
        due = epoch(current.get("lastUpdateTime")) + d["spec"]["progressDeadlineSeconds"]
        key = (d["metadata"]["namespace"], d["metadata"]["name"], due)
        if key not in self._checks:
            self._checks.add(key)
            self.c.later(due - time.time() + 0.05, "deployment", *key[:2])


def _set_or_drop(spec: dict, field: str, value: int) -> None:
    if value:
        spec[field] = value
    else:
        spec.pop(field, None)


def _active_or_latest(new_rs: dict | None, old: list[dict]) -> dict | None:
    """FindActiveOrLatest: the only active ReplicaSet, or the newest when none is active."""
    if new_rs is None and not old:
        return None
    old = sorted(old, key=by_creation, reverse=True)
    live = active([*old, new_rs])
    if not live:
        return new_rs if new_rs is not None else old[0]
    return live[0] if len(live) == 1 else None


def _saturated(d: dict, rs: dict | None) -> bool:
    if rs is None:
        return False
    want = replicas_of(d)
    return (annotations_of(rs).get(DESIRED_REPLICAS) == str(want) and replicas_of(rs) == want
            and count(rs, "availableReplicas") == want)


class ReplicaSetController:
    """pkg/controller/replicaset: pods to match spec.replicas, status from the pods."""

    def __init__(self, controllers: Controllers):
        self.c, self.store = controllers, controllers.store

    def sync(self, namespace: str, name: str) -> None:
        rs = self.store.get("ReplicaSet", namespace, name)
        if rs is None:
            return
        pods = [p for p in self._claim(rs) if is_active(p)]
        if not deleting(rs):
            self._manage(rs, pods)
        status = self._status(rs, pods)  # from the pods seen before managing them, as real
        if status != (rs.get("status") or {}):
            self.store.put(rs, {**copy.deepcopy(rs), "status": status})

    def _claim(self, rs: dict) -> list[dict]:
        return claim(rs, self.store.list("Pod", rs["metadata"]["namespace"]), self.store.put)

    def _manage(self, rs: dict, pods: list[dict]) -> None:
        diff = len(pods) - replicas_of(rs)
        if diff < 0:
            made = [self._create_pod(rs) for _ in range(min(-diff, BURST_REPLICAS))]
            self.c.kubelet.created([p for p in made if p is not None])
        for pod in sorted(pods, key=deletion_rank)[:max(diff, 0)]:
            self.store.delete(self.store.resource_for("Pod"), pod)

    def _create_pod(self, rs: dict) -> dict | None:
        pod = pod_from_template(rs)
        while self.store.get("Pod", rs["metadata"]["namespace"], pod["metadata"]["name"]):
            pod["metadata"]["name"] = f"{rs['metadata']['name']}-{random_suffix()}"
        created, error = self.store.create(pod)
        if created is None:
            log.debug("fake replicaset controller: %s", error)
        return created

    def _status(self, rs: dict, pods: list[dict]) -> dict:
        template_labels = ((rs["spec"].get("template") or {}).get("metadata") or {}) \
            .get("labels") or {}
        min_ready, at = rs["spec"].get("minReadySeconds", 0), time.time()
        ready = [p for p in pods if is_ready(p)]
        available = [p for p in ready if is_available(p, min_ready, at)]
        if len(available) < len(ready):  # look again once they have been ready long enough
            due = min(ready_since(p) + min_ready for p in ready if p not in available)
            self.c.later(due - at + 0.05, "replicaset", rs["metadata"]["namespace"],
                         rs["metadata"]["name"])
        counts = {"fullyLabeledReplicas": sum(all(labels_of(p).get(k) == v for k, v in
                                                  template_labels.items()) for p in pods),
                  "readyReplicas": len(ready), "availableReplicas": len(available),
                  "observedGeneration": rs["metadata"].get("generation", 1)}
        status = {"replicas": len(pods), **{k: v for k, v in counts.items() if v}}
        if (rs.get("status") or {}).get("conditions"):
            status["conditions"] = copy.deepcopy(rs["status"]["conditions"])
        return status


class Kubelet:
    """Starts the pods ReplicaSets create, `ready_delay` seconds after their creation."""

    def __init__(self, controllers: Controllers):
        self.c, self.store = controllers, controllers.store
        self._next_ip = 0

    def reset(self) -> None:
        self._next_ip = 0

    def created(self, pods: list[dict]) -> None:
        pods = [p for p in pods if not self.c.processes.handles(p)]  # run as processes
        if pods:  # one timer per batch: pods created together start together
            keys = tuple((p["metadata"]["namespace"], p["metadata"]["name"], p["metadata"]["uid"])
                         for p in pods)
            self.c.later(self.c.server.ready_delay, "kubelet", *keys)

    def start(self, *keys: tuple[str, str, str]) -> None:
        for namespace, name, uid in keys:
            pod = self.store.get("Pod", namespace, name)
            if pod is None or pod["metadata"]["uid"] != uid or deleting(pod):
                continue
            new = copy.deepcopy(pod)
            new["status"] = pod_status(pod, self._outcome(pod), self._ip())
            self.store.put(pod, new)

    def _outcome(self, pod: dict) -> str:
        if images_of(pod.get("spec") or {}) & set(self.c.server.bad_images):
            return "pull-failed"
        return "unready" if self._deployment_of(pod) in self.c.server.never_ready else "ready"

    def _deployment_of(self, pod: dict) -> tuple[str, str] | None:
        ns, ref = pod["metadata"]["namespace"], controller_ref(pod)
        rs = self.store.get("ReplicaSet", ns, ref["name"]) if ref else None
        owner = controller_ref(rs) if rs else None
        return (ns, owner["name"]) if owner and owner.get("kind") == "Deployment" else None

    def _ip(self) -> str:
        self._next_ip += 1
        return f"10.244.{self._next_ip // 250}.{self._next_ip % 250 + 2}"


class GarbageCollector:
    """pkg/controller/garbagecollector: dependents follow their owner (background)."""

    def __init__(self, controllers: Controllers):
        self.c, self.store = controllers, controllers.store

    def sync(self, namespace: str, owner_uid: str) -> None:
        """The owner is gone: delete dependents with no other live owner; the others only
        lose the dangling reference."""
        for res, obj in list(self.store.namespaced(namespace)):
            refs = obj["metadata"].get("ownerReferences") or []
            if not any(r.get("uid") == owner_uid for r in refs):
                continue
            others = [r for r in refs if r.get("uid") != owner_uid]
            if any(self.store.uid_exists(namespace, r.get("uid")) for r in others):
                new = copy.deepcopy(obj)
                set_owner_references(new, others)
                self.store.put(obj, new)
            else:
                self.store.delete(res, obj)

    def orphan(self, res: Any, owner: dict) -> dict:
        """propagationPolicy Orphan: the owner is marked deleted with the `orphan` finalizer
        (so no controller adopts anything for it meanwhile), its dependents lose the
        reference; returns the owner as stored now, ready to be removed."""
        m = owner["metadata"]
        marked = copy.deepcopy(owner)
        marked["metadata"].setdefault("deletionTimestamp", now())
        marked["metadata"]["finalizers"] = [*m.get("finalizers", []), "orphan"]
        self.store.put(owner, marked)
        for _, obj in list(self.store.namespaced(m.get("namespace", ""))):
            refs = obj["metadata"].get("ownerReferences") or []
            if any(r.get("uid") == m["uid"] for r in refs):
                new = copy.deepcopy(obj)
                set_owner_references(new, [r for r in refs if r.get("uid") != m["uid"]])
                self.store.put(obj, new)
        return self.store.get(owner["kind"], m.get("namespace", ""), m["name"]) or marked


class NamespaceController:
    """pkg/controller/namespace/deletion: empty a Terminating namespace, report what holds it,
    drop the `kubernetes` finalizer once nothing is left."""

    def __init__(self, controllers: Controllers):
        self.c, self.store = controllers, controllers.store
        self._attempts: dict[str, int] = {}

    def reset(self) -> None:
        self._attempts.clear()

    def terminating(self, name: str) -> None:
        if name not in self._attempts:
            self._attempts[name] = 0
            self.c.later(self.c.server.terminate_delay, "namespace", name)

    def sync(self, name: str) -> None:
        ns = self.store.get("Namespace", "", name)
        if ns is None or not deleting(ns):
            self._attempts.pop(name, None)
            return
        if not (ns.get("spec") or {}).get("finalizers"):
            return  # finalized: metadata.finalizers of its own hold it
        remaining, finalizers = self._delete_content(name)
        ns = self._set_conditions(ns, remaining, finalizers)
        if remaining:
            self._attempts[name] = attempt = self._attempts.get(name, 0) + 1
            delay = self.c.server.terminate_delay
            self.c.later(min(delay * 2 ** attempt, max(delay, NAMESPACE_RETRY_CAP)),
                         "namespace", name)
            return
        self._attempts.pop(name, None)
        self._finalize(ns)

    def _delete_content(self, namespace: str) -> tuple[dict[str, int], Counter]:
        """deleteAllContent: delete each resource's objects, then count what is left."""
        remaining: dict[str, int] = {}
        finalizers: Counter = Counter()
        for res in [r for r in self.c.server._objects if r.namespaced]:
            for obj in self.store.list(res.kind, namespace):
                self.store.delete(res, obj)
            left = self.store.list(res.kind, namespace)
            if left:
                remaining[f"{res.plural}.{res.group}"] = len(left)  # "pods." for the core group
                finalizers.update(f for o in left for f in o["metadata"].get("finalizers") or [])
        return remaining, finalizers

    def _set_conditions(self, ns: dict, remaining: dict[str, int], finalizers: Counter) -> dict:
        """namespaceConditionUpdater: each condition type, True with the details while content
        remains, otherwise False with its all-well reason."""
        failing = {}
        if remaining:
            failing["NamespaceContentRemaining"] = ("SomeResourcesRemain", "Some resources are "
                "remaining: " + ", ".join(sorted(f"{gr} has {n} resource instances"
                                                 for gr, n in remaining.items())))
        if finalizers:
            failing["NamespaceFinalizersRemaining"] = ("SomeFinalizersRemain", "Some content in "
                "the namespace has finalizers remaining: " + ", ".join(sorted(
                    f"{f} in {n} resource instances" for f, n in finalizers.items())))
        new = copy.deepcopy(ns)
        conditions = new.setdefault("status", {}).setdefault("conditions", [])
        for kind, (reason, message) in NAMESPACE_CONDITIONS.items():
            status, (reason, message) = ("True", failing[kind]) if kind in failing \
                else ("False", (reason, message))
            _update_namespace_condition(conditions, kind, status, reason, message)
        return self.store.put(ns, new)

    def _finalize(self, ns: dict) -> None:
        """The finalize subresource: without finalizers of any kind the Namespace goes (the
        API server deletes it instead of storing the update)."""
        new = copy.deepcopy(ns)
        rest = sorted(set(new["spec"].get("finalizers", [])) - {NAMESPACE_FINALIZER})
        _set_or_drop_list(new["spec"], "finalizers", rest)
        if rest or new["metadata"].get("finalizers"):
            self.store.put(ns, new)
        else:
            self.store.remove(self.store.resource_for("Namespace"), ns)


def _update_namespace_condition(conditions: list[dict], kind: str, status: str, reason: str,
                                message: str) -> None:
    current = next((c for c in conditions if c["type"] == kind), None)
    if current is None:
        conditions.append({"type": kind, "status": status, "lastTransitionTime": now(),
                           "reason": reason, "message": message})
    elif (current["status"], current.get("reason"), current.get("message")) != \
            (status, reason, message):
        if current["status"] != status:
            current["lastTransitionTime"] = now()
        current.update(status=status, reason=reason, message=message)


def _set_or_drop_list(spec: dict, field: str, value: list) -> None:
    if value:
        spec[field] = value
    else:
        spec.pop(field, None)
