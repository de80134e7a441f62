"""Benchmark: what reaching a head's dashboard through SSH costs one cluster's health probe.

A real head's dashboard answers on its loopback only, so every production probe of a
static-nodes cluster (``health_async``) opens an SSH connection to the head (TCP, key
exchange, our key, the pinned host key), then asks the dashboard twice over SSH channels on it
(GCS health, then the nodes). The fleet benchmark (test_health_fleet.py) reaches simulated
dashboards by plain HTTP and leaves this out; here it is, on a real sshd node
(tests/fakes/nodes.py) running a real Ray 2.60 head:

- ``probe``: one whole ``health_async`` as the health check runs it (tunnel opened and
  closed inside it);
- ``http_only``: the same two requests over a tunnel that is already open;
- ``ssh_connect``: the SSH connection alone;
- ``credentials``: what the plugin's ``clients_for`` costs for such a cluster before its
  probe: its SSH key read from the vault (the store's row, decrypted with the vault's RSA-4096
  key) and made a ``NodeAccess``, for a cluster with a key of its own (``own_key``: every
  cluster reads its own) and for one of a fleet that shares a key (``shared_key``: inside
  ``credentials_read_once``, as the health check reads them, the key is read once).

``probe - http_only`` is what the tunnel adds per cluster per probe. Each figure comes with
this process's CPU per round (``client_cpu_ms``): a fleet's check is bounded by the client's
CPU, and the split says what keeping connections open between checks would save (the connect)
and what it would not (the channels and requests over the tunnel). Also timed: 10
probes at once (sshd's MaxStartups defaults to 10 unauthenticated connections: in production each
cluster has its own head, so only the per-cluster figure adds up). Prints the figures and
writes them to ``tests/benchmarks/results/tunnel_cost.json``; asserts nothing about time.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import pytest

from airfleet import crypto
from airfleet.backends import BackendContext
from airfleet.backends.ssh import commands
from airfleet.backends.ssh.backend import SSHBackend, head_dashboard
from airfleet.backends.ssh.remote import NodeAccess, Remote
from airfleet.backends.ssh.tunnel import through_ssh
from airfleet.resources import Cluster
from airfleet.vault import Vault
from tests.fakes.nodes import NodeFarm
from tests.fakes.static_fleet import head_dashboard_get, static_cluster

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(600)]

RESULTS = Path(__file__).resolve().parent / "results" / "tunnel_cost.json"
ROUNDS, CONCURRENT = 20, 10


@pytest.fixture(scope="module")
def head_cluster():
    """A one-node farm running a Ray head, the cluster over it and the SSH access to it."""
    with NodeFarm(1, name_prefix="tun") as farm:
        head = farm.nodes[0]
        farm.ssh(head, commands.ray_start_head(head.address), timeout=120, check=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if head_dashboard_get(farm, "/api/gcs_healthz") == "success":
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
        access = NodeAccess(user="root", private_key=farm.private_key_text,
                            known_hosts=farm.known_hosts_text())
        cluster = Cluster.model_validate(static_cluster(farm, 0, "tunnel-bench"))
        yield cluster, access, farm
        farm.ssh(head, "ray stop --force", timeout=60)


def credential_cost(farm: NodeFarm, tmp_path: Path, monkeypatch) -> dict:
    """``timed`` figures of ``clients_for`` for a static cluster whose key is in the vault."""
    from airfleet_airflow.clients import clients_for, credentials_read_once

    monkeypatch.setenv("AIRFLEET_DATABASE_URL", f"sqlite:///{tmp_path / 'airfleet.db'}")
    monkeypatch.setenv("AIRFLEET_KEYS_DIR", str(tmp_path / "keys"))
    crypto.init_keys(tmp_path / "keys")
    vault = Vault.default()
    vault.store.migrate()
    secret = vault.put(farm.private_key_text.encode())
    cluster = Cluster.model_validate(static_cluster(
        farm, 0, "credential-bench", credential={"vault_id": secret}))

    async def build():
        clients_for(cluster)

    clients_for(cluster)  # imports (the SSH provider's hook) and the vault's key, parsed once
    figures = {"own_key": asyncio.run(timed(build))}
    with credentials_read_once():
        clients_for(cluster)  # the fleet's first cluster read it
        figures["shared_key"] = asyncio.run(timed(build))
    return figures


def ms(seconds: list[float]) -> dict:
    return {"median_ms": round(1000 * statistics.median(seconds), 1),
            "p90_ms": round(1000 * sorted(seconds)[int(0.9 * (len(seconds) - 1))], 1),
            "runs": len(seconds)}


async def timed(coro_fn, rounds: int = ROUNDS) -> dict:
    """``ms`` of ``rounds`` awaits of ``coro_fn``, and this process's CPU per await (sshd and
    the dashboard run elsewhere in production: the client's CPU is what bounds a fleet)."""
    spent, cpu = [], time.process_time()
    for _ in range(rounds):
        started = time.perf_counter()
        await coro_fn()
        spent.append(time.perf_counter() - started)
    return {**ms(spent), "client_cpu_ms": round(1000 * (time.process_time() - cpu) / rounds, 2)}


