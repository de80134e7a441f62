"""What the Kubernetes backend refuses for managed clusters before any cloud call."""

from __future__ import annotations

import copy

import pytest

from airfleet.backends.kubernetes.backend import KubernetesBackend
from airfleet.errors import InvalidRequest
from airfleet.resources import Cluster

EKS = {"metadata": {"name": "llm-eks"}, "spec": {"type": "kubernetes", "provider": "eks",
       "config": {"eks": {
           "credential": {"airflow_conn_id": "aws_default"}, "region": "eu-west-1",
           "role_arn": "arn:aws:iam::123456789012:role/eks",
           "node_role_arn": "arn:aws:iam::123456789012:role/node", "subnet_ids": ["subnet-1"],
           "node_pools": [{"name": "gpu", "instance_types": ["g5.xlarge"], "min": 0, "max": 2,
                           "desired": 1, "gpu": True}]}}}}


def changed(path: str, value) -> Cluster:
    data = copy.deepcopy(EKS)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[int(last) if last.isdigit() else last] = value
    return Cluster.model_validate(data)


@pytest.mark.parametrize("path, value, field", [
    ("spec.config.eks.region", "us-east-1", "cluster.spec.config.eks.region: cannot change"),
    ("spec.config.eks.version", "1.32", "cluster.spec.config.eks.version: cannot change"),
    ("spec.config.eks.node_pools.0.instance_types", ["g6.xlarge"],
     "cluster.spec.config.eks.node_pools.0.instance_types: a node pool's instance types"),
])
def test_an_update_that_cannot_be_made_in_place_names_the_field(path, value, field):
    with pytest.raises(InvalidRequest, match=field):
        KubernetesBackend().validate_update(Cluster.model_validate(EKS),
                                            changed(path, value).spec)


def test_sizes_and_new_pools_may_change():
    desired = changed("spec.config.eks.node_pools.0.max", 8).spec
    desired.config.eks.node_pools.append(desired.config.eks.node_pools[0].model_copy(
        update={"name": "gpu2"}))
    KubernetesBackend().validate_update(Cluster.model_validate(EKS), desired)


def test_cloud_credentials_must_be_airflow_connections():
    spec = changed("spec.config.eks.credential", {"vault_id": "vlt_" + "0" * 32}).spec
    with pytest.raises(InvalidRequest, match="cluster.spec.config.eks.credential: give an "
                                             "Airflow AWS connection"):
        KubernetesBackend().validate(spec)
