"""The Endpoint resource: an inference engine serving one model on a cluster, as pydantic v2
models with the same rules as the Cluster (resources.py): the DAG ``Param`` schemas come from
these models, unknown fields and secret-looking keys are errors.

An endpoint has a name and one or more *versions* (``spec.version``); each version runs its
own engine replicas (a Deployment on Kubernetes, a Ray Serve application on static nodes) and
takes ``traffic_weight`` percent of the endpoint's requests. Deploying a version with a weight
gives the other versions the rest, in proportion to their weights (:func:`rebalanced`), so a
canary is "deploy v2 with 10", then "deploy v2 with 100", then "delete v1".

:func:`check_placement` holds the rules that need the target cluster's record (it exists and
runs, has the cache, has the GPUs); it reads nothing itself, so the flow calls it in validate
with what the store holds, before any lease or change.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    Field,
    StrictBool,
    StringConstraints,
    field_validator,
    model_validator,
)

from airfleet.errors import InvalidRequest
from airfleet.resources import (
    DRY_RUN,
    Cluster,
    Image,
    Int,
    Metadata,
    Name,
    Phase,
    Strict,
    _at,
    param_schemas,
)

# A version names a Deployment / Serve application suffix and a pod label value.
VERSION_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
Version = Annotated[str, StringConstraints(pattern=VERSION_PATTERN, min_length=1, max_length=20),
                    Field(description="lowercase letters, digits, '-' and '.', at most 20 "
                          "characters, e.g. v1")]
# Hugging Face repo ids (org/name) or a local path under a model cache.
MODEL_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?|/[^\s]+)$"
SERVED_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$"
ARG_PATTERN = r"^[a-z0-9][a-z0-9-]*$"

# Engine flags that would carry a secret on the command line (visible in `ps`, in the pod
# spec, in Ray's dashboard): give those to the engine through its environment instead.
_SECRET_WORDS = frozenset({"token", "password", "passwd", "secret", "secrets", "credential",
                           "credentials"})
_SECRET_PAIRS = ("api-key", "private-key", "access-key", "secret-key")


def _secret_arg(key: str) -> bool:
    # By what the flag names last: "hf-token" holds a secret; "max-num-batched-tokens" and
    # "token-latency-ms" do not.
    return key.split("-")[-1] in _SECRET_WORDS or key.endswith(_SECRET_PAIRS)

# Flags Airfleet sets itself from the spec: giving them as engine_args would contradict it.
OWNED_ARGS = frozenset({"model", "model-path", "served-model-name", "port", "host",
                        "max-model-len", "context-length", "revision", "tensor-parallel-size",
                        "tp-size", "download-dir"})

MAX_MODEL_LEN_RULE = (
    "the longest sequence (prompt + generated tokens) the engine accepts. When absent and "
    "expected_tokens is given: ceil((expected input + output tokens) x 1.1), capped at "
    "model.context_length when that is known; when both are absent the engine uses the "
    "model's own limit")


class Engine(StrEnum):
    VLLM = "vllm"
    SGLANG = "sglang"
    MOCK = "mock"


class EndpointModel(Strict):
    name: Annotated[str, StringConstraints(pattern=MODEL_PATTERN, max_length=256)] = Field(
        description="Hugging Face repo id (org/name), or an absolute path inside the cache")
    revision: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._/-]{1,128}$")] | None = \
        Field(None, description="branch, tag or commit of the model repo (default: main)")
    cache: Name | None = Field(None, description="one of the cluster's model_caches, mounted "
                               "where the engine downloads and reads the weights")
    served_name: Annotated[str, StringConstraints(pattern=SERVED_PATTERN, max_length=256)] | \
        None = Field(None, description='the name clients send as "model" (default: name)')
    context_length: Int | None = Field(None, ge=1, le=10_000_000, description=(
        "the model's own limit in tokens (its max_position_embeddings), when you know it"))

    @property
    def served(self) -> str:
        return self.served_name or self.name


class ExpectedTokens(Strict):
    input: Int = Field(ge=1, le=10_000_000, description="typical prompt length in tokens")
    output: Int = Field(ge=1, le=10_000_000, description="typical answer length in tokens")


class EndpointResources(Strict):
    gpu: Int = Field(0, ge=0, le=64, description="GPUs per replica, all on one node")
    gpu_model: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$",
                                                max_length=64)] | None = Field(
        None, description="only nodes whose detected GPUs match, e.g. H100 or "
        "NVIDIA-A100-SXM4-80GB (case and separators ignored)")
    cpu: Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN)] | None = Field(
        None, description="CPU per replica, e.g. 4 or 500m")
    memory: Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN)] | None = Field(
        None, description="memory per replica, e.g. 32Gi")


ArgValue = str | int | float | bool | None


class EndpointSpec(Strict):
    cluster: Name = Field(description="the Running cluster that serves it")
    engine: Engine
    image: Image | None = Field(None, description=(
        "the engine's container image on Kubernetes (default: vllm/vllm-openai, "
        "lmsysorg/sglang or airfleet/mock-engine at the version Airfleet pins)"))
    model: EndpointModel
    replicas: Int = Field(1, ge=0, le=256)
    resources: EndpointResources = Field(default_factory=EndpointResources)
    engine_args: dict[Annotated[str, StringConstraints(pattern=ARG_PATTERN, max_length=64)],
                      ArgValue] = Field(
        default_factory=dict, description="more engine flags without the leading --, e.g. "
        '{"gpu-memory-utilization": 0.9}; true is a bare flag, null or false leaves it out')
    max_model_len: Int | None = Field(None, ge=16, le=10_000_000,
                                      description=MAX_MODEL_LEN_RULE)
    expected_tokens: ExpectedTokens | None = Field(
        None, description="the traffic you expect, to size max_model_len")
    version: Version = "v1"
    traffic_weight: Int = Field(100, ge=0, le=100, description=(
        "percent of the endpoint's requests this version takes; the other versions share the "
        "rest in proportion to their weights"))

    @field_validator("engine_args")
    @classmethod
    def _args_hold_no_secret(cls, args: dict[str, ArgValue]) -> dict[str, ArgValue]:
        for key in args:
            if _secret_arg(key):
                raise _at(key,
                          "a secret on the engine's command line is visible to anyone who can "
                          "list processes or read the pod, so Airfleet refuses it; engines read "
                          "such secrets from their environment (HF_TOKEN, VLLM_API_KEY), which "
                          "endpoints cannot be given yet")
            if key in OWNED_ARGS:
                raise _at(key, "Airfleet sets --{key} itself; leave it out (the model, its served "
                          "name, max_model_len and GPUs are spec fields)",
                          key=key)
        return args

    @model_validator(mode="after")
    def _consistent(self) -> EndpointSpec:
        if self.engine is not Engine.MOCK and self.resources.gpu == 0:
            raise _at("resources.gpu", "engine {engine} needs at least one GPU per replica; "
                      "on a CPU-only cluster use engine mock", engine=self.engine.value)
        if self.resources.gpu_model and not self.resources.gpu:
            raise _at("resources.gpu_model", "a GPU model needs resources.gpu of at least 1")
        limit = self.model.context_length
        if self.max_model_len and limit and self.max_model_len > limit:
            raise _at("max_model_len", "{n} is beyond the model's context_length {limit}",
                      n=self.max_model_len, limit=limit)
        return self

    @property
    def effective_max_model_len(self) -> int | None:
        """``max_model_len``, else the rule of :data:`MAX_MODEL_LEN_RULE`, else None."""
        if self.max_model_len:
            return self.max_model_len
        if self.expected_tokens is None:
            return None
        total = self.expected_tokens.input + self.expected_tokens.output
        wanted = -(-total * 11 // 10)  # ceil(total x 1.1) in integers (1.1 is inexact)
        return min(wanted, self.model.context_length or wanted)


class EndpointRequest(Strict):
    """What a deploy's conf carries: metadata and the desired spec of one version."""

    metadata: Metadata
    spec: EndpointSpec

    @property
    def name(self) -> str:
        return self.metadata.name


