"""The Cluster resource and the flows' conf (airfleet.resources).

Every conf is validated twice: by the DAG Param JSON schema (Airflow runs
``jsonschema.validate(value, schema, format_checker=FormatChecker())`` and the REST API answers
400 with the best-matching error) and by the pydantic model in the first task. These tests hold
the two to one contract: the same inputs are accepted, the same inputs are rejected, and both
name the offending field.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest
from jsonschema import FormatChecker
from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for

from airfleet.errors import InvalidRequest
from airfleet.resources import (
    PLAINTEXT_SECRET_HINT,
    ClusterConf,
    ClusterRequest,
    DeleteConf,
    HealthCheckConf,
    param_schemas,
    parse_conf,
)

VAULT_ID = "vlt_" + "0123456789abcdef" * 2
SEALED = "afv1.0123456789abcdef.AAECAwQF-_8.bm9uY2Vub25jZQ.Y2lwaGVy_dGV4dA-"
AKS_SUBSCRIPTION = "12345678-90ab-cdef-1234-567890abcdef"

CLUSTER_SCHEMA = param_schemas(ClusterConf)["cluster"]
# The validator jsonschema.validate picks for the schema (by its $schema), as Airflow's Param.
SCHEMA_VALIDATOR = validator_for(CLUSTER_SCHEMA)(CLUSTER_SCHEMA, format_checker=FormatChecker())


# ---- valid clusters ----------------------------------------------------------------------------

def ssh_cluster() -> dict[str, Any]:
    return {
        "metadata": {"name": "llm-a", "labels": {"team": "search", "airfleet.io/tier": "gold"}},
        "spec": {
            "type": "ssh",
            "provider": "static",
            "version": "2025.1 free text",
            "image_registry": {"url": "registry.example:5000",
                               "credential": {"vault_id": VAULT_ID},
                               "ca_cert": {"sealed": SEALED}},
            "model_caches": [{"name": "hf", "host_path": {"path": "/data/models"}}],
            "config": {"ssh": {
                "head": "10.0.0.1",
                "workers": ["10.0.0.2", "10.0.0.3"],
                "port": 22,
                "user": "root",
                "credential": {"airflow_conn_id": "ssh_fleet"},
                "container_runtime": "docker",
                "ray": {"image": "rayproject/ray:2.60.0", "executable": "ray",
                        "gcs_port": 6379, "dashboard_port": 8265},
                "drain_deadline_seconds": 600,
            }},
        },
    }


def existing_cluster() -> dict[str, Any]:
    return {
        "metadata": {"name": "k8s-prod"},
        "spec": {
            "type": "kubernetes",
            "provider": "existing",
            "model_caches": [
                {"name": "local", "host_path": {"path": "/mnt/models"}},
                {"name": "shared", "nfs": {"server": "nfs.example", "path": "/export/models",
                                           "read_only": True}},
                {"name": "pvc", "pvc": {"size": "500Gi", "storage_class": "gp3"},
                 "mount_path": "/models/pvc"},
            ],
            "config": {"kubernetes": {
                "credential": {"airflow_conn_id": "k8s_prod"},
                "router": {"image": "airfleet/router:0.1.0", "replicas": 2,
                           "service_type": "LoadBalancer"},
                "metrics": {"image": "victoriametrics/vmagent:v1.106.1",
                            "remote_write_url": "https://vm.example/api/v1/write"},
            }},
        },
    }


def eks_cluster() -> dict[str, Any]:
    return {
        "metadata": {"name": "eks-gpu"},
        "spec": {
            "type": "kubernetes",
            "provider": "eks",
            "config": {"eks": {
                "credential": {"airflow_conn_id": "aws_default"},
                "region": "us-east-1",
                "version": "1.31",
                "role_arn": "arn:aws:iam::123456789012:role/eks",
                "node_role_arn": "arn:aws:iam::123456789012:role/eks-node",
                "subnet_ids": ["subnet-1", "subnet-2"],
                "node_pools": [
                    {"name": "cpu", "instance_types": ["m5.large", "m5a.large"],
                     "min": 1, "max": 3, "desired": 2},
                    {"name": "gpu", "instance_types": ["g5.xlarge"], "min": 0, "max": 4,
                     "desired": 1, "gpu": True, "labels": {"nvidia.com/gpu.present": "true"},
                     "taints": [{"key": "nvidia.com/gpu", "value": "present",
                                 "effect": "NoSchedule"}]},
                ],
            }},
        },
    }


def aks_cluster() -> dict[str, Any]:
    return {
        "metadata": {"name": "aks-a"},
        "spec": {
            "type": "kubernetes",
            "provider": "aks",
            "config": {"aks": {
                "credential": {"airflow_conn_id": "azure_default"},
                "subscription_id": AKS_SUBSCRIPTION,
                "resource_group": "rg-airfleet",
                "location": "eastus",
                "version": "1.31",
                "node_pools": [
                    {"name": "system", "instance_types": ["Standard_D4s_v5"], "min": 1,
                     "max": 3, "desired": 1},
                    {"name": "gpu", "instance_types": ["Standard_NC24ads_A100_v4"],
                     "min": 0, "max": 2, "desired": 0, "gpu": True},
                ],
            }},
        },
    }


DELETE = object()


def with_changes(cluster: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``cluster`` with ``{"a.b.0.c": value}`` set (``DELETE`` removes the key)."""
    out = copy.deepcopy(cluster)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = out
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        elif value is DELETE:
            del node[last]
        else:
            node[last] = value
    return out


