"""The Cluster resource and the conf of every flow, as pydantic v2 models.

These models are the one source of truth: the DAG ``Param`` JSON schemas are generated from
them (:func:`param_schemas`), so the UI form, the REST API's 400 and the first task's
validation agree. Rules that span fields (an ssh cluster takes only host_path caches, ...) are
checked by a validator *and* stated in the JSON schema, and a test keeps the two in step
(tests/unit/test_resources.py lists the few JSON Schema cannot state, in PYDANTIC_ONLY).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from airfleet.errors import InvalidRequest

# A cluster name ends up in a namespace `airfleet-<name>-<8 hex>` (<= 63 characters) and in
# container names, so it is a DNS-1123 label of at most 40 characters.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
NAME_MAX = 40
Name = Annotated[
    str,
    StringConstraints(pattern=NAME_PATTERN, min_length=1, max_length=NAME_MAX),
    Field(description="DNS-1123 label: lowercase letters, digits and '-', "
          f"starting and ending with a letter or digit, at most {NAME_MAX} characters"),
]
Host = Annotated[
    str,
    StringConstraints(pattern=r"^([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|[0-9A-Fa-f:.]+)$",
                      max_length=253),
    Field(description="hostname, IPv4 or IPv6 address"),
]
LabelValue = Annotated[str, StringConstraints(pattern=r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$",
                                              max_length=63)]
LabelKey = Annotated[
    str,
    StringConstraints(pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
                      max_length=316),
]
# A container image pinned by tag or digest ([registry[:port]/]path:tag | ...@sha256:<hex>);
# "latest" moves under you, so it is refused like a missing tag.
IMAGE_PATTERN = (r"^([A-Za-z0-9.-]+(:[0-9]+)?/)?[a-z0-9]+([._/-][a-z0-9]+)*"
                 r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[0-9a-f]{64})$")


def _not_latest(image: str) -> str:
    if image.endswith(":latest"):
        raise PydanticCustomError("image_latest", "{image}: pin a version tag, not latest",
                                  {"image": image})
    return image


Image = Annotated[str, StringConstraints(pattern=IMAGE_PATTERN, max_length=512),
                  AfterValidator(_not_latest),
                  Field(description="container image pinned by tag or digest (not latest)",
                        json_schema_extra={"not": {"pattern": ":latest$"}})]
# pydantic states the key rule as patternProperties; without this, other keys would pass the schema.
Labels = Annotated[dict[LabelKey, LabelValue],
                   Field(json_schema_extra={"additionalProperties": False})]


def _json_integer(value: Any) -> Any:
    # JSON Schema's "integer": 22 and 22.0 pass, "22" and true do not (pydantic's lax mode would
    # coerce them, the Param schema rejects them).
    if isinstance(value, bool | str | bytes):
        raise PydanticCustomError("int_type", "Input should be a valid integer", {})
    return value


Int = Annotated[int, BeforeValidator(_json_integer)]

# The vault's envelope: afv1.<key id>.<wrapped AES key>.<nonce>.<ciphertext> (base64url).
ENVELOPE_PATTERN = r"^afv1\.[0-9a-f]{16}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$"
VAULT_ID_PATTERN = r"^vlt_[0-9a-f]{32}$"
CONN_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,250}$"

# Keys that would carry a secret in plain text. A spec holds references, never values.
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|private_key|api_key|access_key|kubeconfig)",
                         re.IGNORECASE)
PLAINTEXT_SECRET_HINT = (
    "plaintext secrets are not accepted; store the secret in an Airflow connection or seal it "
    "with `airfleet seal`, then give a credential reference: "
    '{"airflow_conn_id": ...} | {"vault_id": ...} | {"sealed": ...}'
)


def _given(*keys: str) -> dict[str, Any]:
    """JSON schema: each key holds an object (pydantic reads an explicit null as absent)."""
    return {"required": list(keys), "properties": {k: {"type": "object"} for k in keys}}


def _exactly_one_of(*keys: str) -> dict[str, Any]:
    """JSON schema of a model validator's "exactly one of these optional fields (not null)".

    Each branch fails on the object itself, never on one of its fields, so jsonschema reports
    the ``oneOf`` at the object's full path instead of descending into a branch.
    """
    return {"oneOf": [{"type": "object", "not": {"properties": {k: {"type": "null"}}}}
                      for k in keys]}


class Strict(BaseModel):
    """Base of every spec model: unknown fields are errors, secrets-looking keys too."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    @model_validator(mode="before")
    @classmethod
    def _no_plaintext_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if isinstance(key, str) and _SECRET_KEY.search(key) and key not in cls.model_fields:
                    raise PydanticCustomError("plaintext_secret", "{key}: " + PLAINTEXT_SECRET_HINT,
                                              {"key": key})
        return data


