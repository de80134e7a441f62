"""Real SSH hosts for tests: a farm of OpenSSH servers, each in its own Linux namespaces.

The "static nodes" backend reaches bare-metal hosts over SSH and runs a Ray node on each.
`NodeFarm(count)` gives tests `count` such hosts on this machine (root needed)::

    test process (host) ── bridge afbXXXX, 10.200.k.1/24
                             ├─ veth afbXXXXv0 ══ eth0 10.200.k.2  netns afbXXXX-node0
                             ├─ veth afbXXXXv1 ══ eth0 10.200.k.3  netns afbXXXX-node1
                             └─ ...

k is a /24 that nothing on the machine uses yet (and that no other farm holds: a lock file per
subnet), so parallel test sessions don't clash. Each node is
`nsenter --net=<netns> unshare --pid --fork --kill-child=SIGKILL --mount --uts --mount-proc`
running a small bash init (`_INIT`) that prepares the namespaces and execs sshd, so sshd is
PID 1 of the node. Why each namespace:

- network: one address, loopback up and no default route. The node reaches the host and the
  other nodes only; with no route out, nothing ever waits on an unreachable server.
- PID: `ps` shows only the node's own processes; `ray stop` (which kills Ray processes by
  name) stops only this node's Ray; killing the node's init kills everything in it (a
  power-off).
- mount: a private /tmp (each node's Ray has its own /tmp/ray session dir), a private
  /dev/shm (Ray's object store), a private /etc/hosts (localhost plus every node's hostname)
  and an /etc/resolv.conf with no nameserver, so a name lookup never waits on DNS (20 s
  otherwise), and a private /etc/passwd whose root home is a per-node directory (the host's
  ~/.bashrc is not run over SSH and the host's ~root is never written to), and private
  /etc/docker and /etc/containers (`PRIVATE_ETC`: what the backend writes there, registry CA
  files, lands in `node.dir / "etc" / <name>`; if the host lacks them, empty directories are
  created as mount points, and nothing is ever written into the host's).
- UTS: `hostname` answers the node's own name.

sshd: an ed25519 host key of its own per node, key-only root login with the farm's client key
(`private_key_path`), and PATH for sessions = `node.bin_dir` : the venv's bin (`ray`) : the
standard PATH, set with sshd's `SetEnv` (and again in the node's ~/.profile for login shells).
Drop fake `nvidia-smi`/`lspci`/`docker` scripts into one node's `bin_dir`.

Files live in a temporary directory under /var/tmp (not /tmp: each node mounts its own /tmp
over it). `close()` (or leaving the `with` block) kills every node and deletes the veths,
network namespaces, bridge and directory, even after a start that failed halfway.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
STD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VENV_BIN = str(Path(sys.executable).parent)  # where `ray` lives
# /etc directories each node gets privately (bind-mounted from node.dir/etc/<name>).
PRIVATE_ETC = ("docker", "containers")
# What the nodes must still see of the host's /tmp once their own /tmp is mounted over it: the
# venv (`ray`, `python`) and this checkout (the docker shim), when they live there (a CI clone).
SHARED_FROM_TMP = tuple(sorted({str(p) for p in (Path(sys.prefix).resolve(),
                                                 Path(__file__).resolve().parents[2])
                                if str(p).startswith("/tmp/")}))
LOCK_DIR = Path("/run/lock") if Path("/run/lock").is_dir() else Path(tempfile.gettempdir())
# Tool -> the Debian package that ships it (ps: tests list a node's processes over SSH).
TOOLS = {SSHD: "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
         "ip": "iproute2", "unshare": "util-linux", "nsenter": "util-linux", "mount": "mount",
         "hostname": "hostname", "ps": "procps"}

# The node's init, run by unshare as PID 1: $1 hostname, $2 node dir, $3 farm dir, $4 sshd,
# $5 the PRIVATE_ETC names, $6 the SHARED_FROM_TMP paths.
_INIT = """set -eu
hostname "$1"
mkdir -p "$2/host-tmp"
mount --rbind /tmp "$2/host-tmp"
mount --bind "$2/tmp" /tmp
for p in $6; do mkdir -p "$p"; mount --bind "$2/host-tmp${p#/tmp}" "$p"; done
mount -t tmpfs -o mode=1777 shm /dev/shm
mount --bind "$2/passwd" /etc/passwd
mount --bind "$3/hosts" /etc/hosts
mount --bind "$3/resolv.conf" /etc/resolv.conf
for d in $5; do mount --bind "$2/etc/$d" "/etc/$d"; done
mkdir -p -m 0755 /run/sshd
exec "$4" -D -e -f "$2/sshd_config"
"""

_SSHD_CONFIG = """ListenAddress {address}:22
HostKey {dir}/ssh_host_ed25519_key
PidFile none
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile {farm_dir}/authorized_keys
StrictModes no
PermitUserEnvironment no
SetEnv "PATH={path}"
PrintMotd no
PrintLastLog no
LoginGraceTime 10
Subsystem sftp internal-sftp
{extra}
"""


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a set-up command; on failure raise with its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _wait_for(ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout} s")
        time.sleep(0.05)


def _keygen(path: Path, comment: str) -> str:
    """A new ed25519 key pair at path / path.pub; returns the public key 'ssh-ed25519 AAAA...'."""
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def _proc_field(pid: int, name: str) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _used_subnets(network: str = "10.200") -> set[int]:
    """k of every <network>.k.x address or route on the host."""
    text = _sh("ip", "-o", "-4", "addr").stdout + _sh("ip", "-4", "route", "show", "table", "all").stdout
    return {int(k) for k in re.findall(rf"\b{re.escape(network)}\.(\d+)\.", text)}


def check_tools() -> None:
    """Raise naming the Debian packages to install when a tool the farm needs is missing."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if not shutil.which(tool)})
    if missing:
        raise RuntimeError(f"NodeFarm needs: apt-get install {' '.join(missing)}")
    if os.geteuid() != 0:
        raise RuntimeError("NodeFarm needs root (network namespaces, bridges, mounts)")