VALID: dict[str, dict[str, Any]] = {
    "ssh/static full": ssh_cluster(),
    "ssh/static minimal": {"metadata": {"name": "a"}, "spec": {
        "type": "ssh", "provider": "static",
        "config": {"ssh": {"head": "gpu-1.lab.example", "credential": {"vault_id": VAULT_ID}}}}},
    "ssh/static ipv6 head, podman": with_changes(ssh_cluster(), {
        "spec.config.ssh.head": "fd00::1", "spec.config.ssh.workers": ["fd00::2"],
        "spec.config.ssh.container_runtime": "podman"}),
    "ssh credential airflow_conn_id": with_changes(ssh_cluster(), {
        "spec.config.ssh.credential": {"airflow_conn_id": "ssh.fleet-01"}}),
    "ssh credential vault_id": with_changes(ssh_cluster(), {
        "spec.config.ssh.credential": {"vault_id": VAULT_ID}}),
    "ssh credential sealed": with_changes(ssh_cluster(), {
        "spec.config.ssh.credential": {"sealed": SEALED}}),
    "name of 40 characters": with_changes(ssh_cluster(), {"metadata.name": "a" * 40}),
    "kubernetes/existing": existing_cluster(),
    "kubernetes/eks with a gpu pool": eks_cluster(),
    "kubernetes/aks one vm size per pool": aks_cluster(),
    # An explicit null means "not given", in both validators (a form may send nulls).
    "null for the other credential kinds": with_changes(ssh_cluster(), {
        "spec.config.ssh.credential": {"airflow_conn_id": "ssh_fleet", "vault_id": None,
                                       "sealed": None}}),
    "null for the other cache kinds on ssh": with_changes(ssh_cluster(), {
        "spec.model_caches": [{"name": "hf", "host_path": {"path": "/data"}, "nfs": None,
                               "pvc": None}]}),
    "null for unused config blocks": with_changes(eks_cluster(), {
        "spec.config.ssh": None, "spec.config.kubernetes": None, "spec.config.aks": None}),
    "null image registry": with_changes(ssh_cluster(), {"spec.image_registry": None}),
    "null optional strings and objects": with_changes(existing_cluster(), {
        "spec.model_caches.0.mount_path": None, "spec.model_caches.2.pvc.storage_class": None,
        "spec.config.kubernetes.metrics.remote_write_url": None,
        "spec.config.kubernetes.router.ingress": None,
        "spec.image_registry": {"url": "https://registry.example/v2", "credential": None,
                                "ca_cert": None}}),
    "a float with no fraction is an integer (JSON Schema)": with_changes(ssh_cluster(), {
        "spec.config.ssh.port": 2222.0}),
}


def schema_errors(value: Any) -> list[jsonschema.ValidationError]:
    return list(SCHEMA_VALIDATOR.iter_errors(value))


@pytest.mark.parametrize("cluster", VALID.values(), ids=VALID.keys())
def test_valid_cluster_is_accepted_by_pydantic_and_json_schema(cluster):
    parsed = parse_conf(ClusterConf, {"cluster": copy.deepcopy(cluster)})
    assert parsed.cluster.name == cluster["metadata"]["name"]
    assert parsed.cluster.spec.block is not None
    assert [e.message for e in schema_errors(cluster)] == []
    jsonschema.validate(cluster, CLUSTER_SCHEMA, format_checker=FormatChecker())  # what Airflow runs