async def measure(cluster: Cluster, access: NodeAccess) -> dict:
    clients = {"ssh": access, "dashboard": through_ssh}
    ctx = BackendContext("bench", clients=clients)
    backend = SSHBackend()

    async def probe():
        seen = await backend.health_async(cluster, ctx)
        assert seen.healthy, seen.message

    async def connect():
        async with Remote(access) as remote:
            await remote._connection(cluster.spec.config.ssh.head, "benchmark")

    async with head_dashboard(cluster, clients) as dash:
        await dash.gcs_healthy()  # the tunnel is open from here on

        async def http_only():
            assert await dash.gcs_healthy()
            await dash.list_nodes()

        figures = {"http_only": await timed(http_only)}
    figures["probe"] = await timed(probe)
    figures["probe_client_cpu_ms"] = figures["probe"]["client_cpu_ms"]
    figures["ssh_connect"] = await timed(connect)
    started = time.perf_counter()
    await asyncio.gather(*(probe() for _ in range(CONCURRENT)))
    figures[f"{CONCURRENT}_probes_at_once_wall_ms"] = round(
        1000 * (time.perf_counter() - started), 1)
    figures["tunnel_adds_per_probe_ms"] = round(
        figures["probe"]["median_ms"] - figures["http_only"]["median_ms"], 1)
    return figures


def test_what_the_ssh_tunnel_costs_one_probe(head_cluster, tmp_path, monkeypatch):
    cluster, access, farm = head_cluster
    figures = asyncio.run(measure(cluster, access))
    figures["credentials"] = credential_cost(farm, tmp_path, monkeypatch)
    creds = figures["credentials"]
    print(f"\nhealth probe through SSH: {figures['probe']['median_ms']} ms median "
          f"(p90 {figures['probe']['p90_ms']}); the same requests over an open tunnel: "
          f"{figures['http_only']['median_ms']} ms; SSH connect alone "
          f"{figures['ssh_connect']['median_ms']} ms; the tunnel adds "
          f"{figures['tunnel_adds_per_probe_ms']} ms per cluster per probe "
          f"({figures['probe_client_cpu_ms']} ms of this process's CPU: connect "
          f"{figures['ssh_connect']['client_cpu_ms']} ms, the requests over an open tunnel "
          f"{figures['http_only']['client_cpu_ms']} ms); "
          f"{CONCURRENT} probes at once: {figures[f'{CONCURRENT}_probes_at_once_wall_ms']} ms"
          f"; before it, its SSH key from the vault: {creds['own_key']['client_cpu_ms']} ms of "
          f"CPU for a cluster with a key of its own, {creds['shared_key']['client_cpu_ms']} ms "
          "in a fleet that shares one")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