@dataclass(eq=False)
class Node:
    """One host of a farm. `start()`/`stop()` power it on/off; `run()` acts inside it without SSH."""

    name: str
    hostname: str
    address: str
    netns: str
    dir: Path
    farm_dir: Path
    host_key: str = ""  # "ssh-ed25519 AAAA..."
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _init_pid: int | None = field(default=None, repr=False)  # host PID of the node's PID 1

    @property
    def bin_dir(self) -> Path:
        """Prepended to PATH in this node's SSH sessions (and in `run()`)."""
        return self.dir / "bin"

    @property
    def log_path(self) -> Path:
        return self.dir / "sshd.log"

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin_dir}:{VENV_BIN}:{STD_PATH}", "HOME": str(self.dir / "home"),
                "LANG": "C.UTF-8"}

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Boot the node: new PID/mount/UTS namespaces in its netns, sshd as PID 1."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--pid", "--fork",
                 "--kill-child=SIGKILL", "--mount", "--uts", "--mount-proc",
                 "bash", "-c", _INIT, "node-init", self.hostname, str(self.dir),
                 str(self.farm_dir), SSHD, " ".join(PRIVATE_ETC), " ".join(SHARED_FROM_TMP)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        _wait_for(self._accepts_ssh, timeout, f"{self.name}: sshd on {self.address}:22")
        self._init_pid = self._child_pid()

    def _accepts_ssh(self) -> bool:
        if self._proc.poll() is not None:
            raise RuntimeError(f"{self.name}: sshd exited ({self._proc.returncode}); "
                               f"log:\n{self.log_path.read_text()}")
        try:
            socket.create_connection((self.address, 22), timeout=0.5).close()
            return True
        except OSError:
            return False

    def _child_pid(self) -> int:
        """unshare forks the node's init: find it by its parent PID."""
        ppid = str(self._proc.pid)
        pid = next((p for p in _all_pids() if _proc_field(p, "PPid") == ppid), None)
        if pid is None:
            raise RuntimeError(f"{self.name}: init process gone; log:\n{self.log_path.read_text()}")
        return pid

    def stop(self, timeout: float = 10.0) -> None:
        """Power off: SIGKILL the node's init, which kills every process in its PID namespace.
        sshd is gone, the address stays (connections are refused). No-op when stopped."""
        if self._proc is None:
            return
        for pid in (self._init_pid, self._proc.pid):  # the init first: unshare reaps it
            if pid is None or self._proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
        self._proc = self._init_pid = None

    def pids(self) -> list[int]:
        """Host PIDs of every process in the node's PID namespace (empty when stopped)."""
        ns = self._init_pid and _pid_ns(self._init_pid)
        return sorted(p for p in _all_pids() if ns and _pid_ns(p) == ns)

    def processes(self) -> list[str]:
        """Command lines of the node's processes (kernel threads and zombies have none)."""
        return [c for c in map(_cmdline, self.pids()) if c]

    def run(self, cmd: str | Sequence[str], *, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run cmd (a bash string or an argv) inside all the node's namespaces, without SSH."""
        if self._init_pid is None:
            raise RuntimeError(f"{self.name} is not running")
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return subprocess.run(["nsenter", "-t", str(self._init_pid), "-a", "--", *argv],
                              env=self.env, cwd="/", capture_output=True, text=True,
                              check=check, timeout=timeout, input=input)


class NodeFarm:
    """`count` SSH hosts on a private bridge; a context manager (see the module docstring).

    `sshd_extra` is appended to every node's sshd_config (e.g. "LogLevel DEBUG").
    `network` is the /16 the farm's /24 is taken from: `network="10.0", subnet_index=0` puts
    the nodes at 10.0.0.2, .3, ... (the addresses README.md shows; tests/e2e/test_readme.py).
    """

    def __init__(self, count: int, *, name_prefix: str = "node", subnet_index: int | None = None,
                 base_dir: str = "/var/tmp", sshd_extra: str = "", network: str = "10.200"):
        self.count, self.name_prefix, self.subnet_index = count, name_prefix, subnet_index
        self.base_dir, self.sshd_extra, self.network = base_dir, sshd_extra, network
        self.bridge = f"afb{random.randbytes(2).hex()}"  # also the prefix of veths and netns
        self.nodes: list[Node] = []
        self.dir: Path | None = None
        self._lock = None

    def __enter__(self) -> NodeFarm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def subnet(self) -> str:
        return f"{self.network}.{self.subnet_index}.0/24"

    @property
    def host_address(self) -> str:
        """The host's (test process's) address on the bridge."""
        return f"{self.network}.{self.subnet_index}.1"

    def start(self) -> NodeFarm:
        """Build everything and boot every node; on any failure clean up and re-raise."""
        atexit.register(self.close)
        try:
            check_tools()
            self._reserve_subnet()
            self._write_files()
            self._make_network()
            for node in self.nodes:
                node.start()
        except BaseException:
            self.close()
            raise
        return self

    def _reserve_subnet(self) -> None:
        """Pick <network>.k.0/24 unused on the host, held by a lock file until close()."""
        wanted = [self.subnet_index] if self.subnet_index is not None else random.sample(range(256), 256)
        used = _used_subnets(self.network)
        for k in (k for k in wanted if k not in used):
            lock = open(LOCK_DIR / f"airfleet-nodefarm-{self.network}.{k}.lock", "w")  # noqa: SIM115
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            self.subnet_index, self._lock = k, lock
            return
        raise RuntimeError(f"no free {self.network}.k.0/24 subnet (asked {wanted[:3]}, used {sorted(used)})")

    def _write_files(self) -> None:
        """Keys, authorized_keys, hosts, resolv.conf, and per node: dirs, passwd, sshd_config."""
        self.dir = Path(tempfile.mkdtemp(prefix=f"airfleet-{self.bridge}-", dir=self.base_dir))
        self.dir.chmod(0o755)
        client_key = _keygen(self.private_key_path, f"airfleet-farm-{self.bridge}")
        (self.dir / "authorized_keys").write_text(client_key + "\n")
        for i in range(self.count):
            name = f"{self.name_prefix}{i}"
            self.nodes.append(Node(name=name, hostname=name, address=f"{self.network}.{self.subnet_index}.{i + 2}",
                                   netns=f"{self.bridge}-{name}", dir=self.dir / name, farm_dir=self.dir))
        hosts = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        (self.dir / "hosts").write_text("\n".join(hosts + [f"{n.address} {n.hostname}" for n in self.nodes]) + "\n")
        (self.dir / "resolv.conf").write_text("# no nameserver: names come from /etc/hosts\n")
        for node in self.nodes:
            self._write_node_files(node)
        self.known_hosts_path.write_text(self.known_hosts_text())

    def _write_node_files(self, node: Node) -> None:
        for sub, mode in (("tmp", 0o1777), ("bin", 0o755), ("home", 0o700),
                          *((f"etc/{d}", 0o755) for d in PRIVATE_ETC)):
            (node.dir / sub).mkdir(parents=True)
            (node.dir / sub).chmod(mode)
        for d in PRIVATE_ETC:  # a mount point on the host; nodes mount their own over it
            Path("/etc", d).mkdir(mode=0o755, exist_ok=True)
        node.host_key = _keygen(node.dir / "ssh_host_ed25519_key", f"root@{node.hostname}")
        (node.dir / "passwd").write_text(_passwd_with_root_home(node.dir / "home"))
        # Login shells (`bash -l`) reset PATH in /etc/profile, then read ~/.profile: set it again.
        (node.dir / "home" / ".profile").write_text(f'export PATH="{node.env["PATH"]}"\n')
        (node.dir / "sshd_config").write_text(_SSHD_CONFIG.format(
            address=node.address, dir=node.dir, farm_dir=self.dir, path=node.env["PATH"],
            extra=self.sshd_extra))

    def _make_network(self) -> None:
        _sh("ip", "link", "add", "name", self.bridge, "type", "bridge", "forward_delay", "0")
        _sh("ip", "addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for i, node in enumerate(self.nodes):
            host_end, node_end = f"{self.bridge}v{i}", f"{self.bridge}p{i}"
            _sh("ip", "netns", "add", node.netns)
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end, "netns", node.netns)
            _sh("ip", "link", "set", host_end, "master", self.bridge, "up")
            _sh("ip", "-n", node.netns, "link", "set", node_end, "name", "eth0")
            _sh("ip", "-n", node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
            _sh("ip", "-n", node.netns, "link", "set", "eth0", "up")
            _sh("ip", "-n", node.netns, "link", "set", "lo", "up")

    def close(self) -> None:
        """Kill every node; delete veths, netns, bridge and files. Safe to call twice."""
        for node in self.nodes:
            node.stop()
        for link in self.links():
            _sh("ip", "link", "del", link, check=False)
        for ns in self.netns():
            _sh("ip", "netns", "del", ns, check=False)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        atexit.unregister(self.close)

    def links(self) -> list[str]:
        """This farm's network links on the host (its bridge and host-side veths)."""
        names = re.findall(r"^\d+: ([^:@\s]+)", _sh("ip", "-o", "link").stdout, re.M)
        return sorted(n for n in names if n == self.bridge or re.fullmatch(rf"{self.bridge}v\d+", n))

    def netns(self) -> list[str]:
        """This farm's network namespaces that exist now."""
        names = [line.split()[0] for line in _sh("ip", "netns", "list").stdout.splitlines() if line]
        return sorted(n for n in names if n.startswith(self.bridge + "-"))

    @property
    def private_key_path(self) -> Path:
        """The client's ed25519 private key (root on every node accepts it)."""
        return self.dir / "client_key"

    @property
    def private_key_text(self) -> str:
        return self.private_key_path.read_text()

    @property
    def known_hosts_path(self) -> Path:
        return self.dir / "known_hosts"

    def known_hosts_text(self) -> str:
        """OpenSSH known_hosts lines '<address> <host key>', one per node."""
        return "".join(f"{n.address} {n.host_key}\n" for n in self.nodes)

    def host_key_pin(self) -> dict[str, str]:
        """Address -> the host key to pin ('ssh-ed25519 AAAA...', the SSH provider's host_key)."""
        return {n.address: n.host_key for n in self.nodes}

    def ssh_argv(self, node: Node, *, known_hosts: Path | None = None) -> list[str]:
        """A real `ssh` to root@node: farm key, batch mode, strict host key checking."""
        opts = {"BatchMode": "yes", "StrictHostKeyChecking": "yes", "IdentitiesOnly": "yes",
                "UserKnownHostsFile": known_hosts or self.known_hosts_path,
                "GlobalKnownHostsFile": "/dev/null", "UpdateHostKeys": "no",
                "ConnectTimeout": "5", "LogLevel": "ERROR"}
        return ["ssh", "-F", "none", "-i", str(self.private_key_path),
                *(a for k, v in opts.items() for a in ("-o", f"{k}={v}")), f"root@{node.address}"]

    def ssh(self, node: Node, command: str, *, timeout: float = 60, check: bool = False,
            known_hosts: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run command on node over real SSH; returns the completed process (text)."""
        return subprocess.run([*self.ssh_argv(node, known_hosts=known_hosts), command],
                              capture_output=True, text=True, timeout=timeout, check=check,
                              stdin=subprocess.DEVNULL)


def _passwd_with_root_home(home: Path) -> str:
    """/etc/passwd with root's home (field 6) moved to home."""
    lines = Path("/etc/passwd").read_text().splitlines()
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root":
            fields[5] = str(home)
            lines[i] = ":".join(fields)
    return "\n".join(lines) + "\n"