def test_parsed_cluster_keeps_references_and_fills_defaults():
    parsed = parse_conf(ClusterConf, {"cluster": VALID["ssh/static minimal"]}).cluster
    ssh = parsed.spec.config.ssh
    assert (ssh.port, ssh.user, ssh.container_runtime, ssh.workers) == (22, "root", "docker", [])
    assert ssh.credential.kind == "vault_id"
    full = parse_conf(ClusterConf, {"cluster": ssh_cluster()}).cluster
    assert full.spec.image_registry.credential.kind == "vault_id"
    assert full.spec.image_registry.ca_cert.kind == "sealed"
    assert [c.kind for c in parse_conf(ClusterConf, {"cluster": existing_cluster()})
            .cluster.spec.model_caches] == ["host_path", "nfs", "pvc"]
    assert [p.gpu for p in parse_conf(ClusterConf, {"cluster": eks_cluster()})
            .cluster.spec.config.eks.node_pools] == [False, True]


# ---- bad input: both validators reject and name the field ----------------------------------------

# (cluster, the path of the offending field below the conf's "cluster" key)
BAD: dict[str, tuple[dict[str, Any], str]] = {
    "missing name": (with_changes(ssh_cluster(), {"metadata.name": DELETE}), "metadata.name"),
    "missing metadata": (with_changes(ssh_cluster(), {"metadata": DELETE}), "metadata"),
    "name uppercase": (with_changes(ssh_cluster(), {"metadata.name": "LLM-A"}), "metadata.name"),
    "name underscore": (with_changes(ssh_cluster(), {"metadata.name": "llm_a"}), "metadata.name"),
    "name ends with -": (with_changes(ssh_cluster(), {"metadata.name": "llm-"}), "metadata.name"),
    "name too long": (with_changes(ssh_cluster(), {"metadata.name": "a" * 41}), "metadata.name"),
    "name empty": (with_changes(ssh_cluster(), {"metadata.name": ""}), "metadata.name"),
    "name with a trailing newline": (with_changes(ssh_cluster(), {"metadata.name": "llm-a\n"}),
                                     "metadata.name"),
    "label key invalid": (with_changes(ssh_cluster(), {"metadata.labels": {"-bad key": "x"}}),
                          "metadata.labels"),
    "label value invalid": (with_changes(ssh_cluster(), {"metadata.labels": {"team": "a b"}}),
                            "metadata.labels.team"),
    "unknown type": (with_changes(ssh_cluster(), {"spec.type": "slurm"}), "spec.type"),
    "missing type": (with_changes(ssh_cluster(), {"spec.type": DELETE}), "spec.type"),
    "unknown provider": (with_changes(ssh_cluster(), {"spec.provider": "gke"}), "spec.provider"),
    "ssh with provider eks": (with_changes(eks_cluster(), {
        "spec.type": "ssh", "spec.config.ssh": ssh_cluster()["spec"]["config"]["ssh"]}),
        "spec.provider"),
    "kubernetes with provider static": (with_changes(ssh_cluster(), {"spec.type": "kubernetes"}),
                                        "spec.provider"),
    "missing config": (with_changes(ssh_cluster(), {"spec.config": DELETE}), "spec.config"),
    "static without config.ssh": (with_changes(ssh_cluster(), {"spec.config": {}}),
                                  "spec.config.ssh"),
    "static with config.ssh null": (with_changes(ssh_cluster(), {"spec.config.ssh": None}),
                                    "spec.config.ssh"),
    "eks without config.eks": (with_changes(eks_cluster(), {
        "spec.config": {"kubernetes": {"credential": {"airflow_conn_id": "k"}}}}),
        "spec.config.eks"),
    "aks without config.aks": (with_changes(aks_cluster(), {"spec.config.aks": DELETE}),
                               "spec.config.aks"),
    "existing without config.kubernetes": (with_changes(existing_cluster(), {
        "spec.config.kubernetes": DELETE}), "spec.config.kubernetes"),
    "existing without a credential": (with_changes(existing_cluster(), {
        "spec.config.kubernetes.credential": DELETE}), "spec.config.kubernetes.credential"),
    "existing with a null credential": (with_changes(existing_cluster(), {
        "spec.config.kubernetes.credential": None}), "spec.config.kubernetes.credential"),
    "nfs cache on ssh": (with_changes(ssh_cluster(), {"spec.model_caches": [
        {"name": "n", "nfs": {"server": "10.0.0.9", "path": "/export"}}]}),
        "spec.model_caches.0.nfs"),
    "pvc cache on ssh": (with_changes(ssh_cluster(), {"spec.model_caches": [
        {"name": "hf", "host_path": {"path": "/data"}}, {"name": "p", "pvc": {"size": "10Gi"}}]}),
        "spec.model_caches.1.pvc"),
    "cache with two kinds": (with_changes(existing_cluster(), {"spec.model_caches.0": {
        "name": "two", "host_path": {"path": "/data"}, "pvc": {"size": "10Gi"}}}),
        "spec.model_caches.0"),
    "cache with no kind": (with_changes(existing_cluster(), {"spec.model_caches.0": {
        "name": "none"}}), "spec.model_caches.0"),
    "cache with only null kinds": (with_changes(existing_cluster(), {"spec.model_caches.0": {
        "name": "none", "host_path": None}}), "spec.model_caches.0"),
    "cache relative path": (with_changes(ssh_cluster(), {
        "spec.model_caches.0.host_path.path": "data"}), "spec.model_caches.0.host_path.path"),
    "eks pools without a node role": (with_changes(eks_cluster(), {
        "spec.config.eks.node_role_arn": DELETE}), "spec.config.eks"),
    "eks gpu pool without a gpu instance type": (with_changes(eks_cluster(), {
        "spec.config.eks.node_pools.1.instance_types": ["g5.xlarge", "m5.large"]}),
        "spec.config.eks.node_pools.1.instance_types.1"),
    "aks pool name with a hyphen": (with_changes(aks_cluster(), {
        "spec.config.aks.node_pools.1.name": "gpu-a"}), "spec.config.aks.node_pools.1.name"),
    "aks gpu pool without a gpu vm size": (with_changes(aks_cluster(), {
        "spec.config.aks.node_pools.1.instance_types": ["Standard_D4s_v5"]}),
        "spec.config.aks.node_pools.1.instance_types.0"),
    "router image without tag": (with_changes(existing_cluster(), {
        "spec.config.kubernetes.router.image": "airfleet/router"}),
        "spec.config.kubernetes.router.image"),
    "router image latest": (with_changes(existing_cluster(), {
        "spec.config.kubernetes.router.image": "registry.example:5000/airfleet/router:latest"}),
        "spec.config.kubernetes.router.image"),
    "vmagent image with spaces": (with_changes(existing_cluster(), {
        "spec.config.kubernetes.metrics.image": "vm agent:1"}),
        "spec.config.kubernetes.metrics.image"),
    "ray image latest": (with_changes(ssh_cluster(), {
        "spec.config.ssh.ray.image": "rayproject/ray:latest"}), "spec.config.ssh.ray.image"),
    "unknown service type": (with_changes(existing_cluster(), {
        "spec.config.kubernetes.router.service_type": "Headless"}),
        "spec.config.kubernetes.router.service_type"),
    "pvc size without unit": (with_changes(existing_cluster(), {
        "spec.model_caches.2.pvc.size": "500"}), "spec.model_caches.2.pvc.size"),
    "plaintext password in config.ssh": (with_changes(ssh_cluster(), {
        "spec.config.ssh.password": "x"}), "spec.config.ssh.password"),
    "plaintext private_key in config.ssh": (with_changes(ssh_cluster(), {
        "spec.config.ssh.private_key": "-----BEGIN"}), "spec.config.ssh.private_key"),
    "plaintext token in the credential": (with_changes(ssh_cluster(), {
        "spec.config.ssh.credential.token": "t0k3n"}), "spec.config.ssh.credential.token"),
    "plaintext kubeconfig in config.kubernetes": (with_changes(existing_cluster(), {
        "spec.config.kubernetes.kubeconfig": "apiVersion: v1"}),
        "spec.config.kubernetes.kubeconfig"),
    "plaintext password in the registry": (with_changes(ssh_cluster(), {
        "spec.image_registry.password": "x"}), "spec.image_registry.password"),
    "credential with two kinds": (with_changes(ssh_cluster(), {
        "spec.config.ssh.credential": {"airflow_conn_id": "c", "vault_id": VAULT_ID}}),
        "spec.config.ssh.credential"),
    "credential with no kind": (with_changes(ssh_cluster(), {"spec.config.ssh.credential": {}}),
                                "spec.config.ssh.credential"),
    "credential with only null kinds": (with_changes(ssh_cluster(), {
        "spec.config.ssh.credential": {"vault_id": None}}), "spec.config.ssh.credential"),
    "credential missing": (with_changes(ssh_cluster(), {"spec.config.ssh.credential": DELETE}),
                           "spec.config.ssh.credential"),
    "credential a plain string": (with_changes(ssh_cluster(), {
        "spec.config.ssh.credential": "hunter2"}), "spec.config.ssh.credential"),
    "sealed envelope bad key id": (with_changes(ssh_cluster(), {
        "spec.config.ssh.credential": {"sealed": "afv1.XYZ.a.b.c"}}),
        "spec.config.ssh.credential.sealed"),
    "sealed envelope missing a part": (with_changes(ssh_cluster(), {
        "spec.config.ssh.credential": {"sealed": "afv1.0123456789abcdef.a.b"}}),
        "spec.config.ssh.credential.sealed"),
    "sealed envelope other version": (with_changes(ssh_cluster(), {
        "spec.config.ssh.credential": {"sealed": SEALED.replace("afv1", "afv2")}}),
        "spec.config.ssh.credential.sealed"),
    "sealed envelope with padding": (with_changes(ssh_cluster(), {
        "spec.image_registry.ca_cert": {"sealed": SEALED + "=="}}),
        "spec.image_registry.ca_cert.sealed"),
    "vault id too short": (with_changes(ssh_cluster(), {
        "spec.config.ssh.credential": {"vault_id": "vlt_abc"}}),
        "spec.config.ssh.credential.vault_id"),
    "conn id with a space": (with_changes(existing_cluster(), {
        "spec.config.kubernetes.credential": {"airflow_conn_id": "k8s prod"}}),
        "spec.config.kubernetes.credential.airflow_conn_id"),
    "port 0": (with_changes(ssh_cluster(), {"spec.config.ssh.port": 0}), "spec.config.ssh.port"),
    "port 65536": (with_changes(ssh_cluster(), {"spec.config.ssh.port": 65536}),
                   "spec.config.ssh.port"),
    "port a string": (with_changes(ssh_cluster(), {"spec.config.ssh.port": "22"}),
                      "spec.config.ssh.port"),
    "port a boolean": (with_changes(ssh_cluster(), {"spec.config.ssh.port": True}),
                       "spec.config.ssh.port"),
    "port a fraction": (with_changes(ssh_cluster(), {"spec.config.ssh.port": 22.5}),
                        "spec.config.ssh.port"),
    "gcs port out of range": (with_changes(ssh_cluster(), {"spec.config.ssh.ray.gcs_port": 70000}),
                              "spec.config.ssh.ray.gcs_port"),
    "router replicas a string": (with_changes(existing_cluster(), {
        "spec.config.kubernetes.router.replicas": "2"}), "spec.config.kubernetes.router.replicas"),
    "gpu flag a string": (with_changes(eks_cluster(), {
        "spec.config.eks.node_pools.1.gpu": "yes"}), "spec.config.eks.node_pools.1.gpu"),
    "gpu flag a number": (with_changes(eks_cluster(), {
        "spec.config.eks.node_pools.1.gpu": 1}), "spec.config.eks.node_pools.1.gpu"),
    "container runtime unknown": (with_changes(ssh_cluster(), {
        "spec.config.ssh.container_runtime": "lxc"}), "spec.config.ssh.container_runtime"),
    "user invalid": (with_changes(ssh_cluster(), {"spec.config.ssh.user": "Root"}),
                     "spec.config.ssh.user"),
    "head invalid": (with_changes(ssh_cluster(), {"spec.config.ssh.head": "10.0.0.1 "}),
                     "spec.config.ssh.head"),
    "worker with a trailing newline": (with_changes(ssh_cluster(), {
        "spec.config.ssh.workers": ["10.0.0.2\n"]}), "spec.config.ssh.workers.0"),
    "workers duplicated": (with_changes(ssh_cluster(), {
        "spec.config.ssh.workers": ["10.0.0.2", "10.0.0.3", "10.0.0.2"]}),
        "spec.config.ssh.workers"),
    "node pool without instance types": (with_changes(eks_cluster(), {
        "spec.config.eks.node_pools.0.instance_types": []}),
        "spec.config.eks.node_pools.0.instance_types"),
    "node pool negative min": (with_changes(eks_cluster(), {
        "spec.config.eks.node_pools.0.min": -1}), "spec.config.eks.node_pools.0.min"),
    "node pool name invalid": (with_changes(eks_cluster(), {
        "spec.config.eks.node_pools.0.name": "CPU"}), "spec.config.eks.node_pools.0.name"),
    "taint effect unknown": (with_changes(eks_cluster(), {
        "spec.config.eks.node_pools.1.taints.0.effect": "Sometimes"}),
        "spec.config.eks.node_pools.1.taints.0.effect"),
    "eks region invalid": (with_changes(eks_cluster(), {"spec.config.eks.region": "US East"}),
                           "spec.config.eks.region"),
    "eks without subnets": (with_changes(eks_cluster(), {"spec.config.eks.subnet_ids": []}),
                            "spec.config.eks.subnet_ids"),
    "aks pool with two vm sizes": (with_changes(aks_cluster(), {
        "spec.config.aks.node_pools.1.instance_types": ["Standard_NC6", "Standard_NC12"]}),
        "spec.config.aks.node_pools.1.instance_types"),
    "aks resource group with a combining mark": (with_changes(aks_cluster(), {
        "spec.config.aks.resource_group": "rg\u0301"}), "spec.config.aks.resource_group"),
    "aks resource group with a superscript digit": (with_changes(aks_cluster(), {
        "spec.config.aks.resource_group": "rg\u00b2"}), "spec.config.aks.resource_group"),
    "aks subscription not a uuid": (with_changes(aks_cluster(), {
        "spec.config.aks.subscription_id": "sub-1"}), "spec.config.aks.subscription_id"),
    "registry url invalid": (with_changes(ssh_cluster(), {
        "spec.image_registry.url": "registry example"}), "spec.image_registry.url"),
    "unknown field in spec": (with_changes(ssh_cluster(), {"spec.replicas": 3}),
                              "spec.replicas"),
    "unknown field in config.ssh": (with_changes(ssh_cluster(), {"spec.config.ssh.hosts": []}),
                                    "spec.config.ssh.hosts"),
    "unknown config block": (with_changes(ssh_cluster(), {"spec.config.gke": {}}),
                             "spec.config.gke"),
    "status given in the conf": (with_changes(ssh_cluster(), {"status": {"phase": "Running"}}),
                                 "status"),
    "spec a list": (with_changes(ssh_cluster(), {"spec": []}), "spec"),
}

