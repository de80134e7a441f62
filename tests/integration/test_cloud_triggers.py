"""The cloud wait triggers run as the triggerer runs them (``run()`` in an event loop), with
real async clients: aiobotocore through the amazon provider against moto behind the EKS state
proxy, the ``aio`` ``azure-mgmt-containerservice`` client against the fake ARM server. And
the EKS token kubeconfig, signed by the connection's identity."""

from __future__ import annotations

import asyncio
import base64
import json
from urllib.parse import parse_qs, urlparse

import pytest

from airfleet.backends.kubernetes.aks import AKSProvisioner
from airfleet.backends.kubernetes.eks import EKSProvisioner
from airfleet.resources import AKSConfig, Cluster, EKSConfig
from airfleet_airflow.triggers import AksOperationTrigger, EksWaitTrigger
from tests.fakes.arm_server import FakeARMServer
from tests.fakes.eks_proxy import EKSStateProxy
from tests.fakes.moto_server import MotoServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REGION = "eu-west-1"
SUB = "3f2c8a1e-5b7d-4e9a-9c21-6d0b7e4f1a55"
EKS = {"credential": {"airflow_conn_id": "aws_fake"}, "region": REGION,
       "role_arn": "arn:aws:iam::123456789012:role/eks",
       "node_role_arn": "arn:aws:iam::123456789012:role/node", "subnet_ids": ["subnet-1"],
       "node_pools": [{"name": "gpu", "instance_types": ["g5.xlarge"], "min": 0, "max": 2,
                       "desired": 1, "gpu": True}]}
AKS = {"credential": {"airflow_conn_id": "azure_fake"}, "subscription_id": SUB,
       "resource_group": "rg", "location": "westeurope", "version": "1.33",
       "node_pools": [{"name": "system", "instance_types": ["Standard_D4s_v5"], "min": 1,
                       "max": 1, "desired": 1}]}


@pytest.fixture(scope="module")
def proxy():
    with MotoServer() as moto, EKSStateProxy(moto.url, creating_polls=3) as proxy:
        proxy.moto = moto
        yield proxy


@pytest.fixture
def eks(proxy, monkeypatch):
    proxy.moto.reset()
    proxy.reset()
    monkeypatch.setenv("AIRFLOW_CONN_AWS_FAKE", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing",
        "extra": {"endpoint_url": proxy.url, "region_name": REGION}}))
    import boto3

    return boto3.client("eks", endpoint_url=proxy.url, region_name=REGION,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="module")
def arm_server():
    with FakeARMServer(operation_polls=2) as server:
        yield server


@pytest.fixture
def arm(arm_server, monkeypatch):
    arm_server.reset()
    arm_server.operation_polls = 2
    monkeypatch.setenv("AIRFLOW_CONN_AZURE_FAKE", json.dumps({
        "conn_type": "azure", "login": arm_server.client_id, "password": arm_server.client_secret,
        "extra": {"tenantId": arm_server.tenant_id, "base_url": arm_server.url,
                  "authority": arm_server.url, "connection_verify": arm_server.ca_file}}))
    return arm_server


@pytest.fixture
def lease(airfleet_home) -> dict:
    """The lease the waiting flow holds: every trigger keeps it while it waits."""
    from airfleet.store import Store

    store = Store()
    store.migrate()
    taken = store.acquire_lease("c1", "airfleet_cluster_create/run-1")
    store.dispose()
    return {"name": "c1", "holder": "airfleet_cluster_create/run-1", "token": taken.token}


def first_event(trigger) -> dict:
    async def go():
        async for event in trigger.run():
            return event.payload
    return asyncio.run(asyncio.wait_for(go(), 60))


def test_eks_trigger_waits_through_creating(eks, proxy, lease):
    provisioner = EKSProvisioner(eks, EKSConfig.model_validate(EKS), "c1")
    wait = provisioner.reconcile()
    assert wait.kind == "eks_cluster_active" and wait.what == "EKS cluster c1 CREATING"
    event = first_event(EksWaitTrigger(wait.to_dict(), lease, poll_interval=0.05))
    assert event == {"status": "success", "what": "EKS cluster c1 CREATING",
                     "message": "EKS cluster c1 CREATING: done"}
    assert proxy.describes["cluster/c1"] >= 4  # three CREATING, then ACTIVE


