"""POSIX sh commands that run on static nodes, built by pure functions (no I/O).

Every value that reaches a command line goes through :func:`shlex.quote`, even when it comes
from a validated model; environment variable names are checked against
``^[A-Za-z_][A-Za-z0-9_]*$``. Values that would break the *syntax* of an argument even when
quoted (a ``:`` in a ``-v`` bind mount, ``..`` in a registry host that becomes a directory
name) are refused with :class:`ValueError`. The exact strings are pinned by
``tests/unit/backends/ssh/test_commands.py``.

Secrets never go into these strings: a command that needs one reads it from stdin
(:func:`registry_login`, :func:`write_registry_ca`), and the caller hands it to
``Remote.run(..., stdin=...)``. Environment values passed with ``-e`` / ``env`` are visible in
``ps`` and ``docker inspect``: they are for non-secret settings such as ``HF_HOME``.

Names are deterministic: one Ray node per host per cluster, in the container
``airfleet-ray-<cluster>`` labelled ``airfleet.io/cluster=<cluster>`` and
``airfleet.io/spec-hash=<hash of everything the container runs with>``, so the backend can
adopt a running container whose hash matches and replace one whose hash differs.

Container choices (each one is a constant or a parameter here, so it is changed in one place):

- ``--network host``: Ray uses many ports (GCS, raylet, object manager, a worker port range,
  dashboard, Serve's HTTP proxy) and announces the node's own IP to its peers; bridge
  networking with port maps cannot express that.
- ``--shm-size=<size>`` rather than ``--ipc host``: Ray's object store lives in ``/dev/shm``
  and Ray caps the store at the shm size, so docker's 64 MiB default would starve it. A
  per-container tmpfs keeps two clusters on one host from sharing (and filling) the host's
  IPC namespace. The size is a cap, not a reservation (tmpfs pages exist only once written);
  :func:`shm_size_for` follows the Ray cluster launcher's rule (30 % of memory plus 10 %,
  at most 200 GB) but from ``MemTotal``, which is stable, so the spec hash is too.
- ``--restart no``: Airflow is the reconciler. A runtime restart policy would bring a drained
  Ray node back into the cluster (``ray start --block`` exits when its raylet ends) and would
  behave differently under docker (daemon) and podman (needs ``podman-restart.service``). A node
  whose container is gone after a reboot is seen by the health check and recreated by the
  update flow (absent -> create).
- ``--init``: ``ray start --block`` is PID 1's child instead of PID 1, so ``docker stop``'s
  SIGTERM reaches it through a real init (tini / catatonit) and orphaned grandchildren (model
  server subprocesses) are reaped instead of piling up as zombies.
- GPUs: ``--gpus all`` (docker, NVIDIA container toolkit) or ``--device nvidia.com/gpu=all``
  (podman, CDI), only when the node has GPUs; Ray gets ``--num-gpus=<n>`` explicitly either way.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from airfleet.resources import NAME_MAX, NAME_PATTERN, ModelCache, SSHConfig

Runtime = Literal["docker", "podman", "none"]
ContainerRuntime = Literal["docker", "podman"]

CLUSTER_LABEL = "airfleet.io/cluster"
SPEC_HASH_LABEL = "airfleet.io/spec-hash"
CONTAINER_PREFIX = "airfleet-ray-"
# container_inspect exits with this when the container does not exist (any other non-zero exit
# is the runtime failing, e.g. its daemon is down: not "absent").
EXIT_ABSENT = 3
DEFAULT_STOP_GRACE_SECONDS = 30
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"
# The dashboard (and its Jobs API, which runs any code it is sent) answers on the head's
# loopback only: Airfleet reaches it through an SSH port forward (tunnel.py), people too.
# Ray 2.60 has no such option for the rest: the GCS (6379; workers join through it), raylet,
# object manager and worker ports stay on the node's address because other nodes need them,
# and the Ray client server (head, 10001) and the dashboard agent's HTTP (every node, 52365)
# bind the node's address whatever we pass. Keep Ray nodes on a network of their own.
DASHBOARD_HOST = "127.0.0.1"
# Where the container runtimes look for a registry's CA (read on every pull, no restart).
CERTS_DIRS: dict[str, str] = {"docker": "/etc/docker/certs.d", "podman": "/etc/containers/certs.d"}
# podman's default auth file is under $XDG_RUNTIME_DIR, which logind removes when the SSH
# session ends; this one persists and is on podman's default search path for later pulls.
PODMAN_AUTHFILE = '"$HOME"/.config/containers/auth.json'

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CLUSTER = re.compile(NAME_PATTERN)
_HOST = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|[0-9A-Fa-f:.]+)$")
_REGISTRY_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$")
_SHM_SIZE = re.compile(r"^[1-9][0-9]*[bkmg]?$")
_NODE_ID = re.compile(r"^[0-9a-f]+$")
# Ray processes on a host, matched in `ps -eo pid=,args=` output: by argv[0] ($2) for the
# binaries and the titles Ray gives its processes (raylet, gcs_server, ray::<worker>,
# ray-dashboard-<module>), by the whole line for Python processes running Ray's modules or
# scripts (dashboard and its multiprocessing forkserver, log monitor, autoscaler monitor, client
# server, `ray start --block`), "ray" not being the end of a longer word. The bracketed first letters keep the command lines of awk and
# sh themselves, which contain these patterns, from matching.
_RAY_PROCESS_AWK = (
    r'$2 ~ /(^|\/)(raylet|gcs_server)$/ || $2 ~ /^ray(::|-dashboard-)/ || '
    r'$0 ~ /(^|[^A-Za-z0-9_])[r]ay[.\/](dashboard|_private|autoscaler|util[.\/]client)[.\/]/ || '
    r'$0 ~ /[\/]ray start( |$)/'
    r' {pid = $1; sub(/^ *[0-9]+ +/, ""); print "process " pid " " substr($0, 1, 200)}'
)


# ---- values ----------------------------------------------------------------------------------

def q(value: str | int) -> str:
    """Quote one value for POSIX sh; NUL cannot be passed in argv at all."""
    text = str(value)
    if "\x00" in text:
        raise ValueError(f"a NUL byte cannot be passed on a command line: {text!r}")
    return shlex.quote(text)


def join(argv: Iterable[str | int]) -> str:
    return " ".join(q(a) for a in argv)


def env_name(name: str) -> str:
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid environment variable name "
                         "(letters, digits and '_', not starting with a digit)")
    return name


def _env_items(env: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """Validated, sorted by name: the same mapping always gives the same command."""
    items = []
    for name, value in (env or {}).items():
        if not isinstance(value, str):
            raise ValueError(f"environment variable {name}: value must be a string")
        items.append((env_name(name), value))
    return tuple(sorted(items))


def container_name(cluster: str) -> str:
    return CONTAINER_PREFIX + _cluster(cluster)


def _cluster(cluster: str) -> str:
    if not isinstance(cluster, str) or not _CLUSTER.fullmatch(cluster) or len(cluster) > NAME_MAX:
        raise ValueError(f"{cluster!r} is not a cluster name (a DNS-1123 label)")
    return cluster


def _runtime(runtime: str, *, container: bool = False) -> str:
    allowed = get_args(ContainerRuntime) if container else get_args(Runtime)
    if runtime not in allowed:
        raise ValueError(f"container runtime {runtime!r}: expected one of {', '.join(allowed)}")
    return runtime


def _host(host: str) -> str:
    if not isinstance(host, str) or not _HOST.fullmatch(host) or len(host) > 253:
        raise ValueError(f"{host!r} is not a hostname or an IP address")
    return host


def _port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{port!r} is not a TCP port")
    return port


def _count(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _word(value: str, what: str) -> str:
    """A value used as one argument in a position where a leading '-' would read as an option."""
    if not isinstance(value, str) or not value or value.startswith("-"):
        raise ValueError(f"{what} must be a non-empty string not starting with '-': {value!r}")
    return value


def host_port(host: str, port: int) -> str:
    """``host:port``; IPv6 addresses in brackets."""
    host, port = _host(host), _port(port)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def registry_host(url: str) -> str:
    """``registry.example:5000`` from an ImageRegistry url (scheme and path dropped).

    The result names a directory (``certs.d/<host>``), so it must be a plain host[:port].
    """
    host = re.sub(r"^https?://", "", url).split("/", 1)[0]
    if not _REGISTRY_HOST.fullmatch(host):
        raise ValueError(f"{url!r}: {host!r} is not a registry host[:port]")
    return host


# ---- model caches ----------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Mount:
    """A bind mount: a directory on the node seen at ``mount_path`` in the container."""

    host_path: str
    mount_path: str

    def __post_init__(self) -> None:
        for what, path in (("host path", self.host_path), ("mount path", self.mount_path)):
            # docker's -v reads "src:dst[:opts]": a ':' cannot be quoted away.
            if not isinstance(path, str) or not path.startswith("/") or ":" in path \
                    or "\n" in path or "\x00" in path:
                raise ValueError(f"{what} {path!r}: must be absolute, without ':' or newlines")


def cache_mount(cache: ModelCache) -> Mount:
    if cache.host_path is None:
        raise ValueError(f"model cache {cache.name}: ssh clusters take host_path caches only")
    return Mount(cache.host_path.path, cache.mount_path or f"/models/{cache.name}")


def cache_mounts(caches: Iterable[ModelCache]) -> tuple[Mount, ...]:
    return tuple(cache_mount(c) for c in caches)


def model_cache_env(caches: Sequence[ModelCache], runtime: Runtime) -> dict[str, str]:
    """``HF_HOME`` for the first cache: its mount path in a container, its host path otherwise."""
    if not caches:
        return {}
    mount = cache_mount(caches[0])
    return {"HF_HOME": mount.host_path if runtime == "none" else mount.mount_path}


def shm_size_for(mem_total_bytes: int) -> str:
    """``--shm-size`` for a node with this much memory (``MemTotal`` of /proc/meminfo).

    Ray's cluster launcher rule: 30 % (Ray's default object store share) plus 10 %, at most
    200 GB (Ray's object store cap); in whole MiB, at least 64 MiB (docker's default).
    """
    size = min(mem_total_bytes * 0.3 * 1.1, 200 * 10**9)
    return f"{max(64, int(size) // 2**20)}m"


# ---- ray start -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RayStart:
    """The ``ray start`` arguments of one node. ``head_ip`` None: this node is the head."""

    node_ip: str
    head_ip: str | None = None
    gcs_port: int = 6379
    dashboard_port: int = 8265
    num_gpus: int = 0
    temp_dir: str | None = None

    def __post_init__(self) -> None:
        _host(self.node_ip)
        if self.head_ip is not None:
            _host(self.head_ip)
        _port(self.gcs_port)
        _port(self.dashboard_port)
        _count(self.num_gpus, "num_gpus")
        if self.temp_dir is not None and not str(self.temp_dir).startswith("/"):
            raise ValueError(f"temp_dir {self.temp_dir!r} must be an absolute path")

    @property
    def is_head(self) -> bool:
        return self.head_ip is None

    def args(self, *, block: bool) -> list[str]:
        """What follows ``ray start``."""
        if self.is_head:
            argv = ["--head", f"--node-ip-address={self.node_ip}", f"--port={self.gcs_port}",
                    f"--dashboard-host={DASHBOARD_HOST}",
                    f"--dashboard-port={self.dashboard_port}", f"--num-gpus={self.num_gpus}",
                    "--disable-usage-stats"]
        else:
            argv = [f"--address={host_port(self.head_ip, self.gcs_port)}",
                    f"--node-ip-address={self.node_ip}", f"--num-gpus={self.num_gpus}"]
        if self.temp_dir:
            argv.append(f"--temp-dir={self.temp_dir}")
        if block:
            argv.append("--block")
        return argv


def node_start(ssh: SSHConfig, node: str, num_gpus: int = 0) -> RayStart:
    """The ``ray start`` arguments of ``node`` (the head or a worker) of an ssh cluster."""
    head = node == ssh.head
    return RayStart(node, None if head else ssh.head, ssh.ray.gcs_port, ssh.ray.dashboard_port,
                    num_gpus)


def _host_ray_start(start: RayStart, executable: str, env: Mapping[str, str] | None) -> str:
    # `env` treats any argument with '=' before the command as an assignment.
    if "=" in _word(executable, "ray executable"):
        raise ValueError(f"ray executable {executable!r} must not contain '='")
    prefix = ["env", *(f"{k}={v}" for k, v in _env_items(env))] if env else []
    return join([*prefix, executable, "start", *start.args(block=False)])


def ray_start_head(node_ip: str, *, gcs_port: int = 6379, dashboard_port: int = 8265,
                   num_gpus: int = 0, executable: str = "ray", temp_dir: str | None = None,
                   env: Mapping[str, str] | None = None) -> str:
    """Start a Ray head as host processes (``container_runtime: none``)."""
    start = RayStart(node_ip, None, gcs_port, dashboard_port, num_gpus, temp_dir)
    return _host_ray_start(start, executable, env)


def ray_start_worker(node_ip: str, head_ip: str, *, gcs_port: int = 6379, num_gpus: int = 0,
                     executable: str = "ray", temp_dir: str | None = None,
                     env: Mapping[str, str] | None = None) -> str:
    """Start a Ray worker as host processes, joining the head's GCS."""
    start = RayStart(node_ip, head_ip, gcs_port, num_gpus=num_gpus, temp_dir=temp_dir)
    return _host_ray_start(start, executable, env)


