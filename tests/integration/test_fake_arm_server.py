"""The fake ARM server (tests/fakes/arm_server.py) against the real clients:
`azure-mgmt-containerservice` (sync and aio) with `azure.identity`'s ClientSecretCredential,
`azure-mgmt-resource` for resource groups, and raw httpx for what a client hides.

One server for the module, `reset()` before each test.
"""

from __future__ import annotations

import asyncio
import base64
import ssl

import httpx
import pytest
import yaml
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)

from tests.fakes.arm_server import FakeARMServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SUB = "3f2c8a1e-5b7d-4e9a-9c21-6d0b7e4f1a55"
OTHER_SUB = "9d41a7c2-0e3b-4f6d-8a5c-2b7e1f9c3d04"


def cluster_body(**properties) -> dict:
    return {
        "location": "West Europe",
        "tags": {"airfleet/fleet": "inference-eu"},
        "properties": {
            "kubernetesVersion": "1.33",
            "dnsPrefix": "inference-eu",
            "agentPoolProfiles": [{"name": "system", "count": 1, "vmSize": "Standard_D4s_v5",
                                   "mode": "System"}],
            **properties,
        },
    }


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


def http(arm: FakeARMServer) -> httpx.Client:
    return httpx.Client(base_url=arm.url, verify=ssl.create_default_context(cafile=arm.ca_file))


def operation_polls(arm: FakeARMServer) -> list[int]:
    return [status for method, path, status in arm.requests if "/operations/" in path]


def test_create_cluster_polls_through_in_progress(arm, client):
    arm.operation_polls = 2

    cluster = client.managed_clusters.begin_create_or_update("rg-fleet", "eu1",
                                                             cluster_body()).result()

    props = cluster.properties
    assert props.provisioning_state == "Succeeded"
    assert (cluster.location, cluster.tags) == ("westeurope", {"airfleet/fleet": "inference-eu"})
    assert (props.kubernetes_version, props.current_kubernetes_version) == ("1.33", "1.33.0")
    assert props.dns_prefix == "inference-eu"
    assert props.fqdn.startswith("inference-eu-") and props.fqdn.endswith(".azmk8s.io")
    assert props.node_resource_group == "MC_rg-fleet_eu1_westeurope"
    assert props.power_state.code == "Running"
    assert cluster.id == (f"/subscriptions/{SUB}/resourcegroups/rg-fleet/providers/"
                          "Microsoft.ContainerService/managedClusters/eu1")
    assert cluster.type == "Microsoft.ContainerService/ManagedClusters"
    [pool] = props.agent_pool_profiles
    assert (pool.name, pool.count, pool.vm_size, pool.mode) == (
        "system", 1, "Standard_D4s_v5", "System")
    # PUT 201, the operation InProgress twice then Succeeded, then the final GET.
    arm_requests = [(m, p.split("?")[0].rsplit("/", 2)[-2], s) for m, p, s in arm.requests
                    if p.startswith("/subscriptions/")]
    assert arm_requests[0] == ("PUT", "managedClusters", 201)
    assert operation_polls(arm) == [200, 200, 200]
    assert arm_requests[-1] == ("GET", "managedClusters", 200)
    assert all("api-version=2026-08-01" in p for _, p, _ in arm.requests if "/subscriptions/" in p)
    assert arm.clusters()[cluster.id]["properties"]["provisioningState"] == "Succeeded"


def test_operation_states_on_the_wire(arm):
    """What the poller sees: the PUT answers Creating with Azure-AsyncOperation and
    Retry-After: 0; the operation says InProgress operation_polls times, then Succeeded."""
    arm.operation_polls = 2
    with http(arm) as h:
        h.headers["Authorization"] = f"Bearer {arm.issue_token()}"
        url = (f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.ContainerService/"
               "managedClusters/c1?api-version=2026-08-01")
        put = h.put(url, json=cluster_body())
        assert put.status_code == 201
        assert put.json()["properties"]["provisioningState"] == "Creating"
        assert put.headers["Retry-After"] == "0"
        operation = put.headers["Azure-AsyncOperation"]
        assert operation.startswith(f"{arm.url}/subscriptions/{SUB}/providers/"
                                    "Microsoft.ContainerService/locations/westeurope/operations/")
        states = [h.get(operation).json()["status"] for _ in range(3)]
        assert states == ["InProgress", "InProgress", "Succeeded"]
        assert h.get(url).json()["properties"]["provisioningState"] == "Succeeded"

        missing = h.get(url.replace("/c1?", "/nope?"))
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "ResourceNotFound"
        assert h.get(url.split("?")[0]).json()["error"]["code"] == "MissingApiVersionParameter"
        bad_sub = h.get(url.replace(SUB, "not-a-guid"))
        assert (bad_sub.status_code, bad_sub.json()["error"]["code"]) == (
            400, "InvalidSubscriptionId")


