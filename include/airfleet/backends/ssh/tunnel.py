"""The head's Ray dashboard through an SSH local forward, over the head's command connection.

The dashboard answers on the head's loopback only, so nothing but the head itself reaches it
directly; Airfleet reaches it as ``ssh -L`` does, through the SSH connection that runs its
commands (pinned host key, our key). The forward listens on a UNIX socket in a 0700
directory of its own, not on a TCP port of this machine's loopback: a TCP port there would
hand the dashboard (and its Jobs API) to every local user and process of the Airflow worker
while the forward is open.

One tunnel serves a whole verb or wait: it opens on first use and opens again when its SSH
connection has dropped (keepalives notice a dead one within ~45 s). A tunnel that cannot
open raises the typed error of :mod:`.remote` (unreachable, authentication, host key), which
says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile

import asyncssh
import httpx

from airfleet.backends.ssh.dashboard import DashboardAccess, NoDashboardAccess, tls_context
from airfleet.backends.ssh.remote import Remote


class SSHDashboardTunnel(DashboardAccess):
    """``head``'s dashboard (``127.0.0.1:port`` there) through ``remote``'s connection."""

    def __init__(self, remote: Remote, head: str, port: int) -> None:
        self.remote, self.head, self.port = remote, head, port
        self.where = f"127.0.0.1:{port} on {head}, through SSH"
        self._lock = asyncio.Lock()
        self._dir: str | None = None
        self._conn: asyncssh.SSHClientConnection | None = None
        self._listener: asyncssh.SSHListener | None = None
        self._http: httpx.AsyncClient | None = None

    @property
    def is_open(self) -> bool:
        return self._http is not None and self._conn is not None and not self._conn.is_closed()

    async def _client(self) -> httpx.AsyncClient:
        async with self._lock:
            if not self.is_open:
                await self._close_forward()
                await self._open()
            return self._http

    async def _open(self) -> None:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="airfleet-dash-")  # 0700: ours only
        socket_path = os.path.join(self._dir, "s")
        with contextlib.suppress(FileNotFoundError):  # left by a forward that dropped
            os.unlink(socket_path)
        self._conn, self._listener = await self.remote.forward_to_loopback(
            self.head, self.port, socket_path)
        # The host part only fills the Host header: the socket decides where requests go.
        # The shared TLS context: httpx would load the CA bundle for each transport (64 ms of
        # CPU, most of a probe's) although no request here is https.
        transport = httpx.AsyncHTTPTransport(uds=socket_path, verify=tls_context())
        self._http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}",
                                       transport=transport, trust_env=False)

    async def why_silent(self) -> str | None:
        """What the head's sshd says when asked to connect to the dashboard's port: nothing
        listening there ("Connection refused"), or forwarding not allowed
        ("administratively prohibited": the node's sshd has ``AllowTcpForwarding no``)."""
        conn = self._conn
        if conn is None or conn.is_closed():
            return None
        try:
            _, writer = await asyncio.wait_for(conn.open_connection("127.0.0.1", self.port), 5)
        except asyncssh.ChannelOpenError as exc:
            if exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
                return (f"the head's sshd refuses to forward to 127.0.0.1:{self.port} "
                        f"({exc.reason}): allow it there with AllowTcpForwarding yes (or local)")
            return f"the head's sshd cannot connect to 127.0.0.1:{self.port}: {exc.reason}"
        except (OSError, asyncssh.Error):  # a timeout too: nothing more to tell
            return None
        writer.close()
        return None

    async def _close_forward(self) -> None:
        http, listener = self._http, self._listener
        self._http = self._listener = self._conn = None
        if http is not None:
            await http.aclose()
        if listener is not None:
            listener.close()
            with contextlib.suppress(OSError, asyncssh.Error):
                await asyncio.wait_for(listener.wait_closed(), 5)

    async def aclose(self) -> None:
        async with self._lock:
            await self._close_forward()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None


def through_ssh(remote: Remote | None, head: str, port: int) -> SSHDashboardTunnel:
    """The production :data:`~airfleet.backends.ssh.dashboard.Reach`: a tunnel over the
    verb's SSH session; without SSH access there is no way to the dashboard."""
    if remote is None:
        raise NoDashboardAccess(f"the dashboard of {head} is reached through SSH, and no SSH "
                                "access was given")
    return SSHDashboardTunnel(remote, head, port)