# ---- containers ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RayContainer:
    """One node's Ray container: ``<image> ray start ... --block`` as the main process, so the
    container lives exactly as long as Ray does."""

    runtime: ContainerRuntime
    cluster: str
    image: str
    start: RayStart
    shm_size: str
    mounts: tuple[Mount, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _runtime(self.runtime, container=True)
        _cluster(self.cluster)
        _word(self.image, "image")
        if not _SHM_SIZE.fullmatch(str(self.shm_size)):
            raise ValueError(f"shm_size {self.shm_size!r}: expected <number>[b|k|m|g]")
        for m in self.mounts:
            if not isinstance(m, Mount):
                raise ValueError(f"mounts: {m!r} is not a Mount")
        _env_items(self.env)

    @property
    def name(self) -> str:
        return container_name(self.cluster)

    def _argv(self) -> list[str]:
        """The run argv without the spec-hash label (the hash is computed over it)."""
        argv = [self.runtime, "run", "-d", "--name", self.name,
                "--label", f"{CLUSTER_LABEL}={self.cluster}",
                "--init", "--network", "host", "--restart", "no", f"--shm-size={self.shm_size}"]
        if self.start.num_gpus > 0:
            argv += ["--gpus", "all"] if self.runtime == "docker" \
                else ["--device", "nvidia.com/gpu=all"]
        for m in sorted(set(self.mounts)):
            argv += ["-v", f"{m.host_path}:{m.mount_path}"]
        for k, v in _env_items(self.env):
            argv += ["-e", f"{k}={v}"]
        return [*argv, self.image, "ray", "start", *self.start.args(block=True)]

    @property
    def spec_hash(self) -> str:
        return container_spec_hash(self)


def container_spec_hash(container: RayContainer) -> str:
    """12 hex digits over everything the container is run with: image, mounts, env, GPU flags,
    shm size and the ``ray start`` arguments. Same hash: adopt the running container; a
    different one: replace it. Env order and mount order do not matter."""
    blob = json.dumps(container._argv(), separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def container_run(container: RayContainer) -> str:
    argv = container._argv()
    at = argv.index("--init")
    argv[at:at] = ["--label", f"{SPEC_HASH_LABEL}={container.spec_hash}"]
    return join(argv)


def ray_container(cluster: str, ssh: SSHConfig, caches: Sequence[ModelCache], start: RayStart,
                  *, shm_size: str) -> RayContainer:
    """The Ray container of one node of an ssh cluster: image from ``ssh.ray``, the caches
    mounted, ``HF_HOME`` on the first one."""
    runtime = ssh.container_runtime
    if runtime == "none":
        raise ValueError("container_runtime none runs Ray as host processes: use ray_start_head "
                         "/ ray_start_worker")
    return RayContainer(runtime, cluster, ssh.ray.image, start, shm_size, cache_mounts(caches),
                        model_cache_env(caches, runtime))


def image_pull(runtime: ContainerRuntime, image: str) -> str:
    """Pull before run, under its own (long) timeout: a run that has to pull a 10 GB image
    would otherwise spend the start timeout downloading."""
    return join([_runtime(runtime, container=True), "pull", _word(image, "image")])


def _if_container_exists(runtime: str, cluster: str, otherwise_exit: int) -> str:
    """sh prefix: go on when the cluster's container exists, else exit ``otherwise_exit``.

    Listing names and matching the exact name separates "absent" from "the runtime failed"
    (``inspect``/``rm`` exit 1 for both) on every docker and podman version; if listing fails,
    the command exits 1 with the runtime's own message on stderr.
    """
    rt = _runtime(runtime, container=True)
    return (f"names=$({rt} container ls -a --format {q('{{.Names}}')}) || exit 1; "
            f"printf '%s\\n' \"$names\" | grep -qxF -- {q(container_name(cluster))} "
            f"|| exit {otherwise_exit}; ")


def container_inspect(runtime: ContainerRuntime, cluster: str) -> str:
    """Print ``status=<state> cluster=<label> spec_hash=<label>`` of the cluster's container;
    exit :data:`EXIT_ABSENT` when there is none. Parse with :func:`parse_container_inspect`."""
    fmt = (f'status={{{{.State.Status}}}} cluster={{{{index .Config.Labels "{CLUSTER_LABEL}"}}}}'
           f' spec_hash={{{{index .Config.Labels "{SPEC_HASH_LABEL}"}}}}')
    return (_if_container_exists(runtime, cluster, EXIT_ABSENT)
            + join([runtime, "container", "inspect", "--format", fmt, container_name(cluster)]))


@dataclass(frozen=True)
class ContainerState:
    status: str
    cluster: str
    spec_hash: str

    @property
    def running(self) -> bool:
        return self.status == "running"


def parse_container_inspect(stdout: str) -> ContainerState:
    fields = {"status": "", "cluster": "", "spec_hash": ""}
    # Go templates print "<no value>" for a missing label on some runtime versions.
    for word in stdout.replace("<no value>", "").split():
        key, _, value = word.partition("=")
        if key in fields:
            fields[key] = value
    return ContainerState(**fields)


def container_remove(runtime: ContainerRuntime, cluster: str) -> str:
    """Force-remove the cluster's container (SIGKILL); "already gone" exits 0, a failing
    runtime does not."""
    return (_if_container_exists(runtime, cluster, 0)
            + join([runtime, "rm", "-f", container_name(cluster)]))


def ray_stop(runtime: Runtime, cluster: str, *, executable: str = "ray", force: bool = False,
             grace_seconds: int = DEFAULT_STOP_GRACE_SECONDS) -> str:
    """Stop the node's Ray. Host processes: ``ray stop`` (every Ray process on the host:
    one Ray per host when runtime is none). Containers: SIGTERM with a grace period, then
    remove; ``force`` kills at once. Nothing to stop exits 0."""
    _count(grace_seconds, "grace_seconds")
    _cluster(cluster)
    if _runtime(runtime) == "none":
        argv = [_word(executable, "ray executable"), "stop"]
        return join([*argv, "--force"] if force else [*argv, f"--grace-period={grace_seconds}"])
    name = container_name(cluster)
    if force:
        return container_remove(runtime, cluster)
    return (_if_container_exists(runtime, cluster, 0)
            + join([runtime, "stop", "-t", grace_seconds, name]) + " && "
            + join([runtime, "rm", "-f", name]))


def ray_drain_node(runtime: Runtime, cluster: str, *, head_ip: str, gcs_port: int, node_id: str,
                   message: str, deadline_seconds: int, executable: str = "ray") -> str:
    """Ask the GCS to drain a node (run on the head; inside its container when containerised):
    running work finishes, new work goes elsewhere, then the node goes DEAD."""
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise ValueError(f"{node_id!r} is not a Ray node id (hex)")
    argv = ["drain-node", "--address", host_port(head_ip, gcs_port), "--node-id", node_id,
            "--reason", DRAIN_REASON, "--reason-message", str(message),
            "--deadline-remaining-seconds", _count(deadline_seconds, "deadline_seconds")]
    if _runtime(runtime) == "none":
        return join([_word(executable, "ray executable"), *argv])
    return join([runtime, "exec", container_name(cluster), "ray", *argv])


# ---- registry --------------------------------------------------------------------------------

def registry_login(runtime: ContainerRuntime, registry: str, username: str) -> str:
    """Log the node's runtime in to a registry. The password is read from stdin: pass it as
    ``Remote.run(..., stdin=password.encode())``; this builder takes no password at all."""
    host = registry_host(registry)
    argv = [_runtime(runtime, container=True), "login", "--username", str(username),
            "--password-stdin"]
    cmd = join(argv)
    if runtime == "podman":
        cmd += f" --authfile {PODMAN_AUTHFILE}"
    return f"{cmd} {q(host)}"


def write_registry_ca(runtime: ContainerRuntime, registry: str) -> str:
    """Install a registry's CA certificate (PEM on stdin) where the runtime trusts it for that
    registry: ``<certs.d>/<host>/ca.crt``, mode 0644, written to a temp file and renamed, so a
    reader never sees half a file and a wrong input (no certificate) leaves the old one."""
    directory = f"{CERTS_DIRS[_runtime(runtime, container=True)]}/{registry_host(registry)}"
    d = q(directory)
    return (f"mkdir -p -- {d} && tmp=$(mktemp {q(directory + '/.ca.crt.XXXXXX')}) && "
            f"{{ cat >\"$tmp\" && grep -q 'BEGIN CERTIFICATE' \"$tmp\" && chmod 0644 \"$tmp\" "
            f"&& mv -f \"$tmp\" {q(directory + '/ca.crt')} || {{ rm -f \"$tmp\"; exit 1; }}; }}")


# ---- host ------------------------------------------------------------------------------------

def ensure_directory(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"{path!r} must be an absolute path")
    return join(["mkdir", "-p", "--", path])


def leftovers(runtime: Runtime, cluster: str) -> str:
    """Print one line per leftover of the cluster on this node, exit 0 either way:
    ``container <name>`` for containers labelled with the cluster (docker/podman), or
    ``process <pid> <command>`` for Ray processes (raylet, gcs_server, dashboard, ray::
    workers, log monitor) when Ray runs on the host."""
    if _runtime(runtime) == "none":
        # Captured first: a failing ps must not read as "no leftovers" (sh has no pipefail).
        return ("out=$(ps -eo pid=,args=) || exit 1; "
                f"printf '%s\\n' \"$out\" | awk {q(_RAY_PROCESS_AWK)}")
    return join([runtime, "container", "ls", "-a", "--filter",
                 f"label={CLUSTER_LABEL}={_cluster(cluster)}", "--format", "container {{.Names}}"])
