"""Clients for the backends, built from Airflow connections and Airfleet's vault.

The core never reads an Airflow connection (ARCHITECTURE.md): this module does, in the task,
and hands the backend what it needs. Secrets stay in memory: they are never returned to XCom,
logged, or put on a command line.

SSH goes through the SSH provider's hook (``ssh_hook.NodeSSHHook``, an ``SSHHookAsync``): an
Airflow SSH connection is read as the provider reads it (the ``private_key`` or ``key_file``
extra, ``private_key_passphrase``, the ``host_key`` extra); the login and port of the spec win
over the connection's. A vault (or sealed) SSH credential holds the private key text, or JSON
``{"private_key": ..., "host_key": ..., "passphrase": ...}``.

Each build reads its credentials afresh (a rotated key is used at once), except inside
:func:`credentials_read_once`: a pass over many clusters (the fleet's health check) reads each
credential once.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from airfleet.errors import InvalidRequest
from airfleet.resources import Cluster, CredentialRef, Provider

SSH_FIELD = "cluster.spec.config.ssh.credential"
KUBE_FIELD = "cluster.spec.config.kubernetes.credential"
EKS_FIELD = "cluster.spec.config.eks.credential"
AKS_FIELD = "cluster.spec.config.aks.credential"
REGISTRY_FIELD = "cluster.spec.image_registry"

T = TypeVar("T")
# Inside credentials_read_once: the credentials read, by where they come from, and a lock for
# each (the probes' threads ask at once; the first reads, the others wait for its value).
# Threads that asyncio.to_thread starts run in a copy of the context: they share the block's.
_READ: ContextVar[tuple[dict[tuple[str, str], Any], dict[tuple[str, str], threading.Lock]]
                  | None] = ContextVar("airfleet_credentials", default=None)


@contextmanager
def credentials_read_once() -> Iterator[None]:
    """Within the block, each credential (a vault secret, an Airflow connection) is read once
    and kept in this process's memory until the block ends. A health check of 10,000 clusters
    that share one SSH key reads it once: a vault read decrypts with the vault's RSA-4096 key
    (about 10 ms of CPU), a connection is a call to Airflow's API server."""
    token = _READ.set(({}, {}))
    try:
        yield
    finally:
        _READ.reset(token)


def _read_once(key: tuple[str, str], read: Callable[[], T]) -> T:
    block = _READ.get()
    if block is None:
        return read()
    values, locks = block
    with locks.setdefault(key, threading.Lock()):
        if key not in values:
            values[key] = read()  # a read that raises keeps nothing: the next one reads again
        return values[key]


def clients_for(cluster: Cluster) -> dict[str, Any]:
    """The clients the cluster's backend declares it needs (``Backend.clients``)."""
    from airfleet.backends import get_backend

    needs = get_backend(cluster.spec.type).clients
    return {name: BUILDERS[name](cluster) for name in needs}


def ssh_access(cluster: Cluster):
    """The nodes' ``NodeAccess``, its connections opened by the SSH provider's hook."""
    from airfleet.backends.ssh.remote import InvalidNodeAccess
    from airfleet_airflow.ssh_hook import NodeSSHHook

    cfg = cluster.spec.config.ssh
    ref = cfg.credential
    where = dict(username=cfg.user, port=cfg.port, known_hosts=cfg.known_hosts)
    if ref.airflow_conn_id:
        conn = _connection(ref.airflow_conn_id, SSH_FIELD)
        hook = NodeSSHHook(ref.airflow_conn_id, **where)
    else:
        conn, secret = None, _vault_ssh_secret(ref)
        hook = NodeSSHHook(private_key=secret["private_key"],
                           passphrase=secret.get("passphrase") or "",
                           host_key=secret.get("host_key"), **where)
    try:
        return hook.node_access(conn)
    except InvalidNodeAccess as exc:
        raise InvalidRequest(f"{SSH_FIELD}: {exc}") from None


def ssh_dashboard(cluster: Cluster):
    """How a static-nodes verb reaches the head's Ray dashboard: through an SSH forward over
    the verb's own SSH connection to the head (the dashboard answers on the head's loopback
    only). Never plain HTTP: that is for simulated dashboards in tests."""
    from airfleet.backends.ssh.tunnel import through_ssh

    return through_ssh