class EndpointPhase(StrEnum):
    PENDING = "Pending"
    DEPLOYING = "Deploying"
    RUNNING = "Running"
    FAILED = "Failed"
    DELETED = "Deleted"


class EndpointStatus(BaseModel):
    phase: EndpointPhase = EndpointPhase.PENDING
    observed_at: datetime | None = None
    message: str = ""
    ready_replicas: int = 0
    replicas: int = 0
    url: str | None = None
    last_run_id: str | None = None


class EndpointVersion(BaseModel):
    """A recorded version of an endpoint: metadata, its spec and what was observed."""

    metadata: Metadata
    spec: EndpointSpec
    status: EndpointStatus = Field(default_factory=EndpointStatus)

    @property
    def name(self) -> str:
        return self.metadata.name


# ---- the conf of each endpoint flow ---------------------------------------------------------

class DeployConf(Strict):
    endpoint: EndpointRequest
    dry_run: StrictBool = Field(False, description=DRY_RUN)


class ScaleConf(Strict):
    name: Name
    replicas: Int = Field(ge=0, le=256)
    version: Version | None = Field(None, description="the version to scale (needed when the "
                                    "endpoint has more than one)")
    dry_run: StrictBool = Field(False, description=DRY_RUN)


class EndpointDeleteConf(Strict):
    name: Name
    version: Version | None = Field(None, description="only this version (default: every one)")
    dry_run: StrictBool = Field(False, description=DRY_RUN)


