"""The SSH provider's async hook, for the nodes of a static-nodes cluster.

From the provider (``SSHHookAsync``): the Airflow SSH connection and its extras, parsed by the
provider (``private_key`` or ``key_file``, ``private_key_passphrase``, ``host_key``,
``known_hosts`` (a file), ``no_host_key_check``), and the hook's API (``get_conn``,
``run_command``). Added here, thinly:

- one hook for every node of a cluster: :meth:`NodeSSHHook.connect` opens the connection to a
  node with the provider's ``get_conn``;
- host keys always pinned: the cluster's ``known_hosts`` lines, else the connection's
  ``host_key`` (trusted for every node) or ``known_hosts`` file. ``no_host_key_check`` and
  the worker's own ``~/.ssh/known_hosts`` are refused, never used;
- the connect options of :func:`airfleet.backends.ssh.remote.ssh_options`: the provider's
  ``_get_conn`` reads the worker's ``~/.ssh/config``, offers its agent's keys and the
  connection's password, and has no connect timeout, so a task could log in as someone else
  or hang; key-only, agent-less, bounded connects are Airfleet's rule for every node.

What the provider has no notion of stays in :class:`airfleet.backends.ssh.remote.Remote`,
which uses these connections: one reused connection per node, at most ``SESSIONS_PER_NODE``
sessions on it, refused session opens retried. The head's dashboard is reached through SSH
channels on the head's command connection (``Remote.loopback_channel``), not the provider's
``AsyncSSHTunnel``, which opens another connection per tunnel and listens on a TCP port of
this machine's loopback, where any local user could reach the dashboard.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import asyncssh
from airflow.providers.ssh.hooks.ssh import SSHHookAsync

from airfleet.backends.ssh.remote import InvalidNodeAccess, NodeAccess, ssh_options


class NodeSSHHook(SSHHookAsync):
    """SSH to the nodes of one cluster, as ``user`` on ``port`` (the cluster's spec wins over
    the connection's login and port).

    :param ssh_conn_id: the Airflow SSH connection holding the key; empty for a key given as
        ``private_key`` (a vault credential).
    :param known_hosts: the cluster's known_hosts lines; they win over the connection's pins.
    :param host_key: one host key trusted for every node, when no connection gives it.
    """

    hook_name = "Airfleet static nodes (SSH)"

    def __init__(self, ssh_conn_id: str = "", *, username: str, port: int,
                 known_hosts: str | None = None, private_key: str = "", passphrase: str = "",
                 host_key: str | None = None, host: str | None = None) -> None:
        super().__init__(ssh_conn_id=ssh_conn_id, host=host, port=port, username=username,
                         private_key=private_key, passphrase=passphrase)
        self.cluster_known_hosts = known_hosts
        self.given_host_key = host_key
        self.access: NodeAccess | None = None

    def node_access(self, conn=None) -> NodeAccess:
        """Check what the connection ``conn`` (already looked up; its extras are parsed by the
        provider) and the arguments give: the :class:`NodeAccess` for ``Remote``, whose
        connections this hook opens.

        :raises InvalidNodeAccess: naming what is missing or unusable.
        """
        if conn is not None:
            try:
                self._parse_extras(conn)
            except ValueError as exc:  # the provider's own refusals (DSA keys, contradictions)
                raise InvalidNodeAccess(str(exc)) from None
        self.access = NodeAccess(user=self.username, port=self.port,
                                 private_key=self._private_key(),
                                 passphrase=self.passphrase or None, connector=self.connect,
                                 **self._pinning())
        return self.access

    def _private_key(self) -> str:
        if self.private_key:  # the provider prefers it over key_file too
            return self.private_key
        if not self.key_file:
            raise InvalidNodeAccess("the connection has no private_key (or key_file) extra; "
                                    "add the nodes' private key there")
        return _read(self.key_file, "key_file")

    def _pinning(self) -> dict[str, str]:
        if self.cluster_known_hosts:
            return {"known_hosts": self.cluster_known_hosts}
        if self.given_host_key:
            return {"host_key": self.given_host_key}
        if isinstance(self.known_hosts, bytes):  # the host_key extra: b"<host> <type> <key>"
            return {"host_key": " ".join(self.known_hosts.decode().split()[-2:])}
        if self.known_hosts == "none":
            raise InvalidNodeAccess(
                "the connection sets no_host_key_check, and Airfleet never turns host key "
                "checking off: give the connection a host_key extra, or the cluster known_hosts")
        if self.known_hosts != os.path.expanduser(self.default_known_hosts):
            return {"known_hosts": _read(self.known_hosts, "known_hosts")}
        return {}  # NodeAccess refuses: the worker's own ~/.ssh/known_hosts is never used

    async def connect(self, node: str) -> asyncssh.SSHClientConnection:
        """A new connection to ``node``: the provider's ``get_conn``, on this hook's access."""
        hook = copy.copy(self)
        hook.host = node
        return await hook.get_conn()

    async def _get_conn(self) -> asyncssh.SSHClientConnection:
        """The provider's connect, with Airfleet's options (see the module's docstring); the
        connection was read once, by :meth:`node_access`."""
        if self.access is None:
            raise RuntimeError("NodeSSHHook: call node_access() before connecting")
        return await asyncssh.connect(self.host, **ssh_options(self.access))


def _read(path: str, extra: str) -> str:
    try:
        return Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidNodeAccess(f"the connection's {extra} extra names {path!r}, which cannot "
                                f"be read here: {exc.strerror or exc}") from None
