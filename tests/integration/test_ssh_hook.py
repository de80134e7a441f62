"""SSH through the SSH provider: ``NodeSSHHook`` (plugins/airfleet_airflow/ssh_hook.py, an
``SSHHookAsync``) as ``clients.ssh_access`` builds it, against real OpenSSH servers (the
NodeFarm's nodes, each with its own host key), with Airflow connections as Airflow reads them
from ``AIRFLOW_CONN_*`` (JSON).

The provider parses the connection's extras (``private_key``, ``key_file``,
``private_key_passphrase``, ``host_key``, ``known_hosts``, ``no_host_key_check``: the SSH
provider's connection docs); what Airfleet adds is checked here: host keys always pinned, the
worker's ``~/.ssh`` (config, known_hosts) and agent never used, key-only logins.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from airfleet.backends.ssh.remote import HostKeyRejected, NodeAccess, Remote, run_sync
from airfleet.errors import InvalidRequest
from airfleet.resources import Cluster
from tests.fakes.nodes import NodeFarm
from tests.fakes.static_fleet import static_cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CONN = "ssh_hook_test"
FIELD = "cluster.spec.config.ssh.credential"


@pytest.fixture(scope="module")
def farm():
    with NodeFarm(2) as farm:
        yield farm


@pytest.fixture
def connection(monkeypatch):
    """Set the Airflow SSH connection ``ssh_hook_test`` (its login and port are wrong on
    purpose: the cluster's user and port win)."""
    def set_extras(**extra) -> None:
        monkeypatch.setenv(f"AIRFLOW_CONN_{CONN.upper()}", json.dumps(
            {"conn_type": "ssh", "login": "nobody", "port": 1, "extra": extra}))
    return set_extras


def access(farm: NodeFarm, **ssh) -> NodeAccess:
    from airfleet_airflow.clients import ssh_access

    spec = static_cluster(farm, 1, **{"credential": {"airflow_conn_id": CONN}, **ssh})
    return ssh_access(Cluster.model_validate(spec))


def hostnames(node_access: NodeAccess, nodes) -> list[str]:
    async def main():
        async with Remote(node_access) as remote:
            return [(await remote.run(n.address, "hostname")).stdout.strip() for n in nodes]
    return run_sync(main())


def test_the_connections_key_reaches_every_node_as_the_clusters_user(farm, connection):
    connection(private_key=farm.private_key_text)
    node_access = access(farm)
    assert node_access.connector is not None  # opened by the hook, not by asyncssh directly
    assert (node_access.user, node_access.port) == ("root", 22)
    assert hostnames(node_access, farm.nodes) == [n.hostname for n in farm.nodes]


def test_key_file_passphrase_and_known_hosts_file_extras(farm, connection, tmp_path):
    key = tmp_path / "id_locked"
    shutil.copy(farm.private_key_path, key)
    os.chmod(key, 0o600)
    subprocess.run(["ssh-keygen", "-q", "-p", "-N", "open sesame", "-f", str(key)],
                   check=True, capture_output=True)
    connection(key_file=str(key), private_key_passphrase="open sesame",
               known_hosts=str(farm.known_hosts_path))
    node_access = access(farm, known_hosts=None)
    assert hostnames(node_access, farm.nodes) == [n.hostname for n in farm.nodes]

    connection(key_file=str(key), private_key_passphrase="wrong",
               known_hosts=str(farm.known_hosts_path))
    with pytest.raises(InvalidRequest, match=f"^{FIELD}: the SSH private key cannot be read"):
        access(farm, known_hosts=None)


def test_the_host_key_extra_pins_the_node_it_names_and_refuses_another(farm, connection):
    node0, node1 = farm.nodes
    connection(private_key=farm.private_key_text, host_key=node0.host_key)
    pinned = access(farm, known_hosts=None)
    assert hostnames(pinned, [node0]) == [node0.hostname]
    with pytest.raises(HostKeyRejected, match=f"node {node1.address}: host key verification"):
        hostnames(pinned, [node1])


def test_the_clusters_known_hosts_win_over_the_host_key_extra(farm, connection):
    node0, node1 = farm.nodes
    connection(private_key=farm.private_key_text, host_key=node1.host_key)
    assert hostnames(access(farm), [node0]) == [node0.hostname]


@pytest.mark.parametrize(("extra", "expected"), [
    ({"no_host_key_check": "true"},
     "the connection sets no_host_key_check, and Airfleet never turns host key checking off"),
    ({}, "no host key pinning: give known_hosts"),
    ({"known_hosts": "/nonexistent/known_hosts"},
     "the connection's known_hosts extra names '/nonexistent/known_hosts', which cannot be "
     "read here"),
    ({"host_key": "ssh-dss AAAAB3NzaC1kc3MAAACBAP"}, "DSA/DSS host keys are not supported"),
])
def test_unpinned_or_unreadable_pins_are_refused_naming_the_fix(farm, connection, extra,
                                                                expected):
    connection(private_key=farm.private_key_text, **extra)
    with pytest.raises(InvalidRequest) as caught:
        access(farm, known_hosts=None)
    assert str(caught.value).startswith(f"{FIELD}: {expected}")


def test_a_bare_host_key_is_read_as_airflow_reads_it(farm, connection):
    """Airflow's SSH hooks read a bare base64 ``host_key`` as ssh-rsa; the farm's keys are
    ed25519, so a bare one is refused naming the type to write."""
    bare = farm.nodes[0].host_key.split()[1]
    connection(private_key=farm.private_key_text, host_key=bare)
    with pytest.raises(InvalidRequest, match="host_key says ssh-rsa but the key is "
                                             "ssh-ed25519: write 'ssh-ed25519 <base64>'"):
        access(farm, known_hosts=None)


def test_a_connection_without_a_key_or_with_a_missing_key_file_is_refused(farm, connection):
    connection()
    with pytest.raises(InvalidRequest, match=f"^{FIELD}: the connection has no private_key "
                                             r"\(or key_file\) extra"):
        access(farm)
    connection(key_file="/nonexistent/id_ed25519")
    with pytest.raises(InvalidRequest, match="key_file extra names '/nonexistent/id_ed25519', "
                                             "which cannot be read here"):
        access(farm)


def test_the_workers_ssh_config_agent_and_known_hosts_are_never_used(farm, connection,
                                                                     tmp_path, monkeypatch):
    """A worker's ~/.ssh/config that sends every host elsewhere as another user, an agent
    holding another key, and a ~/.ssh/known_hosts trusting the nodes change nothing: the
    cluster's user, the connection's key and the pinned host keys are all that count."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host *\n  HostName 127.0.0.9\n  User nobody\n"
                                          "  Port 1\n")
    shutil.copy(farm.known_hosts_path, home / ".ssh" / "known_hosts")
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True)
    agent = subprocess.run(["ssh-agent", "-s", "-a", str(tmp_path / "agent.sock")], check=True,
                           capture_output=True, text=True)
    agent_pid = agent.stdout.split("SSH_AGENT_PID=")[1].split(";")[0]
    try:
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent.sock"))
        subprocess.run(["ssh-add", "-q", str(other)], check=True)
        connection(private_key=farm.private_key_text)
        assert hostnames(access(farm), farm.nodes) == [n.hostname for n in farm.nodes]
        # ... and the worker's known_hosts pins nothing for Airfleet
        with pytest.raises(InvalidRequest, match="no host key pinning"):
            access(farm, known_hosts=None)
    finally:
        subprocess.run(["kill", agent_pid], check=False)


def test_the_providers_hook_api_runs_a_command_on_a_node(farm, connection):
    """The hook is an ``SSHHookAsync``: its ``run_command`` works, with Airfleet's options."""
    from airflow.providers.ssh.hooks.ssh import SSHHookAsync
    from airflow.sdk import BaseHook

    from airfleet_airflow.ssh_hook import NodeSSHHook

    connection(private_key=farm.private_key_text)
    node0 = farm.nodes[0]
    hook = NodeSSHHook(CONN, username="root", port=22, known_hosts=farm.known_hosts_text(),
                       host=node0.address)
    hook.node_access(BaseHook.get_connection(CONN))
    assert isinstance(hook, SSHHookAsync)
    assert run_sync(hook.run_command("hostname")) == (0, node0.hostname + "\n", "")