def test_provisioning_state_progresses_on_get_and_blocks_concurrent_writes(arm, client):
    arm.operation_polls = 2

    initial = client.managed_clusters.begin_create_or_update(
        "rg", "c1", cluster_body(), polling=False).result()

    assert initial.properties.provisioning_state == "Creating"
    with pytest.raises(ResourceExistsError) as conflict:  # AKS: 409 while an operation runs
        client.agent_pools.begin_create_or_update("rg", "c1", "gpu", {"properties": {}})
    assert conflict.value.error.code == "OperationNotAllowed"
    states = [client.managed_clusters.get("rg", "c1").properties.provisioning_state
              for _ in range(3)]
    assert states == ["Creating", "Creating", "Succeeded"]


def test_create_cluster_aio(arm):
    async def scenario() -> tuple:
        async with arm.client(SUB, aio=True) as client:
            poller = await client.managed_clusters.begin_create_or_update(
                "rg-aio", "eu2", cluster_body())
            cluster = await poller.result()
            names = [c.name async for c in client.managed_clusters.list_by_resource_group("rg-aio")]
            creds = await client.managed_clusters.list_cluster_user_credentials("rg-aio", "eu2")
            poller = await client.managed_clusters.begin_delete("rg-aio", "eu2")
            await poller.result()
            with pytest.raises(ResourceNotFoundError):
                await client.managed_clusters.get("rg-aio", "eu2")
            return cluster, names, creds

    cluster, names, creds = asyncio.run(scenario())

    assert cluster.properties.provisioning_state == "Succeeded"
    assert names == ["eu2"]
    assert creds.kubeconfigs[0].name == "clusterUser"
    assert arm.clusters() == {}


def test_adopt_and_update_an_existing_cluster(arm, client):
    created = client.managed_clusters.begin_create_or_update("rg", "c1", cluster_body()).result()

    existing = client.managed_clusters.get("rg", "c1")  # adopt: read, change, put back
    existing.tags = {**existing.tags, "airfleet/owner": "run-42"}
    existing.properties.kubernetes_version = "1.34"
    poller = client.managed_clusters.begin_create_or_update("rg", "c1", existing)
    updated = poller.result()

    assert ("PUT", 200) in [(m, s) for m, p, s in arm.requests if "/managedClusters/c1?" in p]
    assert updated.tags == {"airfleet/fleet": "inference-eu", "airfleet/owner": "run-42"}
    assert updated.properties.kubernetes_version == "1.34"
    assert updated.properties.fqdn == created.properties.fqdn
    assert updated.properties.provisioning_state == "Succeeded"
    assert [p.name for p in updated.properties.agent_pool_profiles] == ["system"]

    tags_only = client.managed_clusters.begin_update_tags("rg", "c1", {"tags": {"a": "b"}})
    assert tags_only.result().tags == {"a": "b"}

    with pytest.raises(HttpResponseError) as refused:
        client.managed_clusters.begin_create_or_update(
            "rg", "c1", cluster_body(dnsPrefix="renamed"))
    assert refused.value.status_code == 400
    assert refused.value.error.code == "PropertyChangeNotAllowed"


def test_agent_pool_create_scale_delete(arm, client):
    cluster = client.managed_clusters.begin_create_or_update("rg", "c1", cluster_body()).result()
    gpu = {"properties": {
        "count": 2, "vmSize": "Standard_NC24ads_A100_v4", "mode": "User",
        "enableAutoScaling": True, "minCount": 1, "maxCount": 4,
        "nodeLabels": {"airfleet/gpu": "a100"}, "nodeTaints": ["nvidia.com/gpu=true:NoSchedule"]}}

    pool = client.agent_pools.begin_create_or_update("rg", "c1", "gpu", gpu).result()

    assert pool.id == f"{cluster.id}/agentPools/gpu"
    assert pool.type == "Microsoft.ContainerService/managedClusters/agentPools"
    props = pool.properties
    assert (props.count, props.min_count, props.max_count, props.enable_auto_scaling) == (
        2, 1, 4, True)
    assert (props.vm_size, props.mode, props.provisioning_state) == (
        "Standard_NC24ads_A100_v4", "User", "Succeeded")
    assert props.node_labels == {"airfleet/gpu": "a100"}
    assert props.node_taints == ["nvidia.com/gpu=true:NoSchedule"]
    profiles = client.managed_clusters.get("rg", "c1").properties.agent_pool_profiles
    assert sorted(p.name for p in profiles) == ["gpu", "system"]

    scaling = client.agent_pools.begin_create_or_update(
        "rg", "c1", "gpu", {"properties": {"count": 4}}, polling=False).result()
    assert scaling.properties.provisioning_state == "Scaling"
    during = client.agent_pools.get("rg", "c1", "gpu")  # a GET counts as a poll
    assert during.properties.provisioning_state == "Scaling"  # operation_polls=1
    scaled = client.agent_pools.get("rg", "c1", "gpu")
    assert (scaled.properties.count, scaled.properties.provisioning_state) == (4, "Succeeded")
    assert scaled.properties.node_labels == {"airfleet/gpu": "a100"}  # kept: not sent

    with pytest.raises(HttpResponseError) as out_of_range:
        client.agent_pools.begin_create_or_update("rg", "c1", "gpu",
                                                  {"properties": {"count": 9}})
    assert out_of_range.value.error.code == "InvalidParameter"
    with pytest.raises(HttpResponseError) as last_system:
        client.agent_pools.begin_delete("rg", "c1", "system")
    assert last_system.value.status_code == 400

    client.agent_pools.begin_delete("rg", "c1", "gpu").result()

    assert [p.name for p in client.agent_pools.list("rg", "c1")] == ["system"]
    assert list(arm.agent_pools(cluster.id)) == ["system"]
    with pytest.raises(ResourceNotFoundError):
        client.agent_pools.get("rg", "c1", "gpu")
    client.agent_pools.begin_delete("rg", "c1", "gpu").result()  # 204: already gone
    assert arm.requests[-1][0::2] == ("DELETE", 204)


