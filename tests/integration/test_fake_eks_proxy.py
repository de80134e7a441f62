"""The EKS state proxy (tests/fakes/eks_proxy.py) in front of moto's server, driven by a real
boto3 client: the states it shows are the ones EKS shows, and the waiters agree."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from tests.fakes.eks_proxy import EKSStateProxy
from tests.fakes.moto_server import CREDENTIALS, MotoServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def proxy():
    with MotoServer() as moto, EKSStateProxy(moto.url, creating_polls=2,
                                              deleting_polls=2) as proxy:
        proxy.moto = moto
        yield proxy


@pytest.fixture
def eks(proxy):
    import boto3

    proxy.moto.reset()
    proxy.reset()
    return boto3.client("eks", endpoint_url=proxy.url, region_name="eu-west-1", **CREDENTIALS)


def _cluster(eks, name="c1"):
    eks.create_cluster(name=name, roleArn="arn:aws:iam::123456789012:role/eks",
                       resourcesVpcConfig={"subnetIds": ["subnet-1"]})


def _status(eks, name="c1"):
    return eks.describe_cluster(name=name)["cluster"]["status"]


def test_a_new_cluster_is_creating_for_the_polls_then_active(eks, proxy):
    _cluster(eks)
    assert [_status(eks) for _ in range(3)] == ["CREATING", "CREATING", "ACTIVE"]
    assert proxy.describes["cluster/c1"] == 3


def test_a_deleted_cluster_is_deleting_then_gone(eks):
    _cluster(eks)
    [_status(eks) for _ in range(2)]
    eks.delete_cluster(name="c1")
    assert [_status(eks) for _ in range(2)] == ["DELETING", "DELETING"]
    with pytest.raises(ClientError) as gone:
        _status(eks)
    assert gone.value.response["Error"]["Code"] == "ResourceNotFoundException"


def test_node_groups_create_update_and_fail(eks, proxy):
    _cluster(eks)
    eks.create_nodegroup(clusterName="c1", nodegroupName="gpu", subnets=["subnet-1"],
                         nodeRole="arn:aws:iam::123456789012:role/node",
                         scalingConfig={"minSize": 0, "maxSize": 2, "desiredSize": 1})

    def status():
        return eks.describe_nodegroup(clusterName="c1", nodegroupName="gpu")["nodegroup"]

    assert [status()["status"] for _ in range(3)] == ["CREATING", "CREATING", "ACTIVE"]
    eks.update_nodegroup_config(clusterName="c1", nodegroupName="gpu",
                                scalingConfig={"minSize": 0, "maxSize": 4, "desiredSize": 3})
    seen = [status() for _ in range(3)]
    assert [s["status"] for s in seen] == ["UPDATING", "UPDATING", "ACTIVE"]
    assert seen[-1]["scalingConfig"]["desiredSize"] == 3  # moto applied it: only the state lags
    proxy.fail_nodegroup("c1", "gpu")
    failed = status()
    assert failed["status"] == "CREATE_FAILED"
    assert failed["health"]["issues"][0]["code"] == "AsgInstanceLaunchFailures"


def test_the_boto_waiter_waits_through_creating(eks, proxy):
    _cluster(eks, "c2")
    eks.get_waiter("cluster_active").wait(name="c2", WaiterConfig={"Delay": 0.01,
                                                                   "MaxAttempts": 5})
    assert proxy.describes["cluster/c2"] == 3
