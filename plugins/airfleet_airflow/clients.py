"""Clients for the backends, built from Airflow connections and Airfleet's vault.

The core never reads an Airflow connection (ARCHITECTURE.md): this module does, in the task,
and hands the backend what it needs. Secrets stay in memory: they are never returned to XCom,
logged, or put on a command line.

SSH credentials follow the SSH provider's connection conventions: the private key in the
``private_key`` extra (or a ``key_file`` path), the host key in the ``host_key`` extra; the
login and port of the spec win over the connection's. A vault (or sealed) SSH credential holds
the private key text, or JSON ``{"private_key": ..., "host_key": ...}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from airfleet.errors import InvalidRequest
from airfleet.resources import Cluster, CredentialRef

SSH_FIELD = "cluster.spec.config.ssh.credential"
KUBE_FIELD = "cluster.spec.config.kubernetes.credential"
REGISTRY_FIELD = "cluster.spec.image_registry"


def clients_for(cluster: Cluster) -> dict[str, Any]:
    """The clients the cluster's backend declares it needs (``Backend.clients``)."""
    from airfleet.backends import get_backend

    needs = get_backend(cluster.spec.type).clients
    return {name: BUILDERS[name](cluster) for name in needs}


def ssh_access(cluster: Cluster):
    from airfleet.backends.ssh.remote import InvalidNodeAccess, NodeAccess

    cfg = cluster.spec.config.ssh
    secret = _ssh_secret(cfg.credential)
    host_key = None if cfg.known_hosts else secret.get("host_key")
    try:
        return NodeAccess(user=cfg.user, port=cfg.port, private_key=secret["private_key"],
                          passphrase=secret.get("passphrase"), known_hosts=cfg.known_hosts,
                          host_key=host_key)
    except InvalidNodeAccess as exc:
        raise InvalidRequest(f"{SSH_FIELD}: {exc}") from None


def kubernetes_client(cluster: Cluster):
    """An ``ApiClient`` from the cncf-kubernetes provider's hook: the kubeconfig of an Airflow
    Kubernetes connection (its ``kube_config`` / ``kube_config_path`` extras), or a kubeconfig
    (YAML or JSON) kept in the vault. Each call gets its own client configuration, so clusters
    never share the process-wide default."""
    import yaml
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes.client import Configuration

    cfg = cluster.spec.config.kubernetes
    ref = cfg.credential if cfg else None
    if ref is None:
        raise InvalidRequest(f"{KUBE_FIELD}: give the kubeconfig as a credential reference")
    if ref.airflow_conn_id:
        _connection(ref.airflow_conn_id, KUBE_FIELD)
        hook = KubernetesHook(conn_id=ref.airflow_conn_id, client_configuration=Configuration())
    else:
        try:
            config = yaml.safe_load(_vault_text(ref, KUBE_FIELD))
        except yaml.YAMLError:
            config = None
        if not isinstance(config, dict):
            raise InvalidRequest(f"{KUBE_FIELD}: the vault secret is not a kubeconfig (YAML or "
                                 "JSON with clusters, users and contexts)")
        hook = KubernetesHook(conn_id=None, config_dict=config,
                              client_configuration=Configuration())
    try:
        return hook.get_conn()
    except Exception as exc:  # the config loader's own errors say what is wrong with it
        raise InvalidRequest(f"{KUBE_FIELD}: the kubeconfig cannot be used: "
                             f"{type(exc).__name__}: {exc}") from None


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


def _ssh_secret(ref: CredentialRef) -> dict[str, str]:
    if ref.airflow_conn_id:
        conn = _connection(ref.airflow_conn_id, SSH_FIELD)
        extra = conn.extra_dejson
        key = extra.get("private_key")
        if not key and extra.get("key_file"):
            key = Path(extra["key_file"]).expanduser().read_text()
        if not key:
            raise InvalidRequest(f"{SSH_FIELD}: Airflow connection {ref.airflow_conn_id!r} has "
                                 "no private_key (or key_file) extra; add the node's key there")
        return {"private_key": key, "host_key": extra.get("host_key"),
                "passphrase": extra.get("private_key_passphrase")}
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
        return BaseHook.get_connection(conn_id)
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
        return (vault.open_sealed(ref.sealed) if ref.sealed else vault.get(ref.vault_id)).decode()
    except AirfleetError as exc:
        raise InvalidRequest(f"{field}: {exc}") from None


BUILDERS = {"ssh": ssh_access, "registry": registry_login, "kubernetes": kubernetes_client}
