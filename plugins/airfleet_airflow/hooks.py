"""Hooks of Airfleet's own, where the providers have none.

The Azure provider has no AKS hook, and ``AzureBaseHook(sdk_client=ContainerServiceClient)``
breaks (it passes the old ``credentials=`` argument; FACTS.md), so :class:`AksHook` builds the
``azure-mgmt-containerservice`` clients itself from an Airflow Azure connection.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from airflow.sdk import BaseHook


class AksHook(BaseHook):
    """``ContainerServiceClient`` (sync, and ``aio`` for triggers) from an Airflow Azure
    connection.

    The connection: ``login`` is the service principal's client id, ``password`` its secret,
    extra ``tenantId`` its tenant (without login and password, ``DefaultAzureCredential``:
    managed or workload identity). For a sovereign cloud, or a test server, the extras
    ``base_url`` (the Resource Manager endpoint), ``authority`` (the Entra ID endpoint) and
    ``connection_verify`` (a CA bundle path) point the clients elsewhere.

    :param azure_conn_id: the Airflow connection.
    """

    conn_name_attr = "azure_conn_id"
    default_conn_name = "azure_default"
    conn_type = "azure"
    hook_name = "Airfleet AKS"

    def __init__(self, azure_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.azure_conn_id = azure_conn_id

    def get_conn(self, subscription_id: str, **client_options: Any):
        """A sync client for the subscription (its credential lives as long as it)."""
        from azure.mgmt.containerservice import ContainerServiceClient

        credential, options = self._credential(self.get_connection(self.azure_conn_id),
                                               aio=False)
        return ContainerServiceClient(credential, subscription_id, **options, **client_options)

    @asynccontextmanager
    async def async_client(self, subscription_id: str, **client_options: Any):
        """An ``aio`` client for the subscription, closed with its credential on exit."""
        from azure.mgmt.containerservice.aio import ContainerServiceClient

        conn = await self.aget_connection(self.azure_conn_id)
        credential, options = self._credential(conn, aio=True)
        async with credential, ContainerServiceClient(credential, subscription_id, **options,
                                                      **client_options) as client:
            yield client

    @staticmethod
    def _credential(conn: Any, *, aio: bool) -> tuple[Any, dict[str, Any]]:
        """The connection's credential, and the client options its extras ask for."""
        extra = conn.extra_dejson
        transport = {"connection_verify": extra["connection_verify"]} \
            if extra.get("connection_verify") else {}
        if conn.login and conn.password:
            if aio:
                from azure.identity.aio import ClientSecretCredential
            else:
                from azure.identity import ClientSecretCredential
            authority = {"authority": extra["authority"],
                         "disable_instance_discovery": True} if extra.get("authority") else {}
            credential = ClientSecretCredential(
                extra.get("tenantId") or extra.get("tenant_id"), conn.login, conn.password,
                **authority, **transport)
        else:
            if aio:
                from azure.identity.aio import DefaultAzureCredential
            else:
                from azure.identity import DefaultAzureCredential
            credential = DefaultAzureCredential(**transport)
        options = dict(transport)
        if extra.get("base_url"):
            options["base_url"] = extra["base_url"]
        return credential, options
