"""Run commands on static nodes over SSH (asyncssh), with pinned host keys.

A :class:`Remote` holds one SSH connection per node, opened on first use and reused by every
command of the same ``async with`` block (one task), closed at its end. In Airflow the
connections are opened by the SSH provider's ``SSHHookAsync`` (``airfleet_airflow.ssh_hook.
NodeSSHHook``: it reads the Airflow connection and hands over a :class:`NodeAccess` whose
``connector`` it is); without Airflow (the CLI, tests) :class:`NodeAccess` opens them itself,
with the same options (:func:`ssh_options`). :meth:`Remote.run`
runs one command; :meth:`Remote.run_all` fans a command out over nodes with bounded
concurrency, each node under its own timeout. Plain (synchronous) Airflow tasks call
:func:`run_sync`.

Secrets never go into command strings: a command line is visible to every user of the node in
``ps``, in shell history and audit logs, and in our own error messages. Hand a secret to the
command on stdin (``run(node, "docker login --password-stdin ...", stdin=password)``) or in a
0600 file written from stdin. stdin is never logged. Values that must appear in a command but
should not be shown are listed in ``redact=`` and replaced by ``***`` in logs and errors.

Failures are typed (all :class:`RemoteCommandError`, each naming the node and what to check):
a non-zero exit (:class:`RemoteCommandError` itself), :class:`RemoteTimeout`,
:class:`NodeUnreachable`, :class:`HostKeyRejected`, :class:`AuthenticationFailed`. Their
``transient`` attribute says whether a retry may help.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shlex
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import asyncssh
from asyncssh.encryption import get_encryption_algs

from airfleet.errors import AirfleetError

log = logging.getLogger(__name__)
# asyncssh logs every connection, channel and command at INFO: in a task log that drowns what
# we say ourselves (each command is logged here, redacted, at debug).
logging.getLogger("asyncssh").setLevel(logging.WARNING)

T = TypeVar("T")
# Opens the SSH connection to one node (address -> connection), with ssh_options(access).
Connector = Callable[[str], Awaitable["asyncssh.SSHClientConnection"]]

KEEPALIVE_INTERVAL = 15  # seconds
KEEPALIVE_COUNT_MAX = 3  # unanswered keepalives before the connection counts as dead
STDERR_TAIL_LINES = 20
STDERR_TAIL_CHARS = 2000
COMMAND_SHOWN_CHARS = 300
REDACTED = "***"
# Concurrent commands per node connection; below sshd's MaxSessions (default 10).
SESSIONS_PER_NODE = 8
SESSION_OPEN_ATTEMPTS = 6  # a refused session open is retried after 0.05, 0.1, ... 0.8 s
REMOTE_KILL_GRACE = 2  # seconds after a client-side timeout before the node kills the command


# ---- errors ----------------------------------------------------------------------------------

class InvalidNodeAccess(AirfleetError, ValueError):
    """SSH access settings that cannot be used (no host key pinning, unreadable key, ...)."""


class RemoteCommandError(AirfleetError):
    """A command on a node failed: it exited non-zero (this class) or could not run or finish
    (the subclasses). ``command`` and ``stderr_tail`` are redacted."""

    transient: ClassVar[bool] = False

    def __init__(self, node: str, command: str, exit_code: int | None = None,
                 stderr_tail: str = "", message: str | None = None) -> None:
        self.node = node
        self.command = command
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail
        super().__init__(message or self._describe())

    def _describe(self) -> str:
        tail = self.stderr_tail.strip() or "(no output on stderr)"
        return f"node {self.node}: `{_shorten(self.command)}` exited with {self.exit_code}: {tail}"

    def __reduce__(self):  # picklable with its attributes (Airflow, multiprocessing)
        return (_rebuild, (type(self), self.__dict__.copy(), str(self)))


def _rebuild(cls: type[RemoteCommandError], state: dict[str, Any], message: str):
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class RemoteTimeout(RemoteCommandError):
    """The command did not finish within its timeout; it was interrupted."""

    transient = True

    def __init__(self, node: str, command: str, timeout: float, stderr_tail: str = "") -> None:
        self.timeout = timeout
        tail = f"; stderr so far: {stderr_tail.strip()}" if stderr_tail.strip() else ""
        super().__init__(
            node, command, None, stderr_tail,
            f"node {node}: `{_shorten(command)}` did not finish within {timeout:g} s and was "
            f"interrupted (check the node's load and the command's progress there, or give it "
            f"a longer timeout){tail}")


class NodeUnreachable(RemoteCommandError):
    """No SSH session to the node: refused, timed out, or the connection dropped."""

    transient = True

    def __init__(self, node: str, command: str, port: int, reason: str) -> None:
        self.port = port
        self.reason = reason
        super().__init__(
            node, command, None, "",
            f"node {node}: unreachable over SSH on port {port} ({reason}): check that the "
            f"node is up, that sshd listens on port {port} and that no firewall drops the "
            f"connection")


class HostKeyRejected(RemoteCommandError):
    """The node's host key is not the pinned one: refused, possibly a different machine."""

    def __init__(self, node: str, command: str, reason: str) -> None:
        self.reason = reason
        super().__init__(
            node, command, None, "",
            f"node {node}: host key verification failed ({reason}); nothing was sent. Check "
            f"that {node} is the intended machine; if its host key was legitimately replaced, "
            f"verify the new fingerprint out of band and update the pinned known_hosts / "
            f"host_key of the SSH connection")