ENDPOINT_CONF: dict[str, type[Strict]] = {"endpoint_deploy": DeployConf,
                                          "endpoint_scale": ScaleConf,
                                          "endpoint_delete": EndpointDeleteConf}


# ---- rules that need the cluster ------------------------------------------------------------

def check_placement(spec: EndpointSpec, cluster: Cluster | None,
                    others: Iterable[EndpointVersion] = ()) -> None:
    """Raise :class:`InvalidRequest` naming the field unless ``spec`` can run on ``cluster``
    (its record, None when not registered) next to ``others`` (the endpoint versions already
    on that cluster, except the one ``spec`` replaces)."""
    where = "endpoint.spec"
    if cluster is None:
        raise InvalidRequest(f"{where}.cluster: cluster {spec.cluster} is not registered; "
                             "create or onboard it first (`airfleet clusters list` lists them)")
    if cluster.status.phase is not Phase.RUNNING:
        raise InvalidRequest(
            f"{where}.cluster: cluster {spec.cluster} is {cluster.status.phase.value}, and "
            "endpoints deploy only on a Running cluster; fix it (its history says why) or "
            "wait for a health check to find it Running")
    caches = [c.name for c in cluster.spec.model_caches]
    if spec.model.cache and spec.model.cache not in caches:
        raise InvalidRequest(
            f"{where}.model.cache: cluster {spec.cluster} has no model cache "
            f"{spec.model.cache!r} (it has: {', '.join(caches) or 'none'}); add it to the "
            "cluster's model_caches with airfleet_cluster_update, or name one of those")
    if spec.resources.gpu:
        _check_gpus(spec, cluster, [o for o in others if o.spec.resources.gpu])