# Rules JSON Schema cannot state, so only the pydantic model enforces them (the first task fails
# with the message below; the REST API accepts the run). Keep this the one list of such rules.
PYDANTIC_ONLY: dict[str, tuple[dict[str, Any], str, str]] = {
    "head listed in workers": (
        with_changes(ssh_cluster(), {"spec.config.ssh.workers": ["10.0.0.2", "10.0.0.1"]}),
        "spec.config.ssh.workers",
        "relates two fields' values (head vs workers items); JSON Schema has no $data/compare"),
    "node pool min > desired": (
        with_changes(eks_cluster(), {"spec.config.eks.node_pools.0.min": 3}),
        "spec.config.eks.node_pools.0",
        "min <= desired <= max compares sibling values; JSON Schema bounds are constants"),
    "node pool desired > max": (
        with_changes(aks_cluster(), {"spec.config.aks.node_pools.0.desired": 5}),
        "spec.config.aks.node_pools.0",
        "min <= desired <= max compares sibling values; JSON Schema bounds are constants"),
    "model cache names repeated": (
        with_changes(existing_cluster(), {"spec.model_caches.1.name": "local"}),
        "spec.model_caches",
        "uniqueness of one property across array items; uniqueItems compares whole items"),
}


def pydantic_error_paths(exc: InvalidRequest) -> list[str]:
    """The dotted paths of an InvalidRequest message ("invalid request:\\n  <path>: <msg>...")."""
    lines = str(exc).splitlines()
    assert lines[0] == "invalid request:"
    return [line.strip().split(": ", 1)[0] for line in lines[1:]]


