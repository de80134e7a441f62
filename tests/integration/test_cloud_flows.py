"""Managed Kubernetes end to end through ``dag.test()``: EKS against moto's server (behind
the state proxy of tests/fakes/eks_proxy.py, so clusters and node groups pass through
CREATING/UPDATING/DELETING), AKS against the fake Azure Resource Manager over https, each then
continuing as an existing Kubernetes cluster against the fake API server.

Real clients throughout: boto3 and aiobotocore through the amazon provider's ``EksHook`` and
its waiters, ``azure-mgmt-containerservice`` (sync and aio) through Airfleet's ``AksHook``,
the ``kubernetes`` client through the cncf-kubernetes hook. Assertions read the fakes' own
state, not what the flow says about itself. Every wait runs in the (inline) triggerer.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from airfleet import cli
from airfleet.backends.kubernetes import manifests as m
from airfleet.resources import Phase
from airfleet.store import Store
from tests.fakes.arm_server import FakeARMServer
from tests.fakes.eks_proxy import EKSStateProxy
from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.fakes.moto_server import MotoServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REGION = "eu-west-1"
SUB = "3f2c8a1e-5b7d-4e9a-9c21-6d0b7e4f1a55"
RG = "rg-llm"
AWS_CANARY = f"aws-canary-{secrets.token_hex(12)}"
AZURE_CANARY = f"azure-canary-{secrets.token_hex(12)}"
KUBE_CANARY = f"kube-canary-{secrets.token_hex(12)}"
GPU_LABELS = {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-A10G"}


@pytest.fixture(scope="module")
def moto():
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(moto):
    with EKSStateProxy(moto.url, creating_polls=2, deleting_polls=1) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def arm():
    with FakeARMServer(operation_polls=1) as server:
        server.client_secret = AZURE_CANARY  # the service principal's secret is the canary
        yield server


@pytest.fixture(scope="module")
def kube_server():
    with FakeKubeAPIServer(ready_delay=0.2, terminate_delay=0.2, token=KUBE_CANARY) as server:
        yield server


@pytest.fixture
def clouds(moto, proxy, arm, kube_server, airfleet_home, monkeypatch):
    """Fresh fakes, the Airflow connections to them, a fresh store and vault keys. The fake
    Kubernetes cluster has the nodes the GPU pools would bring (their labels)."""
    from airfleet import crypto

    moto.reset()
    proxy.reset()
    arm.reset()
    kube_server.reset()
    kube_server.add_node("gpu-1", labels=GPU_LABELS, allocatable={"nvidia.com/gpu": "1"})
    kube_server.add_node("cpu-1", labels={"kubernetes.io/os": "linux"})
    connections = {
        "aws_fake": {"conn_type": "aws", "login": "testing", "password": AWS_CANARY,
                     "extra": {"endpoint_url": proxy.url, "region_name": REGION}},
        "azure_fake": {"conn_type": "azure", "login": arm.client_id,
                       "password": arm.client_secret,
                       "extra": {"tenantId": arm.tenant_id, "base_url": arm.url,
                                 "authority": arm.url, "connection_verify": arm.ca_file}},
        # EKS's endpoint from moto is not a real API server: the test's kubeconfig override.
        "k8s_fake": {"conn_type": "kubernetes",
                     "extra": {"kube_config": json.dumps(kube_server.kubeconfig())}},
    }
    for conn_id, conn in connections.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    monkeypatch.setenv("AIRFLEET_CLOUD_POLL_SECONDS", "0.05")
    monkeypatch.setenv("AIRFLEET_READY_INLINE_SECONDS", "10")
    monkeypatch.delenv("AIRFLEET_BACKENDS", raising=False)
    Store().migrate()
    crypto.init_keys(Path(os.environ["AIRFLEET_KEYS_DIR"]))
    # AKS hands out an admin kubeconfig for the cluster: the fake API server's.
    arm.kubeconfig_for("llm-aks", kube_server.kubeconfig_yaml())
    return {"moto": moto, "proxy": proxy, "arm": arm, "kube": kube_server,
            "eks": moto.client("eks", REGION)}


def eks_cluster(name="llm-eks", **changes) -> dict:
    eks = {"credential": {"airflow_conn_id": "aws_fake"}, "region": REGION,
           "role_arn": "arn:aws:iam::123456789012:role/eks",
           "node_role_arn": "arn:aws:iam::123456789012:role/eks-node",
           "subnet_ids": ["subnet-1", "subnet-2"], "tags": {"team": "search"},
           "node_pools": [
               {"name": "cpu", "instance_types": ["m5.large"], "min": 1, "max": 2, "desired": 1},
               {"name": "gpu", "instance_types": ["g5.xlarge"], "min": 0, "max": 4,
                "desired": 1, "gpu": True, "labels": {"pool": "gpu"}}], **changes}
    return {"metadata": {"name": name}, "spec": {
        "type": "kubernetes", "provider": "eks",
        "config": {"eks": eks, "kubernetes": {"credential": {"airflow_conn_id": "k8s_fake"}}}}}


def aks_cluster(name="llm-aks", **changes) -> dict:
    aks = {"credential": {"airflow_conn_id": "azure_fake"}, "subscription_id": SUB,
           "resource_group": RG, "location": "westeurope", "version": "1.33",
           "node_pools": [
               {"name": "system", "instance_types": ["Standard_D4s_v5"], "min": 1, "max": 1,
                "desired": 1},
               {"name": "gpu", "instance_types": ["Standard_NC24ads_A100_v4"], "min": 0,
                "max": 3, "desired": 1, "gpu": True}], **changes}
    return {"metadata": {"name": name},
            "spec": {"type": "kubernetes", "provider": "aks", "config": {"aks": aks}}}


def run(dags, dag_id: str, conf: dict):
    return dags[dag_id].test(run_conf=conf)


def states(dr) -> dict[str, str]:
    return {t.task_id: str(t.state) for t in dr.get_task_instances()}


def events(name: str) -> list[tuple[str, str]]:
    return [(e.reason, e.message) for e in Store().events(name)]


def output(capfd, caplog) -> str:
    out = capfd.readouterr()
    return out.out + out.err + caplog.text


def eks_state(eks, name="llm-eks") -> dict:
    """What moto holds: the cluster's tags and each node group's scaling (or {} when gone)."""
    if name not in eks.list_clusters()["clusters"]:
        return {}
    groups = eks.list_nodegroups(clusterName=name)["nodegroups"]
    return {"tags": eks.describe_cluster(name=name)["cluster"]["tags"],
            "nodegroups": {g: eks.describe_nodegroup(clusterName=name, nodegroupName=g)
                           ["nodegroup"]["scalingConfig"] for g in sorted(groups)}}


def aks_pools(arm) -> dict[str, dict]:
    [cluster] = arm.clusters().values()
    return {n: p["properties"] for n, p in arm.agent_pools(cluster["id"]).items()}


# ---- EKS --------------------------------------------------------------------------------------

def test_eks_create_running_scale_delete(dags, clouds, capfd, caplog, airfleet_home):
    eks, proxy, kube = clouds["eks"], clouds["proxy"], clouds["kube"]
    dr = run(dags, "airfleet_cluster_create", {"cluster": eks_cluster()})
    assert str(dr.state) == "success", states(dr)
    record = Store().require_cluster("llm-eks")
    assert record.phase is Phase.RUNNING, record.cluster.status.message
    made = eks_state(eks)
    assert made["tags"] == {"team": "search", m.MANAGED_BY: "airfleet",
                            m.CLUSTER_LABEL: "llm-eks"}
    assert made["nodegroups"] == {"cpu": {"minSize": 1, "maxSize": 2, "desiredSize": 1},
                                  "gpu": {"minSize": 0, "maxSize": 4, "desiredSize": 1}}
    # Each wait went through the CREATING describes the proxy showed, in the triggerer.
    assert proxy.describes["cluster/llm-eks"] >= 3
    assert proxy.describes["nodegroup/llm-eks/gpu"] >= 3
    log = output(capfd, caplog)
    assert "EKS cluster llm-eks CREATING; waiting up to" in log
    assert "EKS node group llm-eks/gpu CREATING; waiting up to" in log
    # Recorded as they came to exist, with the run that made them.
    resources = {r.name: r.created_by for r in record.cluster.status.resources}
    assert resources == {"cluster llm-eks": record.cluster.status.last_run_id,
                         "nodegroup llm-eks/cpu": record.cluster.status.last_run_id,
                         "nodegroup llm-eks/gpu": record.cluster.status.last_run_id}
    assert ("ResourceCreated", "cluster llm-eks") in events("llm-eks")
    # ... then exactly as an existing cluster: namespace, router, accelerators from the nodes.
    ns = m.namespace_of("llm-eks")
    assert kube.get("Deployment", m.ROUTER, ns) is not None
    assert record.cluster.status.accelerators["models"] == {"NVIDIA-A10G": 1}

    # Scale: the GPU pool's bounds and size, through the update flow, as the shipped
    # cap_node_pool policy (bound with the CLI, run in its own interpreter) lowers them.
    assert cli.main(["policies", "bind", "scale_nodegroup=cap_node_pool",
                     "--param", "max_per_pool=2"]) == 0
    scaled = eks_cluster()
    scaled["spec"]["config"]["eks"]["node_pools"][1].update(min=1, max=6, desired=3)
    dr = run(dags, "airfleet_cluster_update", {"cluster": scaled})
    assert str(dr.state) == "success", states(dr)
    assert eks_state(eks)["nodegroups"]["gpu"] == {"minSize": 1, "maxSize": 2, "desiredSize": 2}
    recorded = Store().require_cluster("llm-eks").cluster.spec.config.eks.node_pools[1]
    assert (recorded.min, recorded.max, recorded.desired) == (1, 2, 2)
    assert proxy.describes["nodegroup/llm-eks/gpu"] >= 6  # it waited through UPDATING
    log = output(capfd, caplog)
    assert 'action scale_nodegroup: {"pool": "gpu", "from": {"min": 0, "max": 4, "desired": ' \
           '1}, "to": {"min": 1, "max": 6, "desired": 3}}' in log
    assert "policy cap_node_pool: scale_nodegroup allowed (changed to): lowered cluster " \
           "llm-eks to max_per_pool 2" in log
    (decision,) = [a for a in Store().policy_audit("llm-eks") if a["kind"] == "decision"
                   and a["action"] == "scale_nodegroup"]
    assert decision["policy"] == "cap_node_pool" and decision["allowed"] is True
    assert ("NodePoolChanged", "nodegroup gpu updated") in events("llm-eks")
    assert Store().require_cluster("llm-eks").phase is Phase.RUNNING
    assert_no_canary(capfd, caplog, airfleet_home)

    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-eks"})
    assert str(dr.state) == "success", states(dr)
    assert eks_state(eks) == {}
    assert kube.get("Namespace", ns) is None
    assert Store().get_cluster("llm-eks") is None
    assert "EKS cluster llm-eks DELETING; waiting up to" in output(capfd, caplog)


def test_eks_node_group_failure_removes_what_the_run_created(dags, clouds, capfd, caplog):
    eks, proxy = clouds["eks"], clouds["proxy"]
    proxy.fail_nodegroup("llm-eks", "gpu")
    dr = run(dags, "airfleet_cluster_create", {"cluster": eks_cluster()})
    assert str(dr.state) == "failed"
    assert states(dr)["set_up"] == "failed" and states(dr)["cleanup_on_failure"] == "success"
    status = Store().require_cluster("llm-eks").cluster.status
    assert status.phase is Phase.FAILED
    assert "CREATE_FAILED" in status.message and "AsgInstanceLaunchFailures" in status.message
    assert "removed what this run created: cluster llm-eks, nodegroup llm-eks/cpu, " \
           "nodegroup llm-eks/gpu" in status.message
    assert eks_state(eks) == {}  # the cluster and both node groups are gone
    assert status.resources == []  # what was removed is no longer listed
    # Deleting the Airfleet cluster now: everything is already gone, which is success.
    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-eks"})
    assert str(dr.state) == "success", states(dr)
    assert Store().get_cluster("llm-eks") is None
    assert "EKS cluster llm-eks is gone" in output(capfd, caplog)


def test_eks_node_group_failure_keeps_the_cluster_when_asked_and_a_rerun_adopts_it(
        dags, clouds, capfd, caplog):
    eks, proxy = clouds["eks"], clouds["proxy"]
    proxy.fail_nodegroup("llm-eks", "gpu")
    keep = eks_cluster(delete_on_failure=False)
    dr = run(dags, "airfleet_cluster_create", {"cluster": keep})
    assert str(dr.state) == "failed"
    status = Store().require_cluster("llm-eks").cluster.status
    assert "kept what this run created (delete_on_failure is false): cluster llm-eks" in \
        status.message
    assert "kept what this run created" in output(capfd, caplog)
    created_at = eks.describe_cluster(name="llm-eks")["cluster"]["createdAt"]

    # The retry (the instances can launch now) adopts the cluster instead of failing on it.
    proxy.reset()
    dr = run(dags, "airfleet_cluster_create", {"cluster": keep})
    assert str(dr.state) == "success", states(dr)
    assert eks.describe_cluster(name="llm-eks")["cluster"]["createdAt"] == created_at
    assert eks.list_clusters()["clusters"] == ["llm-eks"]
    assert Store().require_cluster("llm-eks").phase is Phase.RUNNING
    created = [message for reason, message in events("llm-eks") if reason == "ResourceCreated"]
    assert created.count("cluster llm-eks") == 1  # made once, by the first run


def test_an_eks_cluster_that_is_not_ours_is_refused_and_left_alone(dags, clouds):
    eks = clouds["eks"]
    eks.create_cluster(name="llm-eks", roleArn="arn:aws:iam::123456789012:role/x",
                       resourcesVpcConfig={"subnetIds": ["subnet-9"]}, tags={"owner": "bob"})
    dr = run(dags, "airfleet_cluster_create", {"cluster": eks_cluster()})
    assert str(dr.state) == "failed"
    assert "is not Airfleet's" in Store().require_cluster("llm-eks").cluster.status.message
    assert eks_state(eks) == {"tags": {"owner": "bob"}, "nodegroups": {}}


# ---- AKS --------------------------------------------------------------------------------------

def test_aks_create_running_scale_delete(dags, clouds, capfd, caplog, airfleet_home):
    arm, kube = clouds["arm"], clouds["kube"]
    arm.operation_polls = 2
    dr = run(dags, "airfleet_cluster_create", {"cluster": aks_cluster()})
    assert str(dr.state) == "success", states(dr)
    record = Store().require_cluster("llm-aks")
    assert record.phase is Phase.RUNNING, record.cluster.status.message
    pools = aks_pools(arm)
    assert (pools["system"]["mode"], pools["gpu"]["mode"]) == ("System", "User")
    assert pools["gpu"]["nodeTaints"] == ["nvidia.com/gpu=true:NoSchedule"]
    log = output(capfd, caplog)
    assert "AKS cluster llm-aks: create; waiting up to" in log
    assert "agentPool llm-aks/gpu: create; waiting up to" in log
    # The admin kubeconfig went to the vault; the namespace is in the cluster it opens.
    vault_id = record.cluster.status.kubeconfig_vault_id
    assert vault_id and Store().get_secret(vault_id)
    ns = m.namespace_of("llm-aks")
    assert kube.get("Deployment", m.ROUTER, ns) is not None
    assert {r.name for r in record.cluster.status.resources} == {
        "managedCluster llm-aks", "agentPool llm-aks/system", "agentPool llm-aks/gpu"}

    scaled = aks_cluster()
    scaled["spec"]["config"]["aks"]["node_pools"][1].update(min=1, max=5, desired=2)
    dr = run(dags, "airfleet_cluster_update", {"cluster": scaled})
    assert str(dr.state) == "success", states(dr)
    gpu = aks_pools(arm)["gpu"]
    assert (gpu["minCount"], gpu["maxCount"], gpu["enableAutoScaling"]) == (1, 5, True)
    assert any(reason == "NodePoolChanged" and "maxCount 3 -> 5" in message
               for reason, message in events("llm-aks"))
    # The admin kubeconfig (it holds the Kubernetes token) is in the vault, sealed.
    assert Store().require_cluster("llm-aks").cluster.status.kubeconfig_vault_id
    assert_no_canary(capfd, caplog, airfleet_home)

    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-aks"})
    assert str(dr.state) == "success", states(dr)
    assert arm.clusters() == {}
    assert kube.get("Namespace", ns) is None
    assert Store().get_cluster("llm-aks") is None
    assert Store().secret_ids() == []  # the kubeconfig left with its cluster


def test_an_aks_operation_that_fails_surfaces_azures_message_and_cleans_up(dags, clouds):
    arm = clouds["arm"]
    arm.fail_next_operation(code="QuotaExceeded", message="Insufficient regional vcpu quota "
                            "left for family NCADSA100v4: 0 of 24", match=r"/agentPools/gpu$")
    dr = run(dags, "airfleet_cluster_create", {"cluster": aks_cluster()})
    assert str(dr.state) == "failed"
    status = Store().require_cluster("llm-aks").cluster.status
    assert status.phase is Phase.FAILED
    assert "agentPool llm-aks/gpu: create: QuotaExceeded: Insufficient regional vcpu quota " \
           "left for family NCADSA100v4: 0 of 24" in status.message
    assert "removed what this run created: managedCluster llm-aks" in status.message
    assert arm.clusters() == {}


# ---- bad input and secrets ----------------------------------------------------------------------

@pytest.mark.parametrize("cluster, path", [
    (eks_cluster(region="Europe West"), "['spec']['config']['eks']['region']"),
    (aks_cluster(location="West Europe"), "['spec']['config']['aks']['location']"),
    (eks_cluster(node_pools=[{"name": "gpu", "instance_types": ["m5.large"], "gpu": True}]),
     "['spec']['config']['eks']['node_pools'][0]['instance_types'][0]"),
], ids=["region", "location", "gpu-pool-without-gpu"])
def test_bad_cloud_specs_are_refused_naming_the_field_before_a_cloud_call(dags, clouds,
                                                                          cluster, path):
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError) as err:
        run(dags, "airfleet_cluster_create", {"cluster": cluster})
    assert path in str(err.value)
    assert clouds["eks"].list_clusters()["clusters"] == [] and clouds["arm"].requests == []


@pytest.mark.parametrize("cluster, field", [
    (eks_cluster(credential={"airflow_conn_id": "aws_nope"}),
     "cluster.spec.config.eks.credential: Airflow connection 'aws_nope' does not exist"),
    (aks_cluster(credential={"airflow_conn_id": "azure_nope"}),
     "cluster.spec.config.aks.credential: Airflow connection 'azure_nope' does not exist"),
    (aks_cluster(credential={"vault_id": "vlt_" + "0" * 32}),
     "cluster.spec.config.aks.credential: give an Airflow Azure connection"),
    # The schema cannot compare fields: the first task's check names it.
    (eks_cluster(node_pools=[{"name": "gpu", "instance_types": ["g5.xlarge"], "min": 3,
                              "max": 1, "desired": 1, "gpu": True}]),
     "cluster.spec.config.eks.node_pools.0: need min <= desired <= max (got 3 <= 1 <= 1)"),
], ids=["aws-conn", "azure-conn", "vault-id", "min-over-max"])
def test_what_the_schema_cannot_say_fails_validate_before_a_cloud_call(dags, clouds, capfd,
                                                                        caplog, cluster, field):
    dr = run(dags, "airfleet_cluster_create", {"cluster": cluster})
    assert str(dr.state) == "failed" and states(dr)["admit"] == "failed"
    assert field in output(capfd, caplog)
    assert Store().list_clusters(include_deleted=True) == []
    assert clouds["eks"].list_clusters()["clusters"] == [] and clouds["arm"].requests == []


def assert_no_canary(capfd, caplog, airfleet_home: Path) -> None:
    """No cloud secret (the AWS secret key, the Azure client secret) and no kubeconfig token in
    the logs, nor in any file of Airflow (its DB: XCom, trigger kwargs, rendered fields; task
    logs) or of Airfleet (the store, the vault's rows hold ciphertext only)."""
    text = output(capfd, caplog)
    files = [p for p in (*airfleet_home.rglob("*"), *Path(os.environ["AIRFLOW_HOME"]).rglob("*"))
             if p.is_file()]
    for canary in (AWS_CANARY, AZURE_CANARY, KUBE_CANARY):
        assert canary not in text
        for path in files:
            assert canary.encode() not in path.read_bytes(), f"{canary[:12]} in {path}"
