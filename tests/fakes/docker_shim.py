"""A stand-in ``docker`` executable for NodeFarm nodes (tests/fakes/nodes.py).

Why a shim: no Docker (or podman) engine can run on the test machines, so the container path
of the static-nodes backend (``container_runtime: docker``) cannot run real containers. The
real CLI's semantics are covered by the exact command strings pinned in
tests/unit/backends/ssh/test_commands.py; what this shim adds, end to end over real SSH, is
that the commands the backend sends are well-formed for the CLI's shape (it refuses any
subcommand, option or argument it does not know, as the CLI would) and that the container's
main command -- ``ray start ... --block`` with the container's ``-e`` environment -- really
starts a Ray node that joins the cluster.

Install it with :func:`install` (``install(node.bin_dir)``): NodeFarm puts ``bin_dir`` first on
the PATH of the node's SSH sessions. Only the standard library is used, so the shim runs under
any Python 3.11+.

Supported (exactly what airfleet/backends/ssh/commands.py and the accelerator probe emit)::

    docker container ls -a [--filter label=K=V] --format FMT   FMT: text with {{.Names}}
    docker container inspect --format FMT NAME       FMT: text with {{.State.Status}},
                                                     {{.Name}}, {{index .Config.Labels "K"}}
    docker pull IMAGE
    docker run -d --name N [--label K=V]... [--init] [--network host] [--restart no]
               [--shm-size=S] [--gpus all | --device D] [-v HOST:CTR]... [-e K=V]...
               IMAGE ray start ... --block
    docker stop -t N NAME
    docker rm -f NAME
    docker exec NAME CMD...
    docker login --username U --password-stdin [--authfile F] HOST
    docker info --format '{{json .Runtimes}}'

Anything else exits 1 (bad usage 125, as the CLI) with a message on stderr.

State lives in ``/tmp/fake-docker`` on the node (each node has its own /tmp), in files a test
reads over ``node.run`` or from the host under ``node.dir / "tmp" / "fake-docker"``:

- ``events.jsonl``: one JSON object per login, pull, run, stop, rm and exec, in order.
- ``containers/<name>.json``: name, image, labels, mounts, env, run flags, the ``ray start``
  argv and ``status`` (``running`` / ``exited``).
- ``auth.json``: ``{registry: {"username", "password_sha256"}}``. The password itself is never
  written anywhere: only its sha256.

Approximations (what a real engine does differently):

- ``run`` runs the requested ``ray start`` *without* ``--block`` directly on the node, with the
  ``-e`` variables added to the environment, and waits for it (a real ``run -d`` returns at
  once); a failing ``ray start`` fails ``run`` with Ray's output, where a real container would
  just exit. ``--block`` is required: without it a real container would exit as soon as
  ``ray start`` returns, taking the Ray node with it.
- Mounts: the node's root filesystem is the test machine's (only /tmp, /dev/shm and a few /etc
  entries are private), so the shim must not create ``/models/...`` there. The container's
  filesystem is approximated by ``/tmp/fake-docker/rootfs/<name>``: for each ``-v HOST:CTR``
  the shim makes a symlink ``rootfs/<name>/CTR -> HOST`` unless something exists there. So
  "the cache is at CTR in the container" is observed as ``rootfs/<name>/CTR`` resolving to HOST.
  A missing HOST directory fails ``run`` (podman refuses it too; docker would create it), so
  a test sees that the backend created it.
- ``stop -t N`` runs ``ray stop --grace-period=N`` and marks the container exited; ``rm -f``
  runs ``ray stop --force`` if it still runs and drops its state. One container per node (one
  Ray node per host), so ``ray stop`` stopping every Ray process of the node is exact.
- ``inspect`` reports ``exited`` for a container marked running whose raylet is gone, like a
  container whose main process ended.
- ``login`` sleeps about a second after reading the password, so a test sampling
  ``/proc/*/cmdline`` meanwhile sees the login running (and can check its argv).
- ``pull`` records the image and whether, at that moment, the registry's ``ca.crt`` was in
  ``/etc/docker/certs.d/<host>/`` and a login for that host was stored.

Invoked as ``podman`` (``install(bin_dir, name="podman")``) it looks for CA files under
``/etc/containers/certs.d`` instead and accepts podman's ``--authfile``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("FAKE_DOCKER_STATE", "/tmp/fake-docker"))
CERTS_DIRS = {"docker": "/etc/docker/certs.d", "podman": "/etc/containers/certs.d"}
LOGIN_SLEEP = 1.0
RUNTIMES_JSON = '{"runc":{"path":"runc"}}'


class Usage(Exception):
    """A command line the real CLI would refuse (exit 125) or a missing container (exit 1)."""

    def __init__(self, message: str, code: int = 125):
        super().__init__(message)
        self.code = code


# ---- state -----------------------------------------------------------------------------------

@contextlib.contextmanager
def locked():
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def event(op: str, **fields) -> None:
    with open(STATE / "events.jsonl", "a") as f:
        f.write(json.dumps({"op": op, "time": time.time(), **fields}) + "\n")


def container_path(name: str) -> Path:
    return STATE / "containers" / f"{name}.json"


def load(name: str) -> dict | None:
    try:
        return json.loads(container_path(name).read_text())
    except FileNotFoundError:
        return None


def save(record: dict) -> None:
    path = container_path(record["name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


def containers() -> list[dict]:
    folder = STATE / "containers"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] \
        if folder.is_dir() else []


def raylet_running() -> bool:
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == "raylet":
                return True
    return False


def status(record: dict) -> str:
    return "running" if record["status"] == "running" and raylet_running() else "exited"


def registry_of(image: str) -> str | None:
    """The registry host of an image reference (docker's rule: a first path component with
    a '.' or ':' or equal to localhost), None for Docker Hub."""
    first, sep, _ = image.partition("/")
    return first if sep and ("." in first or ":" in first or first == "localhost") else None


def ray(argv: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> int:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.run(["ray", *argv], env={**os.environ, **(env or {})},
                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT).returncode
    finally:
        if log:
            out.close()


# ---- arguments -------------------------------------------------------------------------------

def take(args: list[str], option: str) -> str:
    """The value of a two-word option at the head of args (consumed)."""
    if len(args) < 2:
        raise Usage(f"flag needs an argument: {option}")
    args.pop(0)
    return args.pop(0)


def render(fmt: str, values: dict[str, str], labels: dict[str, str] | None = None) -> str:
    def one(match: re.Match) -> str:
        expr = match.group(1).strip()
        label = re.fullmatch(r'index \.Config\.Labels "([^"]*)"', expr)
        if label and labels is not None:
            return labels.get(label.group(1), "<no value>")
        if expr in values:
            return values[expr]
        raise Usage(f"template: unsupported field {{{{{expr}}}}} in {fmt!r}")
    return re.sub(r"\{\{(.*?)\}\}", one, fmt)


# ---- subcommands -----------------------------------------------------------------------------

def container_ls(args: list[str]) -> int:
    all_, fmt, wanted = False, None, None
    while args:
        if args[0] == "-a":
            all_ = True
            args.pop(0)
        elif args[0] == "--format":
            fmt = take(args, "--format")
        elif args[0] == "--filter":
            key, _, value = take(args, "--filter").partition("=")
            if key != "label" or "=" not in value:
                raise Usage(f"unsupported filter {key}={value} (shim: label=K=V only)")
            wanted = tuple(value.split("=", 1))
        else:
            raise Usage(f"container ls: unknown argument {args[0]!r}")
    if not all_ or fmt is None:
        raise Usage("container ls: the shim expects -a and --format (what the backend sends)")
    for c in containers():
        if wanted and c["labels"].get(wanted[0]) != wanted[1]:
            continue
        print(render(fmt, {".Names": c["name"]}))
    return 0


def container_inspect(args: list[str]) -> int:
    if len(args) != 3 or args[0] != "--format":
        raise Usage(f"container inspect: expected --format FMT NAME, got {args}")
    fmt, name = args[1], args[2]
    record = load(name)
    if record is None:
        raise Usage(f"Error: No such container: {name}", 1)
    print(render(fmt, {".State.Status": status(record), ".Name": "/" + name}, record["labels"]))
    return 0


def pull(args: list[str]) -> int:
    if len(args) != 1 or args[0].startswith("-"):
        raise Usage(f"pull: expected IMAGE, got {args}")
    image, host = args[0], registry_of(args[0])
    auth = read_auth()
    ca = Path(CERTS_DIRS[RUNTIME]) / host / "ca.crt" if host else None
    with locked():
        event("pull", image=image, registry=host, logged_in=host in auth,
              ca_crt_present=bool(ca and ca.is_file()))
        images = STATE / "images"
        with open(images, "a") as f:
            f.write(image + "\n")
    print(f"{image}: pulled (fake)")
    return 0


def run(args: list[str]) -> int:
    record = {"name": None, "labels": {}, "mounts": [], "env": {}, "flags": [], "detach": False}
    while args and args[0].startswith("-"):
        opt = args[0]
        if opt == "-d":
            record["detach"] = True
            args.pop(0)
        elif opt == "--name":
            record["name"] = take(args, opt)
        elif opt == "--label":
            key, sep, value = take(args, opt).partition("=")
            record["labels"][key] = value
        elif opt in ("--init",):
            record["flags"].append(args.pop(0))
        elif opt in ("--network", "--restart", "--gpus", "--device"):
            record["flags"].append(f"{opt}={take(args, opt)}")
        elif opt.startswith("--shm-size="):
            if not re.fullmatch(r"--shm-size=[1-9][0-9]*[bkmg]?", opt):
                raise Usage(f"invalid shm size: {opt}")
            record["flags"].append(args.pop(0))
        elif opt == "-v":
            host, sep, ctr = take(args, opt).partition(":")
            if not sep or not host.startswith("/") or not ctr.startswith("/") or ":" in ctr:
                raise Usage(f"invalid volume spec -v {host}{sep}{ctr}")
            record["mounts"].append({"host": host, "container": ctr})
        elif opt == "-e":
            key, sep, value = take(args, opt).partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise Usage(f"invalid environment variable -e {key}{sep}{value}")
            record["env"][key] = value
        else:
            raise Usage(f"run: unknown flag {opt!r}")
    if not args:
        raise Usage("run: requires an IMAGE")
    image, command = args[0], args[1:]
    if not record["detach"] or not record["name"]:
        raise Usage("run: the shim expects -d and --name (the backend runs a named daemon)")
    if command[:2] != ["ray", "start"] or "--block" not in command:
        raise Usage(f"run: the shim runs `ray start ... --block` only, got {command}")
    name = record["name"]
    with locked():
        if load(name) is not None:
            raise Usage(f'Conflict. The container name "/{name}" is already in use')
        rootfs = STATE / "rootfs" / name
        for m in record["mounts"]:
            if not Path(m["host"]).is_dir():  # stricter than docker, which would create it
                raise Usage(f"-v {m['host']}:{m['container']}: the host directory does not "
                            "exist (the backend creates it first; podman refuses too)")
            link = rootfs / m["container"].lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists() and not link.is_symlink():
                link.symlink_to(m["host"])
        ray_argv = [a for a in command[1:] if a != "--block"]
        record.update(image=image, command=command, ray_start=ray_argv, status="running",
                      rootfs=str(rootfs), started=time.time())
        log = STATE / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        rc = ray(ray_argv, record["env"], log)
        if rc != 0:
            sys.stderr.write(log.read_text()[-4000:])
            record["status"] = "exited"
        save(record)
        event("run", name=name, image=image, labels=record["labels"], mounts=record["mounts"],
              env=record["env"], flags=record["flags"], command=command, exit_code=rc)
    if rc != 0:
        raise Usage(f"ray start in {name} exited with {rc}", rc)
    print(hashlib.sha256(f"{name}{record['started']}".encode()).hexdigest())
    return 0


def stop(args: list[str]) -> int:
    if len(args) != 3 or args[0] != "-t" or not args[1].isdigit():
        raise Usage(f"stop: expected -t SECONDS NAME, got {args}")
    name = args[2]
    with locked():
        record = load(name)
        if record is None:
            raise Usage(f"Error response from daemon: No such container: {name}", 1)
        rc = ray(["stop", f"--grace-period={args[1]}"])
        record["status"] = "exited"
        save(record)
        event("stop", name=name, grace=int(args[1]), exit_code=rc)
    print(name)
    return 0


def rm(args: list[str]) -> int:
    if len(args) != 2 or args[0] != "-f":
        raise Usage(f"rm: expected -f NAME, got {args}")
    name = args[1]
    with locked():
        record = load(name)
        if record is None:
            raise Usage(f"Error response from daemon: No such container: {name}", 1)
        rc = ray(["stop", "--force"]) if record["status"] == "running" else 0
        container_path(name).unlink()
        shutil.rmtree(record["rootfs"], ignore_errors=True)  # unlinks symlinks, never follows
        event("rm", name=name, exit_code=rc)
    print(name)
    return 0


def exec_(args: list[str]) -> int:
    if len(args) < 2 or args[0].startswith("-"):
        raise Usage(f"exec: expected NAME COMMAND..., got {args}")
    name, command = args[0], args[1:]
    record = load(name)
    if record is None:
        raise Usage(f"Error response from daemon: No such container: {name}", 1)
    if status(record) != "running":
        raise Usage(f"Error response from daemon: container {name} is not running", 1)
    with locked():
        event("exec", name=name, command=command)
    return subprocess.run(command, env={**os.environ, **record["env"]}).returncode


def read_auth() -> dict:
    try:
        return json.loads((STATE / "auth.json").read_text())
    except FileNotFoundError:
        return {}


def login(args: list[str]) -> int:
    username, from_stdin, authfile, host = None, False, None, None
    while args:
        if args[0] == "--username":
            username = take(args, "--username")
        elif args[0] == "--password-stdin":
            from_stdin = True
            args.pop(0)
        elif args[0] == "--authfile" and RUNTIME == "podman":
            authfile = take(args, "--authfile")
        elif not args[0].startswith("-") and host is None:
            host = args.pop(0)
        else:
            raise Usage(f"login: unknown argument {args[0]!r} (the shim takes --password-stdin "
                        "only: a password in argv is what it must never see)")
    if not username or not from_stdin or not host:
        raise Usage("login: expected --username U --password-stdin HOST")
    password = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    if not password:
        raise Usage("Error: Cannot perform an interactive login from a non TTY device", 1)
    time.sleep(LOGIN_SLEEP)  # a test samples /proc/*/cmdline meanwhile
    digest = hashlib.sha256(password.encode()).hexdigest()
    with locked():
        auth = read_auth()
        auth[host] = {"username": username, "password_sha256": digest}
        (STATE / "auth.json").write_text(json.dumps(auth, indent=1))
        event("login", registry=host, username=username, password_sha256=digest,
              authfile=authfile)
    print("Login Succeeded")
    return 0


def info(args: list[str]) -> int:
    if args != ["--format", "{{json .Runtimes}}"]:
        raise Usage(f"info: the shim answers --format '{{{{json .Runtimes}}}}' only, got {args}")
    print(RUNTIMES_JSON)
    return 0


COMMANDS = {("container", "ls"): container_ls, ("container", "inspect"): container_inspect,
            ("pull",): pull, ("run",): run, ("stop",): stop, ("rm",): rm, ("exec",): exec_,
            ("login",): login, ("info",): info}
RUNTIME = "docker"


def main(argv: list[str]) -> int:
    global RUNTIME
    RUNTIME = os.environ.get("FAKE_DOCKER_AS") or Path(argv[0]).name
    if RUNTIME not in CERTS_DIRS:
        RUNTIME = "docker"
    args = argv[1:]
    for words, handler in COMMANDS.items():
        if tuple(args[:len(words)]) == words:
            try:
                return handler(args[len(words):])
            except Usage as exc:
                print(f"{RUNTIME} (fake): {exc}", file=sys.stderr)
                return exc.code
    print(f"{RUNTIME} (fake): unsupported command: {' '.join(args)!r} (see "
          f"tests/fakes/docker_shim.py for what the shim implements)", file=sys.stderr)
    return 1


def install(bin_dir: Path | str, name: str = "docker") -> Path:
    """Put the shim into ``bin_dir`` as ``name`` (``docker`` or ``podman``): a small sh wrapper
    running this file with this interpreter (the nodes share the machine's filesystem)."""
    path = Path(bin_dir) / name
    path.write_text(f"#!/bin/sh\nFAKE_DOCKER_AS={name} exec {sys.executable} "
                    f"{Path(__file__).resolve()} \"$@\"\n")
    path.chmod(0o755)
    return path


if __name__ == "__main__":
    sys.exit(main(sys.argv))