def kubernetes_client(cluster: Cluster):
    """An ``ApiClient`` from the cncf-kubernetes provider's hook: the kubeconfig of an Airflow
    Kubernetes connection (its ``kube_config`` / ``kube_config_path`` extras), or a kubeconfig
    (YAML or JSON) kept in the vault. Each call gets its own client configuration, so clusters
    never share the process-wide default.

    A cluster Airfleet provisions (eks, aks) without a kubeconfig of its own gets a callable
    instead, which connects once the cluster exists: EKS with a token signed for the run (no
    long-lived secret), AKS with the admin kubeconfig that provisioning put in the vault."""
    cfg = cluster.spec.config.kubernetes
    ref = cfg.credential if cfg else None
    if ref is None and cluster.spec.provider in (Provider.EKS, Provider.AKS):
        connect = _eks_kubeconfig if cluster.spec.provider is Provider.EKS else _aks_kubeconfig
        field = f"cluster.spec.config.{cluster.spec.provider.value}"
        return functools.cache(lambda: _api_client(connect(cluster), field))
    if ref is None:
        raise InvalidRequest(f"{KUBE_FIELD}: give the kubeconfig as a credential reference")
    if ref.airflow_conn_id:
        _connection(ref.airflow_conn_id, KUBE_FIELD)
        return _api_client(ref.airflow_conn_id, KUBE_FIELD)
    return _api_client(_kubeconfig(_vault_text(ref, KUBE_FIELD), KUBE_FIELD), KUBE_FIELD)


def _api_client(config: str | dict[str, Any], field: str):
    """``config``: an Airflow connection id, or a kubeconfig."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes.client import Configuration

    if isinstance(config, str):
        hook = KubernetesHook(conn_id=config, client_configuration=Configuration())
    else:
        hook = KubernetesHook(conn_id=None, config_dict=config,
                              client_configuration=Configuration())
    try:
        return hook.get_conn()
    except Exception as exc:  # the config loader's own errors say what is wrong with it
        raise InvalidRequest(f"{field}: the kubeconfig cannot be used: "
                             f"{type(exc).__name__}: {exc}") from None


def _kubeconfig(text: str, field: str) -> dict[str, Any]:
    import yaml

    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        config = None
    if not isinstance(config, dict):
        raise InvalidRequest(f"{field}: the vault secret is not a kubeconfig (YAML or JSON "
                             "with clusters, users and contexts)")
    return config


def _eks_kubeconfig(cluster: Cluster) -> dict[str, Any]:
    """A kubeconfig for the EKS cluster with a bearer token signed now for the connection's
    identity (``aws eks get-token``; valid 15 minutes, kept in memory only)."""
    from airflow.providers.amazon.aws.hooks.sts import StsHook
    from airflow.providers.amazon.aws.utils.eks_get_token import fetch_access_token_for_cluster

    from airfleet.backends.kubernetes.eks import EKSProvisioner

    cfg = cluster.spec.config.eks
    hook = _eks_hook(cluster)
    server, ca_data = EKSProvisioner(hook.conn, cfg, cluster.name).endpoint()
    # EKS accepts the token only when it is signed for the regional STS endpoint.
    sts = StsHook(aws_conn_id=cfg.credential.airflow_conn_id, region_name=cfg.region)
    endpoint = sts.conn.meta.endpoint_url
    if endpoint == "https://sts.amazonaws.com":
        endpoint = f"https://sts.{cfg.region}.amazonaws.com"
    sts_url = f"{endpoint}/?Action=GetCallerIdentity&Version=2011-06-15"
    token = fetch_access_token_for_cluster(cluster.name, sts_url, cfg.region,
                                           session=hook.get_session())
    return _token_kubeconfig(cluster.name, server, ca_data, token)


def _token_kubeconfig(name: str, server: str, ca_data: str, token: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Config", "current-context": name,
            "clusters": [{"name": name, "cluster": {"server": server,
                                                    "certificate-authority-data": ca_data}}],
            "users": [{"name": "airfleet", "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": "airfleet"}}]}


def _aks_kubeconfig(cluster: Cluster) -> dict[str, Any]:
    """The admin kubeconfig that provisioning stored in the vault (read when connecting, so a
    kubeconfig fetched earlier in the same task is found)."""
    from airfleet.errors import AirfleetError
    from airfleet.store import Store

    record = Store().get_cluster(cluster.name)
    vault_id = record.cluster.status.kubeconfig_vault_id if record else None
    if vault_id is None:
        raise AirfleetError(f"AKS cluster {cluster.name} has no kubeconfig yet: provisioning "
                            "stores its admin credentials once the cluster exists")
    return _kubeconfig(_vault_text(CredentialRef(vault_id=vault_id), KUBE_FIELD), KUBE_FIELD)


def cloud_client(cluster: Cluster):
    """The cloud API of a cluster Airfleet provisions: a boto3 EKS client from the amazon
    provider's ``EksHook``, or a ``ContainerServiceClient`` from :class:`AksHook`; None for
    the other providers. The connection must exist (checked here, before any cloud call)."""
    provider = cluster.spec.provider
    if provider is Provider.EKS:
        return _eks_hook(cluster).conn
    if provider is Provider.AKS:
        from airfleet_airflow.hooks import AksHook

        cfg = cluster.spec.config.aks
        _connection(cfg.credential.airflow_conn_id, AKS_FIELD)
        return AksHook(cfg.credential.airflow_conn_id).get_conn(cfg.subscription_id)
    return None


def _eks_hook(cluster: Cluster):
    from airflow.providers.amazon.aws.hooks.eks import EksHook

    cfg = cluster.spec.config.eks
    _connection(cfg.credential.airflow_conn_id, EKS_FIELD)
    return EksHook(aws_conn_id=cfg.credential.airflow_conn_id, region_name=cfg.region)


def registry_login(cluster: Cluster) -> dict[str, str] | None:
    """``{"host", "username", "password", "ca_pem"}`` for the nodes' container runtime."""
    registry = cluster.spec.image_registry
    if registry is None or (registry.credential is None and registry.ca_cert is None):
        return None
    out: dict[str, str] = {"url": registry.url}
    if registry.credential is not None:
        user, password = _login(registry.credential, f"{REGISTRY_FIELD}.credential")
        out.update(username=user, password=password)
    if registry.ca_cert is not None:
        out["ca_pem"] = _text(registry.ca_cert, f"{REGISTRY_FIELD}.ca_cert", extra="ca_cert")
    return out