def names(path: str, expected: str) -> bool:
    return path == expected or path.startswith(expected + ".")


def assert_pydantic_names(cluster: dict[str, Any], expected: str) -> str:
    with pytest.raises(InvalidRequest) as caught:
        parse_conf(ClusterConf, {"cluster": cluster})
    paths = pydantic_error_paths(caught.value)
    assert any(names(p, f"cluster.{expected}") for p in paths), (expected, str(caught.value))
    return str(caught.value)


def assert_schema_names(cluster: dict[str, Any], expected: str) -> jsonschema.ValidationError:
    error = best_match(SCHEMA_VALIDATOR.iter_errors(cluster))
    assert error is not None, f"the JSON schema accepts a bad {expected}"
    path = ".".join(str(p) for p in error.absolute_path)
    parent, _, key = expected.rpartition(".")
    # A missing required key or an unexpected key is reported on the object holding it, with
    # the key named in the message.
    named = names(path, expected) or (path == parent and repr(key) in error.message)
    assert named, (expected, path, error.message)
    # The REST API's 400 is str(error), which shows the path relative to the enclosing anyOf /
    # oneOf, if any: it must be the full one.
    shown = "On instance" + "".join(f"[{p!r}]" for p in error.absolute_path) + ":"
    assert shown in str(error), str(error)
    return error