class CredentialRef(Strict):
    """A reference to a secret: exactly one of the three kinds."""

    model_config = ConfigDict(
        json_schema_extra=_exactly_one_of("airflow_conn_id", "vault_id", "sealed"))

    airflow_conn_id: Annotated[str, StringConstraints(pattern=CONN_ID_PATTERN)] | None = Field(
        None, description="an Airflow connection id")
    vault_id: Annotated[str, StringConstraints(pattern=VAULT_ID_PATTERN)] | None = Field(
        None, description="an id in Airfleet's encrypted vault")
    sealed: Annotated[str, StringConstraints(pattern=ENVELOPE_PATTERN)] | None = Field(
        None, description="an envelope made by `airfleet seal` with the platform's public key")

    @model_validator(mode="after")
    def _exactly_one(self) -> CredentialRef:
        given = [k for k in ("airflow_conn_id", "vault_id", "sealed") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "credential_ref", "give exactly one of airflow_conn_id, vault_id, sealed (got {n})",
                {"n": len(given)})
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("airflow_conn_id", "vault_id", "sealed") if getattr(self, k))


class ImageRegistry(Strict):
    url: Annotated[str, StringConstraints(pattern=r"^(https?://)?[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._/-]*)?$")] = Field(
        description="registry host[:port][/path], e.g. registry.example:5000")
    credential: CredentialRef | None = None
    ca_cert: CredentialRef | None = Field(None, description="CA certificate of a self-signed registry")


class HostPathCache(Strict):
    path: Annotated[str, StringConstraints(pattern=r"^/")] = Field(description="absolute path on the node")


class NFSCache(Strict):
    server: Host
    path: Annotated[str, StringConstraints(pattern=r"^/")]
    read_only: StrictBool = False


class PVCCache(Strict):
    size: Annotated[str, StringConstraints(pattern=r"^[0-9]+(Ki|Mi|Gi|Ti|Pi)$")] = Field(
        description="capacity, e.g. 500Gi")
    storage_class: str | None = None
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany"] = "ReadWriteMany"


class ModelCache(Strict):
    """A place where model weights are cached: exactly one of host_path, nfs, pvc."""

    model_config = ConfigDict(json_schema_extra=_exactly_one_of("host_path", "nfs", "pvc"))

    name: Name
    mount_path: Annotated[str, StringConstraints(pattern=r"^/")] | None = Field(
        None, description="where endpoints see the cache (default /models/<name>)")
    host_path: HostPathCache | None = None
    nfs: NFSCache | None = None
    pvc: PVCCache | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelCache:
        given = [k for k in ("host_path", "nfs", "pvc") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PydanticCustomError("model_cache", "give exactly one of host_path, nfs, pvc", {})
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("host_path", "nfs", "pvc") if getattr(self, k) is not None)


class RayConfig(Strict):
    image: Image = "rayproject/ray:2.60.0"
    version: str = "2.60.0"
    executable: str = Field("ray", description="ray executable, for container_runtime none")
    gcs_port: Int = Field(6379, ge=1, le=65535)
    dashboard_port: Int = Field(8265, ge=1, le=65535)


class SSHConfig(Strict):
    head: Host
    workers: list[Host] = Field(default_factory=list, json_schema_extra={"uniqueItems": True})
    port: Int = Field(22, ge=1, le=65535)
    user: Annotated[str, StringConstraints(pattern=r"^[a-z_][a-z0-9_-]*$", max_length=32)] = "root"
    credential: CredentialRef = Field(description="the SSH private key: an Airflow SSH "
                                      "connection, or a vault/sealed secret")
    known_hosts: str | None = Field(
        None, max_length=65536,
        description="known_hosts lines pinning the nodes' host keys (public data); without "
                    "it the SSH connection's host_key extra pins them")
    container_runtime: Literal["docker", "podman", "none"] = "docker"
    ray: RayConfig = Field(default_factory=RayConfig)
    drain_deadline_seconds: Int = Field(600, ge=1, le=86400)

    @field_validator("workers")
    @classmethod
    def _unique_workers(cls, workers: list[str]) -> list[str]:
        if len(set(workers)) != len(workers):
            raise PydanticCustomError("duplicate_worker", "each worker address may appear once", {})
        return workers

    @model_validator(mode="after")
    def _head_not_a_worker(self) -> SSHConfig:
        if self.head in self.workers:
            raise PydanticCustomError("head_is_worker",
                                      "the head {head} must not be listed as a worker",
                                      {"at": "workers", "head": self.head})
        return self


