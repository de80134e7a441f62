"""The head's Ray dashboard through the head's SSH command connection, as ``ssh -W`` does.

The dashboard answers on the head's loopback only, so nothing but the head itself reaches it
directly; Airfleet reaches it through the SSH connection that runs its commands (pinned host
key, our key): each HTTP connection to the dashboard is an SSH channel to ``127.0.0.1:port``
on the head (``direct-tcpip``, what ``ssh -L`` and ``ssh -W`` open), which httpx's HTTP/1.1
speaks over as it would over a socket. Nothing listens on this machine: no TCP port on its
loopback (that would hand the dashboard, and its Jobs API, to every local user and process of
the Airflow worker) and no local socket to relay through either, which also spares a probe the
forward's set-up and the relay's copies.

One tunnel serves a whole verb or wait: its SSH connection opens on first use and opens again
when it has dropped (keepalives notice a dead one within ~45 s). A tunnel that cannot open
raises the typed error of :mod:`.remote` (unreachable, authentication, host key), which says
why; a channel the head's sshd refuses makes the request fail, and :meth:`why_silent` says
what sshd answered.
"""

from __future__ import annotations

import asyncio
import typing

import asyncssh
import httpcore
import httpx

from airfleet.backends.ssh.dashboard import DashboardAccess, NoDashboardAccess, tls_context
from airfleet.backends.ssh.remote import Remote


class SSHDashboardTunnel(DashboardAccess):
    """``head``'s dashboard (``127.0.0.1:port`` there) through ``remote``'s connection."""

    def __init__(self, remote: Remote, head: str, port: int) -> None:
        self.remote, self.head, self.port = remote, head, port
        self.where = f"127.0.0.1:{port} on {head}, through SSH"
        self._http: httpx.AsyncClient | None = None
        self._refused: str | None = None  # what sshd said when it last refused a channel

    async def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            # httpx's own transport with httpcore's pool on SSH channels instead of sockets.
            # The host part of the URL only fills the Host header. The shared TLS context:
            # httpx would load the CA bundle for each transport (64 ms of CPU, most of a
            # probe's) although no request here is https.
            transport = httpx.AsyncHTTPTransport(verify=tls_context(), trust_env=False)
            if not isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
                # Never fall back to the transport's own pool: it would send the requests to
                # whatever listens on this machine's loopback.
                raise RuntimeError("httpx's transport has no httpcore pool to put on SSH "
                                   "channels (its layout of httpx 0.28, pinned in "
                                   "pyproject.toml): install httpx 0.28")
            transport._pool = httpcore.AsyncConnectionPool(network_backend=_Channels(self))
            self._http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}",
                                           transport=transport, trust_env=False)
        return self._http

    async def _channel(self, timeout: float | None) -> httpcore.AsyncNetworkStream:
        """A new HTTP connection to the dashboard. The SSH connection's own errors (node
        unreachable, key refused, host key) pass through as :mod:`.remote`'s typed errors;
        the channel's are httpcore's, which httpx turns into its ``TransportError``."""
        try:
            reader, writer = await self.remote.loopback_channel(self.head, self.port, timeout)
        except asyncssh.ChannelOpenError as exc:
            self._refused = self._why_refused(exc)
            raise httpcore.ConnectError(self._refused) from None
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"no SSH channel to 127.0.0.1:{self.port} on "
                                          f"{self.head} within {timeout:g} s") from None
        self._refused = None
        return _ChannelStream(reader, writer)

    def _why_refused(self, exc: asyncssh.ChannelOpenError) -> str:
        if exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
            return (f"the head's sshd refuses to forward to 127.0.0.1:{self.port} "
                    f"({exc.reason}): allow it there with AllowTcpForwarding yes (or local)")
        return f"the head's sshd cannot connect to 127.0.0.1:{self.port}: {exc.reason}"

    async def why_silent(self) -> str | None:
        """What the head's sshd said when it last refused a channel to the dashboard's port:
        nothing listens there ("Connection refused"), or forwarding is not allowed
        ("administratively prohibited": the node's sshd has ``AllowTcpForwarding no``); None
        when it opened one (the dashboard itself did not answer)."""
        return self._refused

    async def aclose(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()  # its channels; the SSH connection is the Remote's


class _Channels(httpcore.AsyncNetworkBackend):
    """httpcore's network for one tunnel: every "TCP connection" is an SSH channel."""

    def __init__(self, tunnel: SSHDashboardTunnel) -> None:
        self.tunnel = tunnel

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        return await self.tunnel._channel(timeout)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _ChannelStream(httpcore.AsyncNetworkStream):
    """One SSH channel as httpcore's byte stream (plain HTTP: no TLS over it)."""

    def __init__(self, reader: asyncssh.SSHReader, writer: asyncssh.SSHWriter) -> None:
        self._reader, self._writer = reader, writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout(f"no answer within {timeout:g} s") from None
        except (OSError, asyncssh.Error) as exc:
            raise httpcore.ReadError(str(exc)) from None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError:
            raise httpcore.WriteTimeout(f"not sent within {timeout:g} s") from None
        except (OSError, asyncssh.Error) as exc:
            raise httpcore.WriteError(str(exc)) from None

    async def aclose(self) -> None:
        self._writer.close()

    def get_extra_info(self, info: str) -> typing.Any:
        # httpcore asks before reusing a kept-alive connection: readable at rest means the
        # dashboard closed it.
        return self._reader.at_eof() if info == "is_readable" else None


def through_ssh(remote: Remote | None, head: str, port: int) -> SSHDashboardTunnel:
    """The production :data:`~airfleet.backends.ssh.dashboard.Reach`: a tunnel over the
    verb's SSH session; without SSH access there is no way to the dashboard."""
    if remote is None:
        raise NoDashboardAccess(f"the dashboard of {head} is reached through SSH, and no SSH "
                                "access was given")
    return SSHDashboardTunnel(remote, head, port)
