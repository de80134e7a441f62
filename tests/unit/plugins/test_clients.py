"""Credentials as the plugin's ``clients_for`` reads them (plugins/airfleet_airflow/clients.py):
afresh for each flow, once per credential inside ``credentials_read_once`` (the fleet's health
check), and the vault's store shared by the process (``Vault.default``).

The reads are counted by wrapping the real ``Store.get_secret`` and ``BaseHook.get_connection``
(each still does its work): what a read costs is a vault decryption with the RSA-4096 key or a
call to Airflow's API server, for every cluster a check probes."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import shutil
import subprocess
from pathlib import Path

import pytest

from airfleet import config, crypto
from airfleet.errors import InvalidRequest
from airfleet.resources import Cluster
from airfleet.store import Store
from airfleet.vault import Vault

CONN = "ssh_clients_test"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """The vault's key pair and two SSH client keys (one per "team"), made once."""
    base = tmp_path_factory.mktemp("clients")
    crypto.init_keys(base / "vault")
    for team in ("a", "b"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / team)],
                       check=True)
    return {"vault": base / "vault", "a": base / "a", "b": base / "b"}


@pytest.fixture
def vault(airfleet_home, keys) -> Vault:
    shutil.copytree(keys["vault"], config.keys_dir())
    vault = Vault.default()
    vault.store.migrate()
    return vault


@pytest.fixture
def secret_reads(monkeypatch) -> list[str]:
    """The ids of the vault secrets read from the store, in order."""
    reads, real = [], Store.get_secret

    def get_secret(self, secret_id):
        reads.append(secret_id)
        return real(self, secret_id)
    monkeypatch.setattr(Store, "get_secret", get_secret)
    return reads


def ssh_secret(keys, team: str) -> bytes:
    host_key = " ".join(keys[team].with_suffix(".pub").read_text().split()[:2])
    return json.dumps({"private_key": keys[team].read_text(), "host_key": host_key}).encode()


def cluster(name: str, credential: dict) -> Cluster:
    return Cluster.model_validate({"metadata": {"name": name}, "spec": {
        "type": "ssh", "provider": "static", "config": {"ssh": {
            "head": "10.9.0.1", "workers": [], "credential": credential,
            "container_runtime": "none"}}}})


def test_without_the_block_every_cluster_reads_its_credential(vault, keys, secret_reads):
    from airfleet_airflow.clients import clients_for

    shared = vault.put(ssh_secret(keys, "a"))
    for i in range(3):
        clients_for(cluster(f"c{i}", {"vault_id": shared}))

    assert secret_reads == [shared] * 3  # a rotated or replaced key is used at once


def test_inside_the_block_each_credential_is_read_once_and_each_cluster_gets_its_own(
        vault, keys, secret_reads):
    from airfleet_airflow.clients import clients_for, credentials_read_once

    team_a, team_b = vault.put(ssh_secret(keys, "a")), vault.put(ssh_secret(keys, "b"))
    clusters = [cluster(f"a{i}", {"vault_id": team_a}) for i in range(4)] + \
               [cluster(f"b{i}", {"vault_id": team_b}) for i in range(2)]

    async def from_threads():  # as the health check builds them: asyncio.to_thread
        return await asyncio.gather(*(asyncio.to_thread(clients_for, c) for c in clusters))

    with credentials_read_once():
        built = asyncio.run(from_threads())

    assert sorted(secret_reads) == sorted([team_a, team_b])
    keys_used = [clients["ssh"].private_key for clients in built]
    assert keys_used == [keys["a"].read_text()] * 4 + [keys["b"].read_text()] * 2
    # The next block (the next check) reads again.
    with credentials_read_once():
        clients_for(clusters[0])
    assert secret_reads.count(team_a) == 2


def test_a_credential_that_cannot_be_read_fails_each_cluster_naming_the_field(
        vault, keys, secret_reads):
    from airfleet_airflow.clients import clients_for, credentials_read_once

    missing = "vlt_" + "0" * 32
    with credentials_read_once():
        for name in ("x0", "x1"):
            with pytest.raises(InvalidRequest, match=r"^cluster\.spec\.config\.ssh\.credential"
                                                     f": .*{missing}"):
                clients_for(cluster(name, {"vault_id": missing}))

    assert secret_reads == [missing] * 2  # a failed read is not kept


def test_inside_the_block_an_airflow_connection_is_asked_for_once(keys, monkeypatch):
    from airflow.sdk import BaseHook

    from airfleet_airflow.clients import clients_for, credentials_read_once

    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN.upper()}", json.dumps(
        {"conn_type": "ssh", "login": "root", "extra": {
            "private_key": keys["a"].read_text(),
            "host_key": keys["a"].with_suffix(".pub").read_text().strip()}}))
    asked, real = [], BaseHook.get_connection.__func__

    def get_connection(cls, conn_id):
        asked.append(conn_id)
        return real(cls, conn_id)
    monkeypatch.setattr(BaseHook, "get_connection", classmethod(get_connection))

    with credentials_read_once():
        built = [clients_for(cluster(f"c{i}", {"airflow_conn_id": CONN})) for i in range(3)]
    clients_for(cluster("after", {"airflow_conn_id": CONN}))

    assert asked == [CONN, CONN]  # once in the block, once after it
    assert {b["ssh"].private_key for b in built} == {keys["a"].read_text()}


def test_the_vault_shares_one_store_per_database_and_a_forked_child_gets_its_own(
        vault, keys, tmp_path, monkeypatch):
    secret = vault.put(b"s3cret")
    assert Vault.default().store is vault.store  # one engine and pool, not one per read

    # A forked child (a task runner, a Celery pool process) must not use the parent's pooled
    # connections: it gets a store of its own, which reads the same secret.
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(id(vault.store), secret, queue))
    child.start()
    child.join(60)
    assert queue.get(timeout=5) == (False, "s3cret")
    assert child.exitcode == 0

    monkeypatch.setenv("AIRFLEET_DATABASE_URL", f"sqlite:///{tmp_path / 'other.db'}")
    assert Vault.default().store is not vault.store  # another database, another store


def _read_in_child(parent_store_id: int, secret: str, queue) -> None:
    vault = Vault.default()
    queue.put((id(vault.store) == parent_store_id, vault.get(secret).decode()))
