"""The static-nodes backend with ``container_runtime: docker``, end to end over real SSH.

Why a ``docker`` shim (tests/fakes/docker_shim.py) and not Docker: no Docker or podman engine
can run on the test machines. The exact docker/podman command strings are pinned by
tests/unit/backends/ssh/test_commands.py; this test adds what only a run can show: the
commands the backend sends through SSH are well-formed for the CLI (the shim refuses anything
else), happen in the right order (registry CA, then login, then pull, then run), carry no
secret in any argv, and the container's ``ray start ... --block`` (which the shim runs on the
node with the container's ``-e`` environment) really brings up a 3-node Ray cluster. A re-run
adopts the containers; delete removes them and every Ray process.

The registry password is a random canary: it must never appear in any node process's argv or
environment (sampled every 0.1 s during every flow), in the Airfleet store, in AIRFLOW_HOME
(Airflow's DB with XCom, and task logs), in the nodes' files, or in the captured logs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
import stat
import threading
from pathlib import Path

import pytest

from airfleet.resources import Phase
from airfleet.store import Store
from tests.fakes import docker_shim
from tests.fakes.nodes import NodeFarm
from tests.fakes.static_fleet import CONN_ENV, alive, ray_processes, ssh_connection

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NAME = "ctr-a"
CONTAINER = f"airfleet-ray-{NAME}"
REGISTRY = "registry.test:5000"
IMAGE = f"{REGISTRY}/rayproject/ray:2.60.0"
CACHE_HOST, CACHE_MOUNT = "/tmp/models", "/models/hf"  # /tmp is private to each node


@pytest.fixture(scope="module")
def farm():
    with NodeFarm(3, name_prefix="ctr") as farm:
        for node in farm.nodes:
            docker_shim.install(node.bin_dir)
        yield farm



def self_signed_ca_pem() -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Airfleet test registry CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
def registry(farm, airfleet_home, monkeypatch):
    """The SSH connection, a fresh store, and the registry login + CA in the vault."""
    from airfleet import crypto
    from airfleet.vault import Vault

    monkeypatch.setenv(CONN_ENV, ssh_connection(farm))
    monkeypatch.delenv("AIRFLEET_BACKENDS", raising=False)
    Store().migrate()
    keys = Path(os.environ["AIRFLEET_KEYS_DIR"])
    crypto.init_keys(keys)
    canary = f"canary-{secrets.token_hex(16)}"
    vault = Vault(Store(), keys)
    pem = self_signed_ca_pem()
    yield {"canary": canary, "pem": pem,
           "credential": vault.put(json.dumps({"username": "fleet", "password": canary}).encode(),
                                   "registry login"),
           "ca_cert": vault.put(pem.encode(), "registry CA")}
    for node in farm.nodes:  # leave nothing for another test of this module
        if node.running:
            node.run(f"ray stop --force >/dev/null 2>&1; rm -rf {docker_shim.STATE}", check=False)


def cluster_conf(farm, registry) -> dict:
    head, *workers = farm.nodes
    return {"cluster": {
        "metadata": {"name": NAME},
        "spec": {"type": "ssh", "provider": "static",
                 "image_registry": {"url": REGISTRY,
                                    "credential": {"vault_id": registry["credential"]},
                                    "ca_cert": {"vault_id": registry["ca_cert"]}},
                 "model_caches": [{"name": "hf", "host_path": {"path": CACHE_HOST}}],
                 "config": {"ssh": {"head": head.address,
                                    "workers": [n.address for n in workers],
                                    "credential": {"airflow_conn_id": "ssh_fleet"},
                                    "known_hosts": farm.known_hosts_text(),
                                    "container_runtime": "docker",
                                    "ray": {"image": IMAGE}}}}}}


class ProcSampler(threading.Thread):
    """Every ``interval`` s, read argv and environment of every process of the farm's nodes;
    remember any that contains ``needle``, and the PIDs of `docker login` runs per node."""

    def __init__(self, farm: NodeFarm, needle: str, interval: float = 0.1):
        super().__init__(daemon=True)
        self.needle, self.interval = needle.encode(), interval
        self.node_of_ns = {os.readlink(f"/proc/{n.pids()[0]}/ns/pid"): n.name for n in farm.nodes}
        self.leaks: list[str] = []
        self.logins: dict[str, set[int]] = {n.name: set() for n in farm.nodes}
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def sample(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                node = self.node_of_ns.get(os.readlink(f"/proc/{entry.name}/ns/pid"))
                if node is None:
                    continue
                argv = Path(f"/proc/{entry.name}/cmdline").read_bytes()
                environ = Path(f"/proc/{entry.name}/environ").read_bytes()
            except OSError:  # exited meanwhile
                continue
            shown = argv.replace(b"\0", b" ").decode(errors="replace")
            if self.needle in argv or self.needle in environ:
                self.leaks.append(f"{node} pid {entry.name}: {shown}")
            if b"\0login\0" in argv and b"--password-stdin" in argv:
                self.logins[node].add(int(entry.name))
        self.samples += 1

    def stop(self) -> None:
        self._done.set()
        self.join()


def files_containing(root: Path, needle: bytes) -> list[str]:
    """Regular files under root whose bytes contain needle (symlinks are not followed)."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            try:
                if stat.S_ISREG(path.lstat().st_mode) and needle in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