def _vault_ssh_secret(ref: CredentialRef) -> dict[str, str]:
    text = _vault_text(ref, SSH_FIELD)
    try:
        data = json.loads(text)
    except ValueError:
        return {"private_key": text}
    if not isinstance(data, dict) or "private_key" not in data:
        raise InvalidRequest(f"{SSH_FIELD}: the vault secret is JSON without private_key")
    return data


def _login(ref: CredentialRef, field: str) -> tuple[str, str]:
    if ref.airflow_conn_id:
        conn = _connection(ref.airflow_conn_id, field)
        if not conn.login or not conn.password:
            raise InvalidRequest(f"{field}: Airflow connection {ref.airflow_conn_id!r} needs a "
                                 "login and a password")
        return conn.login, conn.password
    try:
        data = json.loads(_vault_text(ref, field))
        return data["username"], data["password"]
    except (ValueError, KeyError, TypeError):
        raise InvalidRequest(f'{field}: the vault secret must be JSON {{"username": ..., '
                             '"password": ...}') from None


def _text(ref: CredentialRef, field: str, extra: str) -> str:
    if ref.airflow_conn_id:
        value = _connection(ref.airflow_conn_id, field).extra_dejson.get(extra)
        if not value:
            raise InvalidRequest(f"{field}: Airflow connection {ref.airflow_conn_id!r} has no "
                                 f"{extra} extra")
        return value
    return _vault_text(ref, field)


def _connection(conn_id: str, field: str):
    from airflow.sdk import BaseHook

    try:
        return _read_once(("connection", conn_id), lambda: BaseHook.get_connection(conn_id))
    except Exception:  # AirflowNotFoundException, or the secrets backend failing
        raise InvalidRequest(f"{field}: Airflow connection {conn_id!r} does not exist; create "
                             "it (Admin > Connections) or give a vault_id") from None


def _vault_text(ref: CredentialRef, field: str) -> str:
    from airfleet.errors import AirfleetError
    from airfleet.vault import Vault

    vault = Vault.default()
    try:
        # A sealed reference is read directly when a flow checks its input; the register step
        # then stores it and the recorded spec keeps the vault id.
        if ref.sealed:
            return vault.open_sealed(ref.sealed).decode()
        return _read_once(("vault", ref.vault_id), lambda: vault.get(ref.vault_id).decode())
    except AirfleetError as exc:
        raise InvalidRequest(f"{field}: {exc}") from None


BUILDERS = {"ssh": ssh_access, "registry": registry_login, "dashboard": ssh_dashboard,
            "kubernetes": kubernetes_client, "cloud": cloud_client}