def test_eks_trigger_reports_a_failed_node_group_with_its_health_issue(eks, proxy, lease):
    provisioner = EKSProvisioner(eks, EKSConfig.model_validate(EKS), "c1")
    first_event(EksWaitTrigger(provisioner.reconcile().to_dict(), lease, poll_interval=0.05))
    proxy.fail_nodegroup("c1", "gpu")
    wait = provisioner.reconcile()
    assert wait.kind == "eks_nodegroup_active"
    event = first_event(EksWaitTrigger(wait.to_dict(), lease, poll_interval=0.05))
    assert event["status"] == "failed"
    assert "CREATE_FAILED" in event["message"] and "InsufficientInstanceCapacity" in \
        event["message"]


def test_aks_trigger_follows_the_operation_with_the_aio_client(arm, lease):
    with arm.client(SUB) as client:
        wait = AKSProvisioner(client, AKSConfig.model_validate(AKS), "c1").reconcile()
    assert wait.kind == "azure_operation" and wait.what == "AKS cluster c1: create"
    token = json.loads(base64.b64decode(wait.args["continuation_token"]))
    assert "authorization" not in json.dumps(token).lower()  # no bearer token travels
    [cluster] = arm.clusters().values()
    assert cluster["properties"]["provisioningState"] == "Creating"  # nobody polled it yet

    event = first_event(AksOperationTrigger(wait.to_dict(), lease, poll_interval=0))
    assert event["status"] == "success", event
    [cluster] = arm.clusters().values()
    assert cluster["properties"]["provisioningState"] == "Succeeded"


def test_aks_trigger_reports_azures_error_of_a_failed_operation(arm, lease):
    arm.fail_next_operation(code="QuotaExceeded", message="no vCPU quota left",
                            match=r"/managedClusters/c1$")
    with arm.client(SUB) as client:
        wait = AKSProvisioner(client, AKSConfig.model_validate(AKS), "c1").reconcile()
    event = first_event(AksOperationTrigger(wait.to_dict(), lease, poll_interval=0))
    assert event == {"status": "failed", "what": "AKS cluster c1: create",
                     "message": "AKS cluster c1: create: QuotaExceeded: no vCPU quota left"}


def test_aks_trigger_waits_for_an_operation_somebody_else_started(arm, lease):
    tags = {"app.kubernetes.io_managed-by": "airfleet", "airfleet.io_cluster": "c1"}
    with arm.client(SUB) as client:
        client.managed_clusters.begin_create_or_update("rg", "c1", {
            "location": "westeurope", "tags": tags, "properties": {
                "dnsPrefix": "c1", "agentPoolProfiles": [
                    {"name": "system", "count": 1, "vmSize": "Standard_D4s_v5",
                     "mode": "System"}]}}, polling=False)
        wait = AKSProvisioner(client, AKSConfig.model_validate(AKS), "c1").reconcile()
    assert wait.kind == "aks_settled" and wait.what.endswith("still Creating")
    event = first_event(AksOperationTrigger(wait.to_dict(), lease, poll_interval=0.05))
    assert event["status"] == "success"
    [cluster] = arm.clusters().values()
    assert cluster["properties"]["provisioningState"] == "Succeeded"


def test_eks_kubeconfig_carries_a_token_signed_for_the_cluster(eks):
    from airfleet_airflow.clients import _eks_kubeconfig

    EKSProvisioner(eks, EKSConfig.model_validate({**EKS, "node_pools": []}), "c1",
                   poll_seconds=0.01).ensure()
    cluster = Cluster.model_validate({"metadata": {"name": "c1"}, "spec": {
        "type": "kubernetes", "provider": "eks", "config": {"eks": EKS}}})
    config = _eks_kubeconfig(cluster)
    described = eks.describe_cluster(name="c1")["cluster"]
    assert config["clusters"][0]["cluster"] == {
        "server": described["endpoint"],
        "certificate-authority-data": described["certificateAuthority"]["data"]}
    token = config["users"][0]["user"]["token"]
    assert token.startswith("k8s-aws-v1.")
    url = base64.urlsafe_b64decode(token[len("k8s-aws-v1."):] + "==").decode()
    query = parse_qs(urlparse(url).query)
    assert query["Action"] == ["GetCallerIdentity"]
    assert "x-k8s-aws-id" in query["X-Amz-SignedHeaders"][0]  # bound to the cluster's name
    assert query["X-Amz-Expires"] == ["60"]  # a presigned URL, not a stored credential