def _check_gpus(spec: EndpointSpec, cluster: Cluster, others: list[EndpointVersion]) -> None:
    res, where = spec.resources, "endpoint.spec"
    per_node = gpus_per_node(cluster, res.gpu_model)
    if not any(per_node.values()):
        detected = ", ".join(f"{m} x{n}" for m, n in
                             (cluster.status.accelerators.get("models") or {}).items())
        if res.gpu_model:
            raise InvalidRequest(
                f"{where}.resources.gpu_model: cluster {spec.cluster} has no {res.gpu_model} "
                f"GPUs (detected: {detected or 'no GPUs'}); name a detected model or leave "
                "gpu_model out")
        raise InvalidRequest(
            f"{where}.resources.gpu: cluster {spec.cluster} has no usable GPUs (detected: "
            f"{detected or 'none'}); use engine mock with gpu 0, or a cluster with GPUs")
    largest = max(per_node.values())
    if res.gpu > largest:
        raise InvalidRequest(
            f"{where}.resources.gpu: a replica needs {res.gpu} GPUs on one node, and the "
            f"largest node of cluster {spec.cluster} has {largest}; ask for at most {largest}")
    # Upper bound: replicas that fit node by node, and GPUs the other endpoints leave free
    # (where each of their replicas runs is the scheduler's business, not recorded here).
    used = sum(o.spec.replicas * o.spec.resources.gpu for o in others)
    free = sum(per_node.values()) - used
    fits = min(sum(n // res.gpu for n in per_node.values()), max(free, 0) // res.gpu)
    if spec.replicas > fits:
        raise InvalidRequest(
            f"{where}.replicas: {spec.replicas} replicas of {res.gpu} GPU(s) do not fit on "
            f"cluster {spec.cluster}: it has {sum(per_node.values())} matching GPUs "
            f"({_nodes(per_node)}), other endpoints use {used}, so at most {fits} replica(s) "
            "fit; lower replicas or free GPUs first")


def gpus_per_node(cluster: Cluster, gpu_model: str | None) -> dict[str, int]:
    """Usable GPUs on each node of ``cluster`` as last detected, only those matching
    ``gpu_model`` when given (case and separators ignored, a part of the name matches)."""
    nodes = cluster.status.accelerators.get("nodes") or {}
    out = {}
    for node, report in nodes.items():
        models: Mapping[str, int] = report.get("models") or {}
        if gpu_model:
            out[node] = sum(n for m, n in models.items() if model_matches(gpu_model, m))
        else:
            out[node] = int(report.get("count") or 0)
    return out


def model_matches(wanted: str, detected: str) -> bool:
    """``H100`` matches ``NVIDIA H100 80GB HBM3`` and ``NVIDIA-H100-80GB-HBM3``."""
    def words(s: str) -> str:
        return "-" + "-".join(re.findall(r"[a-z0-9]+", s.lower())) + "-"
    return words(wanted) in words(detected)


def _nodes(per_node: Mapping[str, int]) -> str:
    return ", ".join(f"{node}: {n}" for node, n in sorted(per_node.items()))


# ---- traffic --------------------------------------------------------------------------------

def rebalanced(weights: Mapping[str, int], version: str, weight: int) -> dict[str, int]:
    """The versions' weights once ``version`` takes ``weight``: the others share ``100 -
    weight`` in proportion to their current weights (equally when those are all 0), rounded by
    largest remainder so the total is exactly 100. Raises InvalidRequest when ``version`` would
    be the only one and ``weight`` is not 100 (nothing else could take the rest)."""
    others = {v: w for v, w in weights.items() if v != version}
    if not others:
        if weight != 100:
            raise InvalidRequest(
                f"endpoint.spec.traffic_weight: {version} is the endpoint's only version, so "
                "it takes all traffic and the weights would not sum to 100; give 100, or "
                "deploy it as a second version next to a running one")
        return {version: 100}
    rest, total = 100 - weight, sum(others.values())
    shares = {v: rest * (w / total if total else 1 / len(others)) for v, w in others.items()}
    out = {v: math.floor(s) for v, s in shares.items()}
    for v in sorted(shares, key=lambda v: (out[v] - shares[v], v))[:rest - sum(out.values())]:
        out[v] += 1
    return {**out, version: weight}


def endpoint_param_schemas(conf_model: type[Strict]) -> dict[str, dict[str, Any]]:
    """:func:`airfleet.resources.param_schemas` of an endpoint flow's conf; the endpoint's
    form field is titled and its help shows a working example to paste."""
    import json

    out = param_schemas(conf_model)
    if "endpoint" in out:
        out["endpoint"]["title"] = "Endpoint"
        out["endpoint"]["description_md"] = (
            "One version of an endpoint: the engine, the model, replicas and GPUs, and the "
            "share of the endpoint's traffic this version takes (its other versions share the "
            "rest). Start from this example (a mock engine on the README's first cluster):"
            f"\n\n```json\n{json.dumps(example_endpoint(), indent=2)}\n```")
    return out


def example_endpoint() -> dict[str, Any]:
    """A mock endpoint on the README's first cluster: runs on any CPU."""
    return {"metadata": {"name": "chat", "labels": {"team": "search"}},
            "spec": {"cluster": "llm-a", "engine": "mock",
                     "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct", "served_name": "chat"},
                     "replicas": 1, "version": "v1", "traffic_weight": 100}}