@pytest.mark.parametrize(("cluster", "expected"), BAD.values(), ids=BAD.keys())
def test_bad_cluster_is_rejected_by_both_naming_the_field(cluster, expected):
    assert_pydantic_names(copy.deepcopy(cluster), expected)
    assert_schema_names(cluster, expected)


@pytest.mark.parametrize("case", ["name uppercase", "plaintext token in the credential",
                                  "port a string", "nfs cache on ssh"])
def test_airflow_param_check_raises_the_best_match(case):
    cluster, _ = BAD[case]
    with pytest.raises(jsonschema.ValidationError) as caught:  # exactly what Airflow's Param runs
        jsonschema.validate(cluster, CLUSTER_SCHEMA, format_checker=FormatChecker())
    expected = best_match(SCHEMA_VALIDATOR.iter_errors(cluster))
    assert (caught.value.message, caught.value.absolute_path) == (expected.message,
                                                                  expected.absolute_path)


@pytest.mark.parametrize(("cluster", "expected", "reason"), PYDANTIC_ONLY.values(),
                         ids=PYDANTIC_ONLY.keys())
def test_pydantic_only_rules(cluster, expected, reason):
    assert_pydantic_names(copy.deepcopy(cluster), expected)
    # If the schema learns the rule, move the case to BAD.
    assert schema_errors(cluster) == [], f"now in the schema too, move it to BAD ({reason})"