class Ingress(Strict):
    host: Host
    class_name: str | None = None


class RouterConfig(Strict):
    image: Image = "airfleet/router:0.1.0"
    replicas: Int = Field(1, ge=1, le=50)
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    ingress: Ingress | None = None


class MetricsConfig(Strict):
    image: Image = "victoriametrics/vmagent:v1.106.1"
    remote_write_url: Annotated[str, StringConstraints(pattern=r"^https?://")] | None = None
    scrape_interval: Annotated[str, StringConstraints(pattern=r"^[0-9]+[smh]$")] = "30s"


class KubernetesConfig(Strict):
    credential: CredentialRef | None = Field(
        None, description="the kubeconfig; required for provider existing, made by eks/aks")
    router: RouterConfig = Field(default_factory=RouterConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    ready_timeout_seconds: Int = Field(
        600, ge=1, le=7200,
        description="how long the components may take to become Available (image pulls "
                    "included) before the flow fails naming the ones that are not")


class Taint(Strict):
    key: str
    value: str = ""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"


class NodePool(Strict):
    name: Name
    instance_types: list[str] = Field(min_length=1)
    min: Int = Field(0, ge=0)
    max: Int = Field(1, ge=0)
    desired: Int = Field(1, ge=0)
    gpu: StrictBool = False
    labels: Labels = Field(default_factory=dict)
    taints: list[Taint] = Field(default_factory=list)
    ami_type: Annotated[str, StringConstraints(pattern=r"^[A-Z0-9_]+$")] | None = Field(
        None, description="EKS node AMI type (default AL2023_x86_64_NVIDIA for GPU pools, "
                          "AL2023_x86_64_STANDARD otherwise); ignored on AKS")

    @model_validator(mode="after")
    def _bounds(self) -> NodePool:
        if not self.min <= self.desired <= self.max:
            raise PydanticCustomError("pool_bounds", "need min <= desired <= max (got {a} <= {b} <= {c})",
                                      {"a": self.min, "b": self.desired, "c": self.max})
        return self


# Instance types that carry a GPU: EC2's accelerated families g* and p* (g5.xlarge, p4d.24xlarge,
# p6-b200.48xlarge, gr6.4xlarge), Azure's N-series VM sizes (Standard_NC24ads_A100_v4, ND, NV).
EKS_GPU_INSTANCE = r"^(g|gr|p)[0-9][a-z0-9]*(-[a-z0-9]+)?\.[a-z0-9]+$"
AKS_GPU_VM_SIZE = r"^Standard_N[CDV][A-Za-z0-9_]+$"
AKS_POOL_NAME = r"^[a-z][a-z0-9]{0,11}$"  # AKS agent pool names: no '-', at most 12


def _gpu_pools_rule(pattern: str) -> dict[str, Any]:
    """JSON schema: a pool with ``gpu: true`` lists only instance types matching ``pattern``."""
    return {"properties": {"node_pools": {"items": {
        "if": {"properties": {"gpu": {"const": True}}, "required": ["gpu"]},
        "then": {"properties": {"instance_types": {"items": {"pattern": pattern}}}}}}}}


def _check_gpu_pools(pools: list[NodePool], pattern: str, example: str) -> list[NodePool]:
    for i, pool in enumerate(pools):
        for j, kind in enumerate(pool.instance_types):
            if pool.gpu and not re.fullmatch(pattern, kind):
                raise PydanticCustomError(
                    "gpu_instance_type",
                    "pool {pool} has gpu: true but {kind} has no GPU; use a GPU instance type "
                    "such as {example}", {"at": f"{i}.instance_types.{j}", "pool": pool.name,
                                         "kind": kind, "example": example})
    return pools


DELETE_ON_FAILURE = ("when a create fails, remove the cloud resources that run created "
                     "(never ones it found and adopted); false keeps them for inspection")


class EKSConfig(Strict):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _gpu_pools_rule(EKS_GPU_INSTANCE),
        {"if": {"properties": {"node_pools": {"minItems": 1}}, "required": ["node_pools"]},
         "then": {"required": ["node_role_arn"],
                  "properties": {"node_role_arn": {"type": "string"}}}}]})

    credential: CredentialRef = Field(description="an Airflow AWS connection")
    region: Annotated[str, StringConstraints(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")]
    version: Annotated[str, StringConstraints(pattern=r"^1\.[0-9]+$")] = "1.31"
    role_arn: Annotated[str, StringConstraints(pattern=r"^arn:aws[a-z-]*:iam::")]
    node_role_arn: Annotated[str, StringConstraints(pattern=r"^arn:aws[a-z-]*:iam::")] | None = \
        Field(None, description="IAM role of the node groups' instances (needed with node_pools)")
    subnet_ids: list[str] = Field(min_length=1)
    security_group_ids: list[str] = Field(default_factory=list)
    endpoint_public_access: StrictBool = True
    endpoint_private_access: StrictBool = False
    node_pools: list[NodePool] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    delete_on_failure: StrictBool = Field(True, description=DELETE_ON_FAILURE)

    @field_validator("node_pools")
    @classmethod
    def _gpu_instance_types(cls, pools: list[NodePool]) -> list[NodePool]:
        return _check_gpu_pools(pools, EKS_GPU_INSTANCE, "g5.xlarge")

    @model_validator(mode="after")
    def _pools_need_a_node_role(self) -> EKSConfig:
        if self.node_pools and self.node_role_arn is None:
            raise _at("node_role_arn", "node pools need node_role_arn, the IAM role their "
                      "instances run with")
        return self


class AKSConfig(Strict):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"properties": {"node_pools": {"items": {"properties": {
            "instance_types": {"maxItems": 1}, "name": {"pattern": AKS_POOL_NAME}}}}}},
        _gpu_pools_rule(AKS_GPU_VM_SIZE)]})

    credential: CredentialRef = Field(description="an Airflow Azure connection")
    subscription_id: Annotated[str, StringConstraints(
        pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")]
    # ASCII spelled out: \w differs between pydantic's Rust regex and the Param check's Python re
    # (combining marks, superscript digits, ...).
    resource_group: Annotated[str, StringConstraints(pattern=r"^[-A-Za-z0-9_.()]{1,90}$")] = Field(
        description="letters, digits, '_', '.', '(', ')' and '-', at most 90 characters")
    location: Annotated[str, StringConstraints(pattern=r"^[a-z0-9]+$")]
    version: Annotated[str, StringConstraints(pattern=r"^1\.[0-9]+(\.[0-9]+)?$")] = "1.31"
    node_pools: list[NodePool] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    delete_on_failure: StrictBool = Field(True, description=DELETE_ON_FAILURE)

    @field_validator("node_pools")
    @classmethod
    def _one_vm_size(cls, pools: list[NodePool]) -> list[NodePool]:
        for i, pool in enumerate(pools):
            if len(pool.instance_types) != 1:
                raise PydanticCustomError("aks_vm_size",
                                          "pool {pool}: instance_types holds exactly one VM size on AKS",
                                          {"at": f"{i}.instance_types", "pool": pool.name})
        for i, pool in enumerate(pools):
            if not re.fullmatch(AKS_POOL_NAME, pool.name):
                raise PydanticCustomError(
                    "aks_pool_name", "AKS pool names are a lowercase letter then up to 11 "
                    "lowercase letters or digits (no '-'); got {pool}",
                    {"at": f"{i}.name", "pool": pool.name})
        return _check_gpu_pools(pools, AKS_GPU_VM_SIZE, "Standard_NC24ads_A100_v4")


class ClusterConfig(Strict):
    ssh: SSHConfig | None = None
    kubernetes: KubernetesConfig | None = None
    eks: EKSConfig | None = None
    aks: AKSConfig | None = None


class ClusterType(StrEnum):
    SSH = "ssh"
    KUBERNETES = "kubernetes"


class Provider(StrEnum):
    STATIC = "static"
    EXISTING = "existing"
    EKS = "eks"
    AKS = "aks"


# Which providers each type takes and which config block each provider needs. The JSON schema
# (_SPEC_RULES) states the same rules.
PROVIDERS = {ClusterType.SSH: {Provider.STATIC},
             ClusterType.KUBERNETES: {Provider.EXISTING, Provider.EKS, Provider.AKS}}
CONFIG_BLOCK = {Provider.STATIC: "ssh", Provider.EXISTING: "kubernetes",
                Provider.EKS: "eks", Provider.AKS: "aks"}
_SPEC_RULES = {"allOf": [
    {"if": {"properties": {"type": {"const": "ssh"}}},
     "then": {"properties": {
         "provider": {"const": "static"},
         "model_caches": {"items": {"properties": {"nfs": {"type": "null"},
                                                   "pvc": {"type": "null"}}}}}}},
    {"if": {"properties": {"type": {"const": "kubernetes"}}},
     "then": {"properties": {"provider": {"enum": ["existing", "eks", "aks"]}}}},
    *({"if": {"properties": {"provider": {"const": p.value}}, "required": ["provider"]},
       "then": {"properties": {"config": _given(block)}}}
      for p, block in CONFIG_BLOCK.items()),
    {"if": {"properties": {"provider": {"const": "existing"}}, "required": ["provider"]},
     "then": {"properties": {"config": {"properties": {"kubernetes": _given("credential")}}}}},
]}


class ClusterSpec(Strict):
    model_config = ConfigDict(json_schema_extra=_SPEC_RULES)

    type: ClusterType
    provider: Provider
    version: str = Field("", max_length=128, description="free text the operator controls")
    image_registry: ImageRegistry | None = None
    model_caches: list[ModelCache] = Field(default_factory=list)
    config: ClusterConfig

    @model_validator(mode="after")
    def _consistent(self) -> ClusterSpec:
        if self.provider not in PROVIDERS[self.type]:
            allowed = ", ".join(sorted(p.value for p in PROVIDERS[self.type]))
            raise _at("provider", "a {type} cluster takes provider {allowed}",
                      type=self.type.value, allowed=allowed)
        block = CONFIG_BLOCK[self.provider]
        if getattr(self.config, block) is None:
            raise _at(f"config.{block}", "provider {provider} needs a config.{block} block",
                      provider=self.provider.value, block=block)
        if self.provider is Provider.EXISTING and self.config.kubernetes.credential is None:
            raise _at("config.kubernetes.credential",
                      "provider existing needs a kubeconfig credential reference")
        if self.type is ClusterType.SSH:
            for i, cache in enumerate(self.model_caches):
                if cache.kind != "host_path":
                    raise _at(f"model_caches.{i}.{cache.kind}",
                              "{kind} caches need a kubernetes cluster; ssh clusters take host_path",
                              kind=cache.kind)
        names = [c.name for c in self.model_caches]
        if len(set(names)) != len(names):
            raise _at("model_caches", "each cache name may appear once")
        return self

    @property
    def block(self) -> BaseModel:
        """The config block of this spec's provider."""
        return getattr(self.config, CONFIG_BLOCK[self.provider])


class Metadata(Strict):
    name: Name
    labels: Labels = Field(default_factory=dict)


class ClusterRequest(Strict):
    """What a flow's conf carries: metadata and the desired spec (status is Airfleet's)."""

    metadata: Metadata
    spec: ClusterSpec

    @property
    def name(self) -> str:
        return self.metadata.name


class Phase(StrEnum):
    PENDING = "Pending"
    PROVISIONING = "Provisioning"
    UPDATING = "Updating"
    DELETING = "Deleting"
    RUNNING = "Running"
    FAILED = "Failed"
    DELETED = "Deleted"


class NodeStatus(BaseModel):
    name: str
    address: str = ""
    role: Literal["head", "worker", "node"] = "node"
    phase: str = "Pending"
    ray_node_id: str | None = None
    message: str = ""
    observed_at: datetime | None = None
    # Kubernetes nodes: what the node reports (status.capacity / allocatable, metadata.labels).
    capacity: dict[str, str] = Field(default_factory=dict)
    allocatable: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)


class Condition(BaseModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: datetime | None = None
    last_probe_time: datetime | None = None  # when it was last evaluated, changed or not


class CloudResource(BaseModel):
    name: str  # as the provisioner names it: "cluster llm-a", "agentPool llm-a/gpu", ...
    created_by: str | None = None  # the run that created it; None: found and adopted
    observed_at: datetime | None = None


class ClusterStatus(BaseModel):
    phase: Phase = Phase.PENDING
    observed_at: datetime | None = None
    message: str = ""
    nodes: list[NodeStatus] = Field(default_factory=list)
    accelerators: dict[str, Any] = Field(default_factory=dict)
    conditions: list[Condition] = Field(default_factory=list)
    # Health probes that failed in a row (reset by a good one); see flows.FAILED_PROBES_TO_FAIL.
    failed_probes: int = 0
    # When a scheduled health check last probed it (observed_at is any write's).
    health_checked_at: datetime | None = None
    last_run_id: str | None = None
    # Cloud resources (EKS/AKS) as they came to exist: who created each, so that a failed create
    # removes only what it made.
    resources: list[CloudResource] = Field(default_factory=list)
    # The vault id of a kubeconfig fetched from the managed cluster (AKS admin credentials).
    kubeconfig_vault_id: str | None = None
    # What a delete could not remove, one item each: a cluster deleted by force keeps this
    # list (its phase is Deleted because force was asked, not because all is gone).
    left_behind: list[str] = Field(default_factory=list)


class Cluster(BaseModel):
    """A recorded cluster: metadata, desired spec and observed status."""

    metadata: Metadata
    spec: ClusterSpec
    status: ClusterStatus = Field(default_factory=ClusterStatus)

    @property
    def name(self) -> str:
        return self.metadata.name


# ---- the conf of each flow -------------------------------------------------------------------

DRY_RUN = ("report what the flow would do and what the policies would decide; "
           "change nothing")


class ClusterConf(Strict):
    """Conf of create, update and onboard: the cluster's metadata and (desired) spec."""

    cluster: ClusterRequest
    dry_run: StrictBool = Field(False, description=DRY_RUN)


class DeleteConf(Strict):
    name: Name
    force: StrictBool = Field(False,
                              description="delete even when the backend cannot tear down cleanly")
    dry_run: StrictBool = Field(False, description=DRY_RUN)


class HealthCheckConf(Strict):
    names: list[Name] | None = Field(None, description="only these clusters (default: every one)")


# The conf model of each flow, by action name.
FLOW_CONF: dict[str, type[Strict]] = {"create": ClusterConf, "update": ClusterConf,
                                      "onboard": ClusterConf, "delete": DeleteConf,
                                      "health_check": HealthCheckConf}


# Keywords that constrain only values of their own "type", so null can simply join the type list.
_TYPED_KEYWORDS = frozenset({
    "type", "title", "description", "pattern", "minLength", "maxLength", "items", "minItems",
    "maxItems", "uniqueItems", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})


class _ParamSchema(GenerateJsonSchema):
    """pydantic's JSON schema, with ``X | None`` said without ``anyOf``.

    jsonschema reports an error found inside an ``anyOf`` with a path relative to it, so the
    REST API's 400 would read "On instance['port']" (or name no field at all) instead of
    "On instance['spec']['config']['ssh']['port']". ``{"type": ["string", "null"]}`` (the form
    Airflow documents for optional Params) and ``if null / else X`` report the full path.
    """

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        inner = self.generate_inner(schema["schema"])
        if isinstance(inner.get("type"), str) and set(inner) <= _TYPED_KEYWORDS:
            return {**inner, "type": [inner["type"], "null"]}
        return {"if": {"type": "null"}, "else": inner}


JSON_SCHEMA_DRAFT = "http://json-schema.org/draft-07/schema#"


def param_schemas(conf_model: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """JSON schema per top-level conf key, self-contained, for ``airflow.sdk.Param(**schema)``."""
    schema = conf_model.model_json_schema(schema_generator=_ParamSchema)
    defs = schema.get("$defs", {})
    out = {}
    for key, prop in schema["properties"].items():
        if "$ref" in prop:
            prop = {**defs[prop["$ref"].rsplit("/", 1)[1]],
                    **{k: v for k, v in prop.items() if k != "$ref"}}
        if defs:
            prop = {**prop, "$defs": defs}
        # Draft 7, said out loud: jsonschema.validate (what Param.resolve runs, in every task)
        # checks the schema against its metaschema first, and 2020-12's takes ~180 ms for
        # ours, draft 7's under 1 ms. Nothing here needs a later draft; the only $ref
        # siblings are descriptions, which draft 7 ignores.
        out[key] = {"$schema": JSON_SCHEMA_DRAFT, **_python_re_anchors(prop)}
        if key == "cluster":  # the form's label (else the model's name) and help
            out[key]["title"] = "Cluster"
            out[key]["description_md"] = _cluster_param_md(out[key].get("description", ""))
    return out


def example_cluster() -> dict[str, Any]:
    """examples/llm-a.json as data (DAG files parse with no file I/O): a head and one worker
    on static nodes. tests/unit/test_examples.py keeps the two equal."""
    ssh = {"head": "10.0.0.2", "workers": ["10.0.0.3"], "user": "root",
           "credential": {"airflow_conn_id": "ssh_fleet"}, "container_runtime": "docker",
           "ray": {"image": "rayproject/ray:2.60.0"}}
    return {"metadata": {"name": "llm-a", "labels": {"team": "search"}},
            "spec": {"type": "ssh", "provider": "static", "config": {"ssh": ssh}}}


def _cluster_param_md(description: str) -> str:
    """The trigger form's help for ``cluster``, with a working example to paste.

    Airflow 3.3's form fills an object field only from the Param's default, and a default
    would let a REST trigger that omits ``cluster`` create the example: the example lives in
    the help instead (shown when the Param has no plain ``description``)."""
    example = json.dumps(example_cluster(), indent=2)
    return (f"{description}\n\nStart from this example (`examples/llm-a.json`): paste it in, "
            "set your nodes' addresses and pin their host keys: `known_hosts` lines from "
            "`ssh-keyscan` (check the fingerprints out of band), or the SSH connection's "
            "`host_key` extra. Update takes the whole desired cluster; onboard one that "
            "already runs. More in `examples/` and the README.\n\n"
            f"```json\n{example}\n```")


def _python_re_anchors(node: Any) -> Any:
    """Make each pattern's final ``$`` mean the end of the string for the Param check too.

    pydantic matches patterns with Rust's regex (ECMA-262 reads them the same way), where ``$``
    is the end of the string; jsonschema runs Python's ``re.search``, where ``$`` also matches
    before a trailing newline, so ``"llm-a\\n"`` would pass the Param and fail the first task.
    ``(?!\\n)$`` reads as the end of the string in Python and in ECMA-262 alike.
    """
    if isinstance(node, list):
        return [_python_re_anchors(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "pattern" and isinstance(value, str):
            value = _end_anchor(value)
        elif key == "patternProperties" and isinstance(value, dict):
            value = {_end_anchor(k): _python_re_anchors(v) for k, v in value.items()}
        else:
            value = _python_re_anchors(value)
        out[key] = value
    return out


def _end_anchor(pattern: str) -> str:
    body = pattern[:-1]
    escaped = (len(body) - len(body.rstrip("\\"))) % 2 == 1
    if pattern.endswith("$") and not escaped:
        return body + r"(?!\n)$"
    return pattern


def parse_conf(conf_model: type[Strict], conf: dict[str, Any]) -> Strict:
    """Validate a flow's conf; raise :class:`InvalidRequest` naming each bad field."""
    try:
        return conf_model.model_validate(conf or {})
    except ValidationError as exc:
        raise InvalidRequest(format_errors(exc)) from None


def format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        extra = (err.get("ctx") or {}).get("at")
        if extra:
            loc += extra.split(".")
        if err["type"] == "plaintext_secret":
            loc.append(err["ctx"]["key"])
            message = PLAINTEXT_SECRET_HINT
        elif err["type"] == "string_pattern_mismatch" and err["ctx"]["pattern"] in _PATTERN_HINTS:
            message = f"{err['input']!r} is not {_PATTERN_HINTS[err['ctx']['pattern']]}"
        else:
            message = err["msg"]
        lines.append(f"{'.'.join(loc) or '(root)'}: {message}")
    return "invalid request:\n  " + "\n  ".join(lines)


_PATTERN_HINTS = {
    NAME_PATTERN: "a DNS-1123 label: lowercase letters, digits and '-', starting and ending "
                  "with a letter or digit",
    ENVELOPE_PATTERN: "an envelope made by `airfleet seal` (afv1.<key id>.<key>.<nonce>.<data>)",
    VAULT_ID_PATTERN: "a vault id (vlt_ and 32 hex digits)",
    IMAGE_PATTERN: "an image pinned by tag or digest ([registry/]path:tag or path@sha256:...)",
}


def _at(path: str, template: str, **ctx: Any) -> PydanticCustomError:
    """An error raised by a model validator, placed at ``path`` below the model."""
    return PydanticCustomError("invalid", template, {"at": path, **ctx})
