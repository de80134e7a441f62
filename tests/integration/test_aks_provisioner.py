"""AKSProvisioner (include/airfleet/backends/kubernetes/aks.py) with the real
`azure-mgmt-containerservice` client against the fake ARM server (tests/fakes/arm_server.py).

Assertions read the fake's recorded state (`clusters()`, `agent_pools()`, `requests`), not what
the provisioner reports about itself. One server for the module, `reset()` before each test.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import pytest

from airfleet.backends.kubernetes.aks import (
    TAG_CLUSTER,
    TAG_MANAGED_BY,
    AKSError,
    AKSProvisioner,
)
from airfleet.resources import AKSConfig
from tests.fakes.arm_server import FakeARMServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SUB = "3f2c8a1e-5b7d-4e9a-9c21-6d0b7e4f1a55"
RG = "rg-llm"
NAME = "llm-a"
SYSTEM = {"name": "system", "instance_types": ["Standard_D4s_v5"], "min": 1, "max": 1,
          "desired": 1}
GPU = {"name": "gpu", "instance_types": ["Standard_NC24ads_A100_v4"], "min": 0, "max": 3,
       "desired": 1, "gpu": True, "labels": {"airfleet.io/accelerator": "a100"},
       "taints": [{"key": "dedicated", "value": "inference", "effect": "NoExecute"}]}
CPU = {"name": "cpu", "instance_types": ["Standard_D8s_v5"], "min": 2, "max": 2, "desired": 2}
OURS = {"team": "search", "app.kubernetes.io_managed-by": "airfleet",
        "airfleet.io_cluster": NAME}


def aks_config(*pools: dict, **fields) -> AKSConfig:
    return AKSConfig.model_validate({
        "credential": {"airflow_conn_id": "azure_default"}, "subscription_id": SUB,
        "resource_group": RG, "location": "westeurope", "version": "1.33",
        "tags": {"team": "search"}, "node_pools": list(pools or (SYSTEM, GPU, CPU)), **fields})


@pytest.fixture(scope="module")
def server():
    with FakeARMServer() as server:
        yield server


@pytest.fixture
def arm(server):
    server.reset()
    return server


@pytest.fixture
def client(arm):
    with arm.client(SUB) as client:
        yield client


def provisioner(client, cfg: AKSConfig | None = None, **kwargs) -> AKSProvisioner:
    return AKSProvisioner(client, cfg or aks_config(), NAME, poll_seconds=0, **kwargs)


def fake_cluster(arm: FakeARMServer) -> dict:
    [cluster] = arm.clusters().values()
    return cluster


def fake_pools(arm: FakeARMServer) -> dict[str, dict]:
    return {name: pool["properties"] for name, pool in
            arm.agent_pools(fake_cluster(arm)["id"]).items()}


def arm_calls(arm: FakeARMServer) -> list[tuple[str, str, int]]:
    """ARM requests as (method, path below the resource group, status); token calls left out."""
    out = []
    for method, path, status in arm.requests:
        path = path.split("?")[0]
        if "/operations/" in path or "/operationresults/" in path:
            out.append((method, "operation", status))
        elif f"/resourceGroups/{RG}/" in path or f"/resourcegroups/{RG}/" in path:
            out.append((method, path.split("/providers/Microsoft.ContainerService/")[1], status))
    return out


def writes(arm: FakeARMServer) -> list[tuple[str, str, int]]:
    return [c for c in arm_calls(arm) if c[0] not in ("GET", "HEAD")]


def test_create_from_nothing(arm, client):
    seen = []

    def on_created(what: str) -> None:  # the resource must exist already, still Creating
        cluster = fake_cluster(arm)
        pool = what.rsplit("/", 1)[1] if what.startswith("agentPool ") else None
        resource = arm.agent_pools(cluster["id"])[pool] if pool else cluster
        seen.append((what, resource["properties"]["provisioningState"]))

    result = provisioner(client, on_created=on_created).ensure()

    assert seen == [("managedCluster llm-a", "Creating"), ("agentPool llm-a/system", "Creating"),
                    ("agentPool llm-a/gpu", "Creating"), ("agentPool llm-a/cpu", "Creating")]
    assert result.created == [what for what, _ in seen]
    assert result.adopted == []
    cluster = fake_cluster(arm)
    props = cluster["properties"]
    assert result.endpoint == props["fqdn"]
    assert cluster["tags"] == OURS
    assert not any(re.search(r"[<>%&\\?/]", key) for key in cluster["tags"])  # Azure's rule
    assert (cluster["name"], cluster["location"], cluster["identity"]) == (
        NAME, "westeurope", {"type": "SystemAssigned"})
    assert (props["dnsPrefix"], props["kubernetesVersion"], props["provisioningState"]) == (
        NAME, "1.33", "Succeeded")
    pools = fake_pools(arm)
    assert list(pools) == ["system", "gpu", "cpu"]
    system, gpu, cpu = pools["system"], pools["gpu"], pools["cpu"]
    assert (system["mode"], system["vmSize"], system["count"], system["enableAutoScaling"]) == (
        "System", "Standard_D4s_v5", 1, False)
    assert (gpu["mode"], gpu["vmSize"], gpu["enableAutoScaling"], gpu["minCount"],
            gpu["maxCount"], gpu["count"]) == ("User", "Standard_NC24ads_A100_v4", True, 0, 3, 1)
    assert sorted(gpu["nodeTaints"]) == ["dedicated=inference:NoExecute",
                                         "nvidia.com/gpu=true:NoSchedule"]
    assert gpu["nodeLabels"] == {"nvidia.com/gpu.present": "true",
                                 "airfleet.io/accelerator": "a100"}
    assert (cpu["mode"], cpu["count"], cpu["enableAutoScaling"], cpu["nodeTaints"],
            cpu["nodeLabels"]) == ("User", 2, False, [], {})
    assert "minCount" not in cpu
    assert all(p["tags"] == OURS and p["provisioningState"] == "Succeeded"
               for p in pools.values())
    # One write at a time: the cluster (with its System pool), then each User pool; no 409.
    assert writes(arm) == [("PUT", "managedClusters/llm-a", 201),
                           ("PUT", "managedClusters/llm-a/agentPools/gpu", 201),
                           ("PUT", "managedClusters/llm-a/agentPools/cpu", 201)]


def test_rerun_adopts_without_writing(arm, client, caplog):
    provisioner(client).ensure()
    arm.requests.clear()
    calls = []

    with caplog.at_level(logging.WARNING, logger="airfleet"):
        result = provisioner(client, aks_config(version="1.34"), on_created=calls.append).ensure()

    assert (result.created, calls) == ([], [])
    assert result.adopted == ["managedCluster llm-a", "agentPool llm-a/system",
                              "agentPool llm-a/gpu", "agentPool llm-a/cpu"]
    assert result.endpoint == fake_cluster(arm)["properties"]["fqdn"]
    assert writes(arm) == []  # no PUT of the cluster or of any pool
    assert "not upgraded" in caplog.text  # a version change is reported, not applied
    assert fake_cluster(arm)["properties"]["kubernetesVersion"] == "1.33"

    arm.requests.clear()  # a tag added to the spec: PATCH of the cluster's tags, no PUT of it
    provisioner(client, aks_config(tags={"team": "search", "cost-center": "42"})).ensure()

    assert [(m, p) for m, p, _ in writes(arm)] == [
        ("PATCH", "managedClusters/llm-a"), ("PUT", "managedClusters/llm-a/agentPools/system"),
        ("PUT", "managedClusters/llm-a/agentPools/gpu"),
        ("PUT", "managedClusters/llm-a/agentPools/cpu")]
    assert fake_cluster(arm)["tags"] == {**OURS, "cost-center": "42"}
    assert {p["tags"]["cost-center"] for p in fake_pools(arm).values()} == {"42"}


def test_foreign_cluster_is_refused_and_left_alone(arm, client):
    client.managed_clusters.begin_create_or_update(RG, NAME, {
        "location": "westeurope", "tags": {"owner": "someone-else"},
        "properties": {"dnsPrefix": "theirs", "agentPoolProfiles": [
            {"name": "nodes", "count": 3, "vmSize": "Standard_D2s_v5", "mode": "System"}]},
    }).result()
    before = (arm.clusters(), fake_pools(arm))
    arm.requests.clear()
    p = provisioner(client)

    with pytest.raises(AKSError, match="exists in resource group rg-llm and is not Airfleet's"):
        p.ensure()
    for verb in (p.scale, p.teardown, p.admin_kubeconfig):
        with pytest.raises(AKSError, match="not Airfleet's"):
            verb()

    assert writes(arm) == []
    assert (arm.clusters(), fake_pools(arm)) == before


def test_scale_up_down_and_remove_a_pool(arm, client):
    provisioner(client).ensure()
    client.agent_pools.begin_create_or_update(  # somebody else's pool on our cluster
        RG, NAME, "extra", {"properties": {"count": 1, "vmSize": "Standard_D2s_v5"}}).result()
    arm.requests.clear()
    batch = {"name": "batch", "instance_types": ["Standard_D8s_v5"], "min": 1, "max": 1,
             "desired": 1}
    wider = {**GPU, "min": 1, "max": 5, "labels": {**GPU["labels"], "tier": "premium"}}

    changes = provisioner(client, aks_config({**SYSTEM, "min": 2, "max": 2, "desired": 2},
                                             wider, batch)).scale()

    pools = fake_pools(arm)
    assert sorted(pools) == ["batch", "extra", "gpu", "system"]  # cpu gone, extra kept
    assert pools["system"]["count"] == 2
    gpu = pools["gpu"]
    assert (gpu["enableAutoScaling"], gpu["minCount"], gpu["maxCount"], gpu["count"]) == (
        True, 1, 5, 1)  # the autoscaler's count stays while it is inside the new bounds
    assert gpu["nodeLabels"]["tier"] == "premium"
    assert "nvidia.com/gpu=true:NoSchedule" in gpu["nodeTaints"]
    assert (pools["batch"]["mode"], pools["batch"]["tags"]) == ("User", OURS)
    assert sorted(c.split(":")[0] for c in changes) == [
        "agentPool llm-a/batch created", "agentPool llm-a/cpu deleted",
        "agentPool llm-a/gpu updated", "agentPool llm-a/system updated"]
    assert [p for m, p, _ in writes(arm) if m == "DELETE"] == ["managedClusters/llm-a/agentPools/cpu"]

    arm.requests.clear()  # converged: nothing to do
    assert provisioner(client, aks_config({**SYSTEM, "min": 2, "max": 2, "desired": 2}, wider,
                                          batch)).scale() == []
    assert writes(arm) == []

    # Down: the GPU pool to a fixed 0 nodes (autoscaling off), the batch pool removed.
    changes = provisioner(client, aks_config(SYSTEM, {**GPU, "min": 0, "max": 0,
                                                      "desired": 0})).scale()

    pools = fake_pools(arm)
    assert sorted(pools) == ["extra", "gpu", "system"]
    assert (pools["gpu"]["enableAutoScaling"], pools["gpu"]["count"]) == (False, 0)
    assert pools["system"]["count"] == 1
    assert "agentPool llm-a/batch deleted" in changes


def test_admin_kubeconfig_is_the_clusters_and_never_logged(arm, client, caplog):
    provisioner(client).ensure()
    kubeconfig = ("apiVersion: v1\nkind: Config\ncurrent-context: fake\nusers:\n"
                  "- name: admin\n  user: {token: canary-9f8e7d6c5b4a}\n")
    arm.kubeconfig_for(NAME, kubeconfig)

    with caplog.at_level(logging.DEBUG):
        got = provisioner(client).admin_kubeconfig()

    assert got == kubeconfig.encode()
    assert [(m, p) for m, p, _ in writes(arm)][-1] == (
        "POST", "managedClusters/llm-a/listClusterAdminCredential")
    assert "canary-9f8e7d6c5b4a" not in caplog.text


def test_teardown_removes_pools_then_cluster_and_again_is_a_no_op(arm, client):
    provisioner(client).ensure()
    arm.requests.clear()

    assert provisioner(client).teardown() == []

    assert arm.clusters() == {}
    assert [(m, p) for m, p, _ in writes(arm)] == [
        ("DELETE", "managedClusters/llm-a/agentPools/gpu"),
        ("DELETE", "managedClusters/llm-a/agentPools/cpu"),
        ("DELETE", "managedClusters/llm-a")]

    arm.requests.clear()
    assert provisioner(client).teardown() == []
    assert arm_calls(arm) == [("GET", "managedClusters/llm-a", 404)]


def test_failed_pool_operation_surfaces_azure_message_and_a_rerun_repairs_it(arm, client):
    arm.fail_next_operation(code="QuotaExceeded", message="Insufficient regional vcpu quota "
                            "left for family NCADSA100v4: 0 of 24", match=r"/agentPools/gpu$")
    calls = []

    with pytest.raises(AKSError) as failed:
        provisioner(client, on_created=calls.append).ensure()

    assert failed.value.code == "QuotaExceeded"
    assert "agentPool llm-a/gpu: create: QuotaExceeded: Insufficient regional vcpu quota left " \
           "for family NCADSA100v4: 0 of 24" in str(failed.value)
    assert calls == ["managedCluster llm-a", "agentPool llm-a/system", "agentPool llm-a/gpu"]
    pools = fake_pools(arm)
    assert pools["gpu"]["provisioningState"] == "Failed"
    assert "cpu" not in pools  # nothing after the failure

    arm.requests.clear()
    result = provisioner(client).ensure()  # the retry adopts and reconciles the Failed pool

    assert result.created == ["agentPool llm-a/cpu"]
    assert "agentPool llm-a/gpu" in result.adopted
    assert ("PUT", "managedClusters/llm-a/agentPools/gpu", 200) in writes(arm)
    assert {p["provisioningState"] for p in fake_pools(arm).values()} == {"Succeeded"}


def test_cleanup_of_only_what_a_failed_run_created_on_an_adopted_cluster(arm, client):
    provisioner(client, aks_config(SYSTEM)).ensure()
    arm.fail_next_operation(code="AllocationFailed", message="no A100 capacity in zone 1",
                            match=r"/agentPools/gpu$")
    calls = []
    with pytest.raises(AKSError, match="no A100 capacity"):
        provisioner(client, aks_config(SYSTEM, GPU), on_created=calls.append).ensure()
    assert calls == ["agentPool llm-a/gpu"]

    assert provisioner(client).teardown(only=calls) == []

    assert sorted(fake_pools(arm)) == ["system"]  # the adopted cluster and its pool stay
    assert fake_cluster(arm)["properties"]["provisioningState"] == "Succeeded"


def test_failed_cluster_create_then_a_rerun_adopts_it_with_a_reconciling_put(arm, client):
    arm.fail_next_operation(code="VMExtensionProvisioningError",
                            message="VM has reported a failure when processing extension "
                                    "'vmssCSE'", match=r"/managedClusters/llm-a$")
    calls = []
    with pytest.raises(AKSError, match="vmssCSE") as failed:
        provisioner(client, on_created=calls.append).ensure()
    assert failed.value.code == "VMExtensionProvisioningError"
    assert calls == ["managedCluster llm-a", "agentPool llm-a/system"]
    assert fake_cluster(arm)["properties"]["provisioningState"] == "Failed"

    arm.requests.clear()
    result = provisioner(client).ensure()

    # Why a PUT of the cluster here: AKS leaves a Failed cluster Failed until one reconciles it.
    assert writes(arm)[0] == ("PUT", "managedClusters/llm-a", 200)
    assert result.adopted[:2] == ["managedCluster llm-a", "agentPool llm-a/system"]
    assert result.created == ["agentPool llm-a/gpu", "agentPool llm-a/cpu"]
    assert fake_cluster(arm)["properties"]["provisioningState"] == "Succeeded"


def test_polling_through_in_progress(arm, client):
    arm.operation_polls = 2

    provisioner(client).ensure()

    ops = Counter(p.split("/operations/")[1].split("?")[0] for _, p, _ in arm.requests
                  if "/operations/" in p)
    assert sorted(ops.values()) == [3, 3, 3]  # cluster, gpu, cpu: InProgress twice, Succeeded
    assert {p["provisioningState"] for p in fake_pools(arm).values()} == {"Succeeded"}

    # A run that died mid-create left the cluster Creating: the next run waits, then adopts.
    arm.reset()
    arm.operation_polls = 2
    tags = {"team": "search", TAG_MANAGED_BY: "airfleet", TAG_CLUSTER: NAME}
    client.managed_clusters.begin_create_or_update(RG, NAME, {
        "location": "westeurope", "tags": tags,
        "properties": {"dnsPrefix": NAME, "agentPoolProfiles": [
            {"name": "system", "count": 1, "vmSize": "Standard_D4s_v5", "mode": "System",
             "tags": tags}]},
    }, polling=False).result()
    naps = []

    result = provisioner(client, aks_config(SYSTEM, CPU), sleep=naps.append).ensure()

    assert result.adopted[0] == "managedCluster llm-a"
    assert result.created == ["agentPool llm-a/cpu"]
    assert len(naps) == 2  # two GETs saw Creating
    assert [c for c in arm_calls(arm) if c[0] == "PUT"] == [
        ("PUT", "managedClusters/llm-a", 201),  # the dead run's
        ("PUT", "managedClusters/llm-a/agentPools/cpu", 201)]  # no 409: it waited


def test_transient_5xx_are_retried(arm, client):
    arm.fail_next(2, status=503, method="PUT")
    arm.fail_next(1, status=500, method="GET", path="/agentPools/gpu$")

    result = provisioner(client).ensure()

    assert len(result.created) == 4
    puts = [s for m, _, s in arm_calls(arm) if m == "PUT"]
    assert puts == [503, 503, 201, 201, 201]
    assert ("GET", "managedClusters/llm-a/agentPools/gpu", 500) in arm_calls(arm)


@pytest.mark.parametrize(("pools", "message"), [
    ((GPU,), "needs a pool with gpu: false"),
    (({**SYSTEM, "min": 0, "max": 2},), "System pool system needs min and desired >= 1"),
])
def test_spec_errors_before_any_call(arm, client, pools, message):
    with pytest.raises(AKSError, match=message):
        provisioner(client, aks_config(*pools)).ensure()
    assert arm.requests == []