def shim_state(node) -> Path:
    """The shim's state dir on node (/tmp/fake-docker there), seen from the host."""
    return node.dir / "tmp" / docker_shim.STATE.relative_to("/tmp")


def events(node) -> list[dict]:
    path = shim_state(node) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def container(node) -> dict | None:
    path = shim_state(node) / "containers" / f"{CONTAINER}.json"
    return json.loads(path.read_text()) if path.exists() else None


def process_env(node, comm: str) -> dict[str, str]:
    """The environment of the node's process named comm (e.g. raylet), seen from the host."""
    for pid in node.pids():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                return dict(v.decode().split("=", 1) for v in raw if b"=" in v)
        except OSError:
            continue
    return {}


def test_docker_create_rerun_delete_keeps_the_registry_password_secret(
        dags, farm, registry, caplog, capfd):
    canary = registry["canary"]
    conf = cluster_conf(farm, registry)
    sampler = ProcSampler(farm, canary)
    sampler.start()
    try:
        dr = dags["airfleet_cluster_create"].test(run_conf=conf)
        assert str(dr.state) == "success"
        record = Store().require_cluster(NAME)
        assert record.phase is Phase.RUNNING, record.cluster.status.message
        nodes = {n.address: n for n in record.cluster.status.nodes}
        assert set(nodes) == {n.address for n in farm.nodes}
        assert all(n.phase == "Running" and n.ray_node_id for n in nodes.values())
        # Ray nodes started by the containers' `ray start` (the shim ran it on each node)
        assert alive(farm) == set(nodes)
        first_ids = {a: n.ray_node_id for a, n in nodes.items()}

        password_sha = hashlib.sha256(canary.encode()).hexdigest()
        for node in farm.nodes:
            # registry CA, where docker trusts it for that registry, through the private /etc
            ca = node.dir / "etc" / "docker" / "certs.d" / REGISTRY / "ca.crt"
            assert ca.read_text() == registry["pem"], node.name
            assert stat.S_IMODE(ca.stat().st_mode) == 0o644
            assert node.run(f"cat /etc/docker/certs.d/{REGISTRY}/ca.crt").stdout \
                == registry["pem"]
            log = events(node)
            ops = [e["op"] for e in log]
            assert ops == ["login", "pull", "run"], (node.name, ops)
            login, pull, run = log
            assert (login["registry"], login["username"], login["password_sha256"]) \
                == (REGISTRY, "fleet", password_sha)
            assert pull["image"] == IMAGE
            assert pull["ca_crt_present"] and pull["logged_in"], pull  # CA + login before pull
            # model cache: created on the node, mounted at the documented path, HF_HOME there
            assert (node.dir / "tmp" / "models").is_dir()
            c = container(node)
            assert c["status"] == "running" and c["image"] == IMAGE
            assert c["env"] == {"HF_HOME": CACHE_MOUNT}
            assert c["mounts"] == [{"host": CACHE_HOST, "container": CACHE_MOUNT}]
            assert os.readlink(Path(shim_state(node), "rootfs", CONTAINER,
                                    CACHE_MOUNT.lstrip("/"))) == CACHE_HOST
            assert c["labels"]["airfleet.io/cluster"] == NAME
            assert c["command"][:2] == ["ray", "start"] and c["command"][-1] == "--block"
            assert f"--node-ip-address={node.address}" in c["command"]
            assert process_env(node, "raylet").get("HF_HOME") == CACHE_MOUNT
        assert not Path("/etc/docker/certs.d", REGISTRY).exists()  # the host's /etc untouched
        assert all(sampler.logins.values()), sampler.logins  # each login was seen running

        dr = dags["airfleet_cluster_create"].test(run_conf=conf)  # re-run: adopt
        assert str(dr.state) == "success"
        record = Store().require_cluster(NAME)
        assert record.phase is Phase.RUNNING
        assert {n.address: n.ray_node_id for n in record.cluster.status.nodes} == first_ids
        for node in farm.nodes:
            ops = [e["op"] for e in events(node)]
            assert ops.count("run") == 1 and "rm" not in ops, (node.name, ops)

        dr = dags["airfleet_cluster_delete"].test(run_conf={"name": NAME})
        assert str(dr.state) == "success"
        assert Store().get_cluster(NAME) is None
    finally:
        sampler.stop()
    for node in farm.nodes:
        assert container(node) is None, node.name
        assert not list((shim_state(node) / "rootfs").glob("*"))
        assert ray_processes(node) == [], node.name
        assert [e["op"] for e in events(node)][-2:] == ["stop", "rm"]

    assert sampler.samples > 10
    assert sampler.leaks == []
    needle = canary.encode()
    assert files_containing(Path(os.environ["AIRFLEET_DATABASE_URL"].removeprefix(
        "sqlite:///")).parent, needle) == []
    assert files_containing(Path(os.environ["AIRFLOW_HOME"]), needle) == []
    assert files_containing(farm.dir, needle) == []  # nodes' /tmp (shim state, Ray logs), /etc
    assert canary not in caplog.text
    assert all(canary not in r.getMessage() for r in caplog.records)
    out, err = capfd.readouterr()
    assert canary not in out and canary not in err