def test_bad_cases_start_from_valid_clusters():
    """Each bad case differs from a valid cluster, so its rejection is the change's doing."""
    for cluster in (ssh_cluster(), existing_cluster(), eks_cluster(), aks_cluster()):
        assert schema_errors(cluster) == []
        parse_conf(ClusterConf, {"cluster": cluster})


# ---- messages ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["plaintext password in config.ssh",
                                  "plaintext token in the credential",
                                  "plaintext kubeconfig in config.kubernetes"])
def test_plaintext_secret_message_asks_for_a_credential_reference(case):
    secret = "s3cr3t-Plain-Text-Value"
    cluster = with_changes(BAD[case][0], {BAD[case][1]: secret})
    message = assert_pydantic_names(cluster, BAD[case][1])
    assert f"cluster.{BAD[case][1]}: {PLAINTEXT_SECRET_HINT}" in message
    assert "credential reference" in message
    for kind in ("airflow_conn_id", "vault_id", "sealed"):
        assert kind in message
    assert secret not in message  # the message never echoes the secret


@pytest.mark.parametrize("name", ["LLM-A", "llm_a", "-llm", "a" * 41])
def test_name_message_explains_dns_1123(name):
    message = assert_pydantic_names(with_changes(ssh_cluster(), {"metadata.name": name}),
                                    "metadata.name")
    if len(name) <= 40:
        assert "DNS-1123 label" in message
        assert "lowercase letters, digits and '-'" in message
    else:
        assert "40 characters" in message
    description = CLUSTER_SCHEMA["$defs"]["Metadata"]["properties"]["name"]["description"]
    assert "DNS-1123" in description and "40" in description


def test_credential_message_lists_the_kinds():
    cluster, expected = BAD["credential with two kinds"]
    message = assert_pydantic_names(copy.deepcopy(cluster), expected)
    assert "exactly one of airflow_conn_id, vault_id, sealed" in message


def test_every_error_is_reported():
    cluster = with_changes(ssh_cluster(), {"metadata.name": "BAD", "spec.config.ssh.port": 0})
    with pytest.raises(InvalidRequest) as caught:
        parse_conf(ClusterConf, {"cluster": cluster})
    assert set(pydantic_error_paths(caught.value)) == {"cluster.metadata.name",
                                                       "cluster.spec.config.ssh.port"}
    paths = {".".join(map(str, best_match([e]).absolute_path)) for e in schema_errors(cluster)}
    assert paths == {"metadata.name", "spec.config.ssh.port"}