class AuthenticationFailed(RemoteCommandError):
    """The node refused our key."""

    def __init__(self, node: str, command: str, user: str, reason: str) -> None:
        self.user = user
        super().__init__(
            node, command, None, "",
            f"node {node}: SSH authentication as {user!r} failed ({reason}): check that the "
            f"connection's public key is in ~{user}/.ssh/authorized_keys on {node}")


def _shorten(text: str, limit: int = COMMAND_SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tail(text: str, lines: int = STDERR_TAIL_LINES, chars: int = STDERR_TAIL_CHARS) -> str:
    """The last ``lines`` lines of ``text``, at most ``chars`` characters."""
    kept = "\n".join(text.rstrip("\n").splitlines()[-lines:])
    return kept if len(kept) <= chars else "..." + kept[-(chars - 3):]


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace each secret (and its shell-quoted spelling) in ``text`` by ``***``."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        for spelling in (shlex.quote(secret), secret):
            text = text.replace(spelling, REDACTED)
    return text


_redact = redact  # Remote.run has a parameter of that name


# ---- access ----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class NodeAccess:
    """How to reach the nodes of a cluster: the same user, port, key and pinning for each.

    Host keys are always pinned, one of two ways: ``known_hosts`` (OpenSSH known_hosts text,
    lines ``<host> <keytype> <base64>``; hashed entries and ``@cert-authority`` lines work) or
    ``host_key`` (one ``<keytype> <base64>`` line, or the bare base64 key, trusted for every
    node, as the ``host_key`` extra of Airflow's SSH connection). Host key checking cannot be
    turned off.
    """

    user: str
    private_key: str = field(repr=False)  # OpenSSH or PEM text; a secret
    port: int = 22
    known_hosts: str | None = field(default=None, repr=False)
    host_key: str | None = None
    passphrase: str | None = field(default=None, repr=False)
    connect_timeout: float = 10.0
    command_timeout: float = 120.0
    # Who opens the connections (the SSH provider's hook, in Airflow); None: asyncssh here.
    connector: Connector | None = field(default=None, repr=False, compare=False)
    _client_key: Any = field(init=False, repr=False, compare=False)
    _trusted: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.user:
            raise InvalidNodeAccess("an SSH user is required")
        if isinstance(self.port, bool) or not isinstance(self.port, int) \
                or not 1 <= self.port <= 65535:
            raise InvalidNodeAccess(f"SSH port {self.port!r} is not a TCP port")
        if not self.connect_timeout > 0 or not self.command_timeout > 0:
            raise InvalidNodeAccess("connect_timeout and command_timeout must be positive")
        object.__setattr__(self, "_trusted", _pinning(self.known_hosts, self.host_key))
        try:
            key = asyncssh.import_private_key(self.private_key, self.passphrase)
        except (asyncssh.KeyImportError, ValueError, TypeError):
            # The parser's message is dropped on purpose: it must never echo key material.
            raise InvalidNodeAccess(
                "the SSH private key cannot be read: expected an unencrypted OpenSSH or PEM "
                "private key, or the right passphrase") from None
        object.__setattr__(self, "_client_key", key)

    async def connect(self, node: str) -> asyncssh.SSHClientConnection:
        """A new SSH connection to ``node`` (with :func:`ssh_options`)."""
        if self.connector is not None:
            return await self.connector(node)
        return await asyncssh.connect(node, **ssh_options(self))


def _pinning(known_hosts: str | None, host_key: str | None) -> asyncssh.SSHKnownHosts:
    if known_hosts and host_key:
        raise InvalidNodeAccess("give known_hosts or host_key, not both")
    if not known_hosts and not host_key:
        raise InvalidNodeAccess(
            "no host key pinning: give known_hosts (lines '<host> <keytype> <base64>', e.g. "
            "from `ssh-keyscan -p PORT HOST`, fingerprints checked out of band) or one "
            "host_key ('ssh-ed25519 AAAA...') trusted for every node; host key checking is "
            "never disabled")
    if host_key:
        words = host_key.split()
        if len(words) == 1:  # Airflow also accepts the bare base64 key: its type is inside
            words = [_key_type(words[0]), words[0]]
        if len(words) < 2 or not words[0].startswith(("ssh-", "ecdsa-", "sk-")):
            raise InvalidNodeAccess(f"host_key {host_key[:40]!r}...: expected "
                                    "'<keytype> <base64>', e.g. 'ssh-ed25519 AAAA...'")
        actual = _key_type(words[1])
        if actual != words[0]:
            raise InvalidNodeAccess(
                f"host_key says {words[0]} but the key is {actual}: write '{actual} <base64>' "
                "(Airflow's SSH hooks read a bare base64 host_key extra as ssh-rsa)")
        try:
            asyncssh.import_public_key(f"{words[0]} {words[1]}")
        except (asyncssh.KeyImportError, ValueError):
            raise InvalidNodeAccess(f"host_key is not a readable public key: {words[0]} "
                                    f"{words[1][:24]}...") from None
        known_hosts = f"* {words[0]} {words[1]}\n"
    entries = [ln for ln in known_hosts.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not entries:
        raise InvalidNodeAccess("known_hosts has no entries")
    try:
        return asyncssh.import_known_hosts(known_hosts)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise InvalidNodeAccess(f"known_hosts cannot be read: {exc}") from None


def _key_type(b64: str) -> str:
    try:
        blob = base64.b64decode(b64, validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        return blob[4:4 + length].decode("ascii")
    except (ValueError, struct.error, UnicodeDecodeError):
        raise InvalidNodeAccess("host_key: not a base64 SSH public key") from None


# ---- SSH options: the one place ---------------------------------------------------------------

_GCM_FIRST = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
_GCM_FIRST += [alg.decode() for alg in get_encryption_algs() if alg.decode() not in _GCM_FIRST]
SSH_OPTIONS: dict[str, Any] = {
    # Notice a dead node (powered off, network gone) within ~45 s instead of waiting for a TCP
    # timeout (minutes, or forever on an idle connection): ServerAliveInterval/CountMax.
    "keepalive_interval": KEEPALIVE_INTERVAL,
    "keepalive_count_max": KEEPALIVE_COUNT_MAX,
    # Never read ~/.ssh/config of whoever runs the worker: what we connect with is stated
    # here and in NodeAccess, nowhere else.
    "config": None,
    # Agent: neither used for authentication (IdentitiesOnly: offer only the given key, so a
    # worker's agent never decides who we log in as, and a node never sees other keys) nor
    # forwarded (a compromised node must not be able to use our agent).
    "agent_path": None,
    "agent_forwarding": False,
    # Key-only authentication: no password or keyboard-interactive prompts (a task cannot
    # answer them and would hang until the login timeout), no host-based or GSSAPI auth.
    "preferred_auth": "publickey",
    "password_auth": False,
    "kbdint_auth": False,
    "host_based_auth": False,
    "gss_auth": False,
    "gss_kex": False,
    # Host keys are pinned by NodeAccess; never trust X.509 host certificates from a CA bundle
    # that happens to sit in ~/.ssh.
    "x509_trusted_certs": None,
    # Nothing but the command channel: no X11.
    "x11_forwarding": False,
    # AES-GCM before ChaCha20-Poly1305 (asyncssh's and OpenSSH's first choice), both AEAD:
    # asyncssh builds two ChaCha20 ciphers per packet, which cost a fleet's health check 15%
    # of each probe's CPU; AES-GCM runs on the CPU's AES instructions. The rest of asyncssh's
    # list follows for a server that has no GCM.
    "encryption_algs": _GCM_FIRST,
}


def ssh_options(access: NodeAccess) -> dict[str, Any]:
    """asyncssh ``connect`` keyword arguments for ``access``: :data:`SSH_OPTIONS` plus the
    per-connection ones."""
    return {
        **SSH_OPTIONS,
        "port": access.port,
        "username": access.user,
        # Pinned host keys (known_hosts lines, or one key for every node): an unknown or
        # different host key refuses the connection before anything is sent.
        "known_hosts": access._trusted,
        # Only the given key (IdentitiesOnly); the default ~/.ssh/id_* files are not tried.
        "client_keys": [access._client_key],
        # Bound the whole connect: TCP, key exchange and authentication (ConnectTimeout).
        "connect_timeout": access.connect_timeout,
    }


# ---- running commands ------------------------------------------------------------------------

@dataclass(frozen=True)
class CommandResult:
    node: str
    exit_status: int  # negative: killed by that signal
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class Remote:
    """Commands on nodes over SSH, one reused connection per node.

    ::

        async with Remote(access) as remote:
            result = await remote.run("10.0.0.2", "docker ps")
            await remote.run("10.0.0.2", commands.registry_login("docker", host, user),
                             stdin=password.encode())

    Secrets go to ``stdin`` (or a file written from stdin), never into ``command``.
    """

    def __init__(self, access: NodeAccess) -> None:
        self.access = access
        self._connections: dict[str, asyncssh.SSHClientConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._sessions: dict[str, asyncio.Semaphore] = {}

    async def __aenter__(self) -> Remote:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        connections, self._connections = list(self._connections.values()), {}
        for conn in connections:
            conn.close()
        for conn in connections:
            try:
                await asyncio.wait_for(conn.wait_closed(), 5)
            except (TimeoutError, OSError, asyncssh.Error):
                pass

    async def _connection(self, node: str, command: str) -> asyncssh.SSHClientConnection:
        lock = self._locks.setdefault(node, asyncio.Lock())
        async with lock:
            conn = self._connections.get(node)
            if conn is not None and not conn.is_closed():
                return conn
            self._connections.pop(node, None)
            conn = await self._connect(node, command)
            self._connections[node] = conn
            return conn

    async def _connect(self, node: str, command: str) -> asyncssh.SSHClientConnection:
        access = self.access
        started = time.monotonic()
        try:
            conn = await access.connect(node)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise HostKeyRejected(node, command, exc.reason) from None
        except asyncssh.PermissionDenied as exc:
            raise AuthenticationFailed(node, command, access.user, exc.reason) from None
        except TimeoutError:
            raise NodeUnreachable(node, command, access.port,
                                  f"no SSH session within {access.connect_timeout:g} s") from None
        except asyncssh.DisconnectError as exc:
            raise NodeUnreachable(node, command, access.port, exc.reason or "disconnected") from None
        except OSError as exc:  # refused, no route, DNS: the errno says it best
            reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
            raise NodeUnreachable(node, command, access.port, reason) from None
        log.debug("node %s: connected as %s in %.2f s", node, access.user,
                  time.monotonic() - started)
        return conn

    async def loopback_channel(self, node: str, port: int, timeout: float | None = None,
                               ) -> tuple[asyncssh.SSHReader, asyncssh.SSHWriter]:
        """A stream to ``127.0.0.1:port`` on ``node``, as ``ssh -W 127.0.0.1:port`` opens: an
        SSH channel (``direct-tcpip``) over the node's command connection (the same pinned
        host key). Nothing listens on this machine for it.

        :param timeout: for the channel (the connection has its own connect timeout).
        :raises RemoteCommandError: as :meth:`run` does when the node cannot be reached (the
            connection lost while the channel opens, too: the next call connects again).
        :raises asyncssh.ChannelOpenError: the node's sshd refused the channel (nothing
            listens on the port, or its ``AllowTcpForwarding`` forbids it).
        """
        label = f"ssh -W 127.0.0.1:{port}"
        conn = await self._connection(node, label)
        # The timeout outside the try: its TimeoutError is an OSError, and a channel that is
        # slow to open says nothing about the connection.
        async with asyncio.timeout(timeout):
            try:
                return await conn.open_connection("127.0.0.1", port)
            except (asyncssh.DisconnectError, OSError) as exc:  # the connection died meanwhile
                self._forget(node, conn)
                reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
                raise NodeUnreachable(node, label, self.access.port,
                                      f"cannot open a channel to port {port}: {reason}") from None

    def _forget(self, node: str, conn: asyncssh.SSHClientConnection) -> None:
        if self._connections.get(node) is conn:
            del self._connections[node]
        conn.abort()

    async def run(self, node: str, command: str, *, stdin: bytes | str | None = None,
                  timeout: float | None = None, check: bool = True,
                  redact: Sequence[str] = ()) -> CommandResult:
        """Run ``command`` (POSIX sh, e.g. from :mod:`.commands`) on ``node``.

        :param stdin: data for the command's standard input (the way to pass a secret); never
            logged. Without it the command reads end-of-file at once.
        :param timeout: seconds for the command once the connection is up (default
            ``access.command_timeout``); connecting has its own ``connect_timeout``.
        :param check: raise :class:`RemoteCommandError` on a non-zero exit.
        :param redact: values shown as ``***`` in logs and errors (command and stderr).
        :raises RemoteCommandError: or one of its subclasses.
        """
        timeout = self.access.command_timeout if timeout is None else timeout
        shown = _redact(command, redact)
        log.debug("node %s: run `%s`", node, shown)
        started = time.monotonic()
        conn = await self._connection(node, shown)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        sessions = self._sessions.setdefault(node, asyncio.Semaphore(SESSIONS_PER_NODE))
        process = completed = None
        try:
            async with asyncio.timeout(timeout), sessions:
                process = await _open_session(conn, bounded(command, timeout), data)
                completed = await process.wait()
                process.close()  # hand the session back before the slot is reused
                await process.wait_closed()
        except TimeoutError:
            if completed is None:
                stderr = _interrupt(process)
                raise RemoteTimeout(node, shown, timeout,
                                    tail(_redact(stderr, redact))) from None
        except asyncssh.ChannelOpenError as exc:  # the connection itself may be fine
            raise NodeUnreachable(node, shown, self.access.port,
                                  f"cannot open a session: {exc.reason}") from None
        except (asyncssh.DisconnectError, OSError) as exc:
            self._forget(node, conn)
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            raise NodeUnreachable(node, shown, self.access.port,
                                  f"connection lost: {reason}") from None
        if completed.exit_status is None and completed.exit_signal is None:
            # The channel closed with no exit status: the connection died under the command
            # (keepalives unanswered, node gone). Its outcome on the node is unknown.
            self._forget(node, conn)
            raise NodeUnreachable(node, shown, self.access.port,
                                  "connection lost before the command finished; its outcome on "
                                  "the node is unknown")
        result = CommandResult(node, _exit_status(completed), _text(completed.stdout),
                               _text(completed.stderr))
        log.debug("node %s: exit %s after %.2f s", node, result.exit_status,
                  time.monotonic() - started)
        if check and result.exit_status != 0:
            raise RemoteCommandError(node, shown, result.exit_status,
                                     tail(_redact(result.stderr, redact)))
        return result

    async def run_all(self, nodes: Iterable[str], command_for_node: Callable[[str], str], *,
                      limit: int = 8, timeout: float | None = None,
                      stdin: bytes | str | None = None, check: bool = True,
                      redact: Sequence[str] = (),
                      on_result: Callable[[str, CommandResult | Exception], None] | None = None,
                      ) -> dict[str, CommandResult | Exception]:
        """Run a command on each node, at most ``limit`` at a time, each under its own timeout
        (``connect_timeout`` + ``timeout``), so a slow or dead node delays no other beyond it.

        :returns: per node (in the given order) its result or the exception it raised.
        :param on_result: called as each node finishes (e.g. to report progress).
        """
        nodes = list(dict.fromkeys(nodes))
        semaphore = asyncio.Semaphore(max(1, limit))
        results: dict[str, CommandResult | Exception] = {}

        async def one(node: str) -> None:
            async with semaphore:
                try:
                    outcome: CommandResult | Exception = await self.run(
                        node, command_for_node(node), stdin=stdin, timeout=timeout,
                        check=check, redact=redact)
                except Exception as exc:  # noqa: BLE001 - collected per node for the caller
                    outcome = exc
            results[node] = outcome
            if on_result is not None:
                on_result(node, outcome)

        await asyncio.gather(*(one(n) for n in nodes))
        return {n: results[n] for n in nodes}


async def _open_session(conn: asyncssh.SSHClientConnection, command: str,
                        data: bytes | None) -> asyncssh.SSHClientProcess:
    """Open the command's session, retrying a refused open: nothing has run then.

    sshd frees a closed session only at its next channel garbage collection, so a close and
    the next open arriving together can exceed MaxSessions ("no more sessions" in its log,
    "open failed" here) even below the limit.
    """
    attempts = 0
    while True:
        try:
            return await conn.create_process(
                command, encoding=None, input=data or None,
                stdin=asyncssh.PIPE if data else asyncssh.DEVNULL)
        except asyncssh.ChannelOpenError:
            attempts += 1
            if attempts >= SESSION_OPEN_ATTEMPTS:
                raise
            await asyncio.sleep(0.05 * 2 ** (attempts - 1))


def bounded(command: str, timeout: float) -> str:
    """What is sent for ``command``: run by POSIX ``sh`` (whatever the user's login shell),
    under coreutils ``timeout`` in its own process group.

    OpenSSH ignores the SSH "signal" request ("session signalling requires privilege
    separation"), and closing the channel leaves the command running, so the node enforces
    the bound itself: :data:`REMOTE_KILL_GRACE` seconds after the client gave up it sends
    SIGTERM to the command's whole process group (SIGKILL 5 s later), so a timed-out command
    and its children do not run on beside a retry.
    """
    limit = f"{timeout + REMOTE_KILL_GRACE:g}"
    return f"exec timeout -k 5 {limit} sh -c {shlex.quote(command)}"


def _interrupt(process: asyncssh.SSHClientProcess | None) -> str:
    """Give up on a timed-out command (its channel is closed; the node's ``timeout`` ends it,
    see :func:`bounded`); return what it wrote on stderr so far."""
    if process is None:
        return ""
    stderr = b""
    try:
        _, stderr = process.collect_output()
    except (OSError, asyncssh.Error, ValueError):
        pass
    process.close()
    return _text(stderr)


def _exit_status(completed: asyncssh.SSHCompletedProcess) -> int:
    if completed.exit_status is not None and completed.exit_status >= 0:
        return completed.exit_status
    return completed.returncode if completed.returncode is not None else -1


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from plain (synchronous) code, e.g. an Airflow ``@task``::

        result = run_sync(remote_session(access))

    Only where no event loop is running (a task's ``execute``); inside async code, await.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError("run_sync() was called while an event loop is running: await the "
                       "coroutine instead")