def test_credentials_default_and_settable(arm, client):
    cluster = client.managed_clusters.begin_create_or_update("rg", "c1", cluster_body()).result()

    admin = client.managed_clusters.list_cluster_admin_credentials("rg", "c1").kubeconfigs[0]
    config = yaml.safe_load(admin.value)
    assert admin.name == "clusterAdmin"
    assert config["clusters"][0]["cluster"]["server"] == f"https://{cluster.properties.fqdn}:443"
    assert config["current-context"] == "c1-admin"
    token = config["users"][0]["user"]["token"]
    assert len(token) == 64
    again = client.managed_clusters.list_cluster_admin_credentials("rg", "c1").kubeconfigs[0]
    assert yaml.safe_load(again.value)["users"][0]["user"]["token"] == token  # stable

    override = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": "https://127.0.0.1:6443"}}]}
    arm.kubeconfig_for("c1", override)
    user = client.managed_clusters.list_cluster_user_credentials("rg", "c1").kubeconfigs[0]
    assert user.name == "clusterUser"
    assert yaml.safe_load(user.value) == override

    with http(arm) as h:  # the wire format: base64 of the YAML
        h.headers["Authorization"] = f"Bearer {arm.issue_token()}"
        raw = h.post(f"/subscriptions/{SUB}/resourceGroups/rg/providers/"
                     "Microsoft.ContainerService/managedClusters/c1/listClusterAdminCredential"
                     "?api-version=2026-08-01").json()
    assert yaml.safe_load(base64.b64decode(raw["kubeconfigs"][0]["value"])) == override
    with pytest.raises(ResourceNotFoundError):
        client.managed_clusters.list_cluster_admin_credentials("rg", "missing")


def test_delete_then_404_and_delete_of_missing_is_fine(arm, client):
    client.managed_clusters.begin_create_or_update("rg", "c1", cluster_body()).result()
    arm.requests.clear()

    client.managed_clusters.begin_delete("rg", "c1").result()

    assert arm.requests[0][0::2] == ("DELETE", 202)
    with pytest.raises(ResourceNotFoundError) as missing:
        client.managed_clusters.get("rg", "c1")
    assert missing.value.error.code == "ResourceNotFound"
    assert arm.clusters() == {}
    assert client.managed_clusters.begin_delete("rg", "c1").result() is None
    assert arm.requests[-1][0::2] == ("DELETE", 204)


def test_failed_operation_surfaces_azure_error_and_leaves_resource_failed(arm, client):
    arm.fail_next_operation(code="QuotaExceeded", message="Exceeding approved quota: 24 vCPUs",
                            match=r"/agentPools/gpu$")

    client.managed_clusters.begin_create_or_update("rg", "c1", cluster_body()).result()  # no match
    poller = client.agent_pools.begin_create_or_update(
        "rg", "c1", "gpu", {"properties": {"count": 1, "vmSize": "Standard_NC24ads_A100_v4"}})
    with pytest.raises(HttpResponseError) as failed:
        poller.result()

    assert failed.value.error.code == "QuotaExceeded"
    assert "Exceeding approved quota: 24 vCPUs" in str(failed.value)
    assert poller.status() == "Failed"
    pool = client.agent_pools.get("rg", "c1", "gpu")
    assert pool.properties.provisioning_state == "Failed"
    cluster = client.managed_clusters.get("rg", "c1")
    assert cluster.properties.provisioning_state == "Succeeded"

    arm.fail_next_operation(status_code="Canceled", code="OperationCanceled", message="stop")
    with pytest.raises(HttpResponseError, match="OperationCanceled"):
        client.managed_clusters.begin_delete("rg", "c1").result()
    assert client.managed_clusters.get("rg", "c1").properties.provisioning_state == "Canceled"