# ---- the generated Param schemas -----------------------------------------------------------------

def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values()
                                                               for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


@pytest.mark.parametrize("conf_model", [ClusterConf, DeleteConf, HealthCheckConf])
def test_param_schemas_are_self_contained_and_json(conf_model):
    schemas = param_schemas(conf_model)
    assert set(schemas) == set(conf_model.model_fields)
    for schema in schemas.values():
        assert json.loads(json.dumps(schema)) == schema
        validator_for(schema).check_schema(schema)
        found = refs(schema)
        for ref in found:
            assert ref.startswith("#/"), ref
            node = schema
            for part in ref[2:].split("/"):
                assert part in node, f"{ref} does not resolve"
                node = node[part]
    if conf_model is ClusterConf:
        assert refs(schemas["cluster"]), "expected the cluster schema to use $defs"


def test_delete_and_health_check_schemas_have_defaults():
    delete = param_schemas(DeleteConf)
    assert delete["force"]["default"] is False and delete["force"]["type"] == "boolean"
    assert "default" not in delete["name"]
    health = param_schemas(HealthCheckConf)
    assert "default" in health["names"] and health["names"]["default"] is None
    validator_for(health["names"])(health["names"]).validate(None)
    validator_for(health["names"])(health["names"]).validate(["llm-a", "k8s-prod"])
    parsed = parse_conf(HealthCheckConf, {})
    assert parsed.names is None
    assert parse_conf(DeleteConf, {"name": "llm-a"}).force is False


@pytest.mark.parametrize(("conf_model", "conf", "field"), [
    (DeleteConf, {"name": "LLM"}, "name"),
    (DeleteConf, {"name": "llm-a", "force": "true"}, "force"),
    (DeleteConf, {"name": "llm-a", "force": 1}, "force"),
    (HealthCheckConf, {"names": ["ok", "Not_OK"]}, "names.1"),
    (HealthCheckConf, {"names": "llm-a"}, "names"),
])
def test_other_flow_confs_agree(conf_model, conf, field):
    with pytest.raises(InvalidRequest) as caught:
        parse_conf(conf_model, conf)
    assert any(names(p, field) for p in pydantic_error_paths(caught.value)), str(caught.value)
    key, _, rest = field.partition(".")
    schema = param_schemas(conf_model)[key]
    error = best_match(validator_for(schema)(schema, format_checker=FormatChecker())
                       .iter_errors(conf[key]))
    assert error is not None
    assert names(".".join(map(str, error.absolute_path)), rest), error.message


def test_missing_required_conf_key_is_reported():
    with pytest.raises(InvalidRequest, match=r"cluster: Field required"):
        parse_conf(ClusterConf, {})
    with pytest.raises(InvalidRequest, match=r"name: Field required"):
        parse_conf(DeleteConf, None)


def test_cluster_request_has_no_status():
    assert "status" not in ClusterRequest.model_fields
    assert "status" not in CLUSTER_SCHEMA["properties"]
    assert CLUSTER_SCHEMA["additionalProperties"] is False


@pytest.mark.parametrize("image", [
    "airfleet/router:0.1.0", "registry.example:5000/team/router:v1.2.3-rc.1",
    "ghcr.io/org/router@sha256:" + "a" * 64, "victoriametrics/vmagent:v1.106.1"])
def test_pinned_images_pass_both_checks(image):
    cluster = with_changes(existing_cluster(), {"spec.config.kubernetes.router.image": image})
    assert schema_errors(cluster) == []
    assert parse_conf(ClusterConf, {"cluster": cluster}).cluster.spec.config.kubernetes.router.image == image


@pytest.mark.parametrize("kind", ["g4dn.xlarge", "g5.48xlarge", "g6e.2xlarge", "gr6.4xlarge",
                                  "p4d.24xlarge", "p5.48xlarge", "p6-b200.48xlarge"])
def test_eks_gpu_instance_types_pass_both_checks(kind):
    cluster = with_changes(eks_cluster(), {"spec.config.eks.node_pools.1.instance_types": [kind]})
    assert schema_errors(cluster) == []
    parse_conf(ClusterConf, {"cluster": cluster})


def test_a_cpu_pool_takes_any_instance_type():
    cluster = with_changes(eks_cluster(), {"spec.config.eks.node_pools.0.instance_types": ["c7g.large"]})
    assert schema_errors(cluster) == []
    parse_conf(ClusterConf, {"cluster": cluster})
