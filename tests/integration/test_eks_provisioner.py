"""The EKS provisioning layer with a real boto3 EKS client against moto's server."""

from __future__ import annotations

import pytest

from airfleet.backends.kubernetes.eks import GPU_AMI, EKSError, EKSProvisioner
from airfleet.resources import EKSConfig
from tests.fakes.moto_server import MotoServer

pytestmark = pytest.mark.integration

REGION = "eu-west-1"


@pytest.fixture(scope="module")
def moto():
    with MotoServer() as server:
        yield server


@pytest.fixture
def eks(moto):
    moto.reset()
    return moto.client("eks", REGION)


def config(**changes) -> EKSConfig:
    spec = {"credential": {"airflow_conn_id": "aws_default"}, "region": REGION,
            "role_arn": "arn:aws:iam::123456789012:role/eks",
            "node_role_arn": "arn:aws:iam::123456789012:role/eks-node",
            "subnet_ids": ["subnet-1", "subnet-2"], "tags": {"team": "search"},
            "node_pools": [
                {"name": "cpu", "instance_types": ["m5.large"], "min": 1, "max": 3, "desired": 1},
                {"name": "gpu", "instance_types": ["g5.xlarge"], "min": 0, "max": 4,
                 "desired": 1, "gpu": True, "labels": {"pool": "gpu"}}]}
    spec.update(changes)
    return EKSConfig.model_validate(spec)


def provisioner(eks, cfg: EKSConfig, created: list[str] | None = None) -> EKSProvisioner:
    return EKSProvisioner(eks, cfg, "llm-a", poll_seconds=0.01,
                          on_created=(created.append if created is not None else lambda w: None))


def nodegroup(eks, name: str) -> dict:
    return eks.describe_nodegroup(clusterName="llm-a", nodegroupName=name)["nodegroup"]


def test_create_from_nothing_tags_the_cluster_and_makes_gpu_pools_right(eks):
    created: list[str] = []
    result = provisioner(eks, config(), created).ensure()
    assert result.created == created == ["cluster llm-a", "nodegroup llm-a/cpu",
                                         "nodegroup llm-a/gpu"]
    assert result.adopted == [] and result.endpoint.startswith("https://")
    cluster = eks.describe_cluster(name="llm-a")["cluster"]
    assert cluster["tags"] == {"team": "search", "app.kubernetes.io/managed-by": "airfleet",
                               "airfleet.io/cluster": "llm-a"}
    assert cluster["resourcesVpcConfig"]["subnetIds"] == ["subnet-1", "subnet-2"]
    gpu = nodegroup(eks, "gpu")
    assert gpu["taints"] == [{"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"}]
    assert gpu["labels"] == {"nvidia.com/gpu.present": "true", "pool": "gpu"}
    assert gpu["amiType"] == GPU_AMI and gpu["instanceTypes"] == ["g5.xlarge"]
    assert gpu["scalingConfig"] == {"minSize": 0, "maxSize": 4, "desiredSize": 1}
    cpu = nodegroup(eks, "cpu")
    assert not cpu.get("taints") and cpu["amiType"] == "AL2023_x86_64_STANDARD"


def test_a_rerun_adopts_everything_and_creates_nothing(eks):
    provisioner(eks, config()).ensure()
    before = eks.describe_cluster(name="llm-a")["cluster"]["createdAt"]
    created: list[str] = []
    result = provisioner(eks, config(), created).ensure()
    assert created == [] and result.created == []
    assert result.adopted == ["cluster llm-a", "nodegroup llm-a/cpu", "nodegroup llm-a/gpu"]
    assert eks.describe_cluster(name="llm-a")["cluster"]["createdAt"] == before
    assert sorted(eks.list_nodegroups(clusterName="llm-a")["nodegroups"]) == ["cpu", "gpu"]


def test_a_cluster_that_is_not_ours_is_refused_and_left_alone(eks):
    eks.create_cluster(name="llm-a", version="1.31", roleArn="arn:aws:iam::123456789012:role/x",
                       resourcesVpcConfig={"subnetIds": ["subnet-9"]}, tags={"owner": "bob"})
    with pytest.raises(EKSError, match="exists in eu-west-1 and is not Airfleet's"):
        provisioner(eks, config()).ensure()
    assert eks.list_nodegroups(clusterName="llm-a")["nodegroups"] == []
    assert eks.describe_cluster(name="llm-a")["cluster"]["tags"] == {"owner": "bob"}
    with pytest.raises(EKSError, match="is not Airfleet's"):
        provisioner(eks, config()).teardown()
    assert eks.describe_cluster(name="llm-a")["cluster"]["status"] == "ACTIVE"


def test_scale_converges_sizes_adds_and_removes_pools(eks):
    provisioner(eks, config()).ensure()
    scaled = config(node_pools=[
        {"name": "gpu", "instance_types": ["g5.xlarge"], "min": 1, "max": 8, "desired": 3,
         "gpu": True},
        {"name": "gpu-big", "instance_types": ["p4d.24xlarge"], "min": 0, "max": 2,
         "desired": 0, "gpu": True}])
    changed = provisioner(eks, scaled).scale()
    assert changed == ["nodegroup gpu updated", "nodegroup gpu-big created",
                       "nodegroup cpu deleted"]
    assert sorted(eks.list_nodegroups(clusterName="llm-a")["nodegroups"]) == ["gpu", "gpu-big"]
    gpu = nodegroup(eks, "gpu")
    assert gpu["scalingConfig"] == {"minSize": 1, "maxSize": 8, "desiredSize": 3}
    assert gpu["labels"] == {"nvidia.com/gpu.present": "true"}  # the dropped label is gone
    assert provisioner(eks, scaled).scale() == []  # converged


def test_teardown_removes_pools_then_the_cluster_and_again_is_a_no_op(eks):
    provisioner(eks, config()).ensure()
    assert provisioner(eks, config()).teardown() == []
    assert eks.list_clusters()["clusters"] == []
    assert provisioner(eks, config()).teardown() == []


def test_cleanup_after_a_failed_create_removes_only_what_the_run_created(eks):
    # The cluster was adopted (an earlier run made it); this run created the GPU pool only.
    provisioner(eks, config(node_pools=[])).ensure()
    created: list[str] = []
    provisioner(eks, config(), created).ensure()
    assert created == ["nodegroup llm-a/cpu", "nodegroup llm-a/gpu"]
    assert provisioner(eks, config()).teardown(only=created[1:]) == []
    assert eks.list_nodegroups(clusterName="llm-a")["nodegroups"] == ["cpu"]
    assert eks.describe_cluster(name="llm-a")["cluster"]["status"] == "ACTIVE"