def test_fail_next_500s_are_retried_by_azure_core(arm, client):
    client.managed_clusters.begin_create_or_update("rg", "c1", cluster_body()).result()
    arm.requests.clear()
    arm.fail_next(2, status=500, method="GET", path="/managedClusters/c1$")

    assert client.managed_clusters.get("rg", "c1").name == "c1"
    assert [s for _, _, s in arm.requests] == [500, 500, 200]

    arm.fail_next(1, status=503, method="PUT")
    poller = client.agent_pools.begin_create_or_update("rg", "c1", "gpu", {"properties": {}})
    assert poller.result().properties.provisioning_state == "Succeeded"

    with arm.client(SUB, retry_total=1) as impatient:
        arm.fail_next(3, status=500)
        with pytest.raises(HttpResponseError) as exhausted:
            impatient.managed_clusters.get("rg", "c1")
    assert exhausted.value.status_code == 500
    assert exhausted.value.error.code == "InternalServerError"


def test_requests_without_a_valid_token_get_401(arm):
    with http(arm) as h:
        url = f"/subscriptions/{SUB}/providers/Microsoft.ContainerService/managedClusters"
        bare = h.get(url, params={"api-version": "2026-08-01"})
        bogus = h.get(url, params={"api-version": "2026-08-01"},
                      headers={"Authorization": "Bearer not-issued-here"})

    assert bare.status_code == 401
    assert bare.headers["WWW-Authenticate"].startswith("Bearer authorization_uri=")
    assert bare.json()["error"]["code"] == "AuthenticationFailed"
    assert (bogus.status_code, bogus.json()["error"]["code"]) == (401, "InvalidAuthenticationToken")

    class StaticToken:
        def get_token(self, *scopes, **kwargs):
            from azure.core.credentials import AccessToken
            return AccessToken("not-issued-here", 2**31)

    from azure.mgmt.containerservice import ContainerServiceClient
    with ContainerServiceClient(StaticToken(), SUB, base_url=arm.url,
                                connection_verify=arm.ca_file) as foreign:
        with pytest.raises(ClientAuthenticationError) as refused:
            list(foreign.managed_clusters.list())
    assert refused.value.status_code == 401


def test_lists_and_resource_groups(arm, client):
    for rg, name in [("rg-a", "c1"), ("rg-a", "c2"), ("rg-b", "c3")]:
        client.managed_clusters.begin_create_or_update(rg, name, cluster_body()).result()
    with arm.client(OTHER_SUB) as elsewhere:
        elsewhere.managed_clusters.begin_create_or_update("rg-a", "c9", cluster_body()).result()

    assert sorted(c.name for c in client.managed_clusters.list()) == ["c1", "c2", "c3"]
    assert sorted(c.name for c in client.managed_clusters.list_by_resource_group("RG-A")) == [
        "c1", "c2"]  # resource group names are case-insensitive
    assert list(client.managed_clusters.list_by_resource_group("rg-empty")) == []

    from azure.mgmt.resource.resources import ResourceManagementClient  # via the Azure provider
    with ResourceManagementClient(arm.credential(), SUB, base_url=arm.url,
                                  connection_verify=arm.ca_file, polling_interval=0) as rm:
        assert rm.resource_groups.check_existence("rg-a")  # implicitly made by the cluster PUT
        assert not rm.resource_groups.check_existence("rg-strict")
        arm.require_resource_groups = True
        with pytest.raises(ResourceNotFoundError, match="ResourceGroupNotFound"):
            client.managed_clusters.begin_create_or_update("rg-strict", "c4", cluster_body())
        rm.resource_groups.create_or_update("rg-strict", {"location": "westeurope"})
        client.managed_clusters.begin_create_or_update("rg-strict", "c4", cluster_body()).result()
        rm.resource_groups.begin_delete("rg-a").result()  # takes its clusters with it

    assert sorted(c.name for c in client.managed_clusters.list()) == ["c3", "c4"]
    assert [c["name"] for c in arm.clusters().values() if OTHER_SUB in c["id"]] == ["c9"]


def test_stop_and_start(arm, client):
    client.managed_clusters.begin_create_or_update("rg", "c1", cluster_body()).result()

    client.managed_clusters.begin_stop("rg", "c1").result()
    stopped = client.managed_clusters.get("rg", "c1").properties

    assert stopped.power_state.code == "Stopped"
    assert stopped.agent_pool_profiles[0].power_state.code == "Stopped"
    client.managed_clusters.begin_start("rg", "c1").result()
    assert client.managed_clusters.get("rg", "c1").properties.power_state.code == "Running"
