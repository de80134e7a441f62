"""Where a subprocess-mode policy runs: a bubblewrap (``bwrap``) sandbox, where one can be made.

The sandbox, when :func:`current` says ``isolated``:

- a private mount namespace: the whole file system read-only, with an empty tmpfs over every
  path of :func:`hidden_paths` (the vault's keys directory, the SQLite store's directory,
  ``AIRFLOW_HOME``, the file ``AIRFLOW_CONFIG`` names, the worker's home directory); fresh empty
  ``/tmp`` (and in it the working directory, ``/tmp/policy``, a tmpfs of its own), ``/var/tmp``,
  ``/run``, ``/dev`` and ``/proc``. The Python
  installation (and this folder, for ``child.py``) is bound back read-only when it lives under
  a hidden path, and nothing else is;
- its own PID, network (no interface up), IPC, UTS and cgroup namespaces; it dies with its
  parent, and everything it started dies with it;
- no way to gain privileges (``PR_SET_NO_NEW_PRIVS``, no capabilities). A root worker runs the
  policy as ``nobody`` (65534): root-only files outside the hidden paths stay closed too. A
  worker that is not root runs it in a user namespace as its own uid, which is how the kernel
  lets an unprivileged process build one: files outside the hidden paths that this uid may read
  stay readable (the image's own files, world-readable ones).

It is not a seccomp filter, a CPU limit (the binding's timeout stops the policy) or a defence
against kernel bugs. Where it cannot be made (no ``bwrap``; no namespaces, as under Docker's
default seccomp profile; not Linux) subprocess mode is a separate process with a minimal
environment, a memory limit and a timeout, and nothing more: :func:`current` says so, every
decision carries that status, and a warning is logged once.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from airfleet import config

log = logging.getLogger(__name__)

NOBODY = 65534
# Replaced by empty tmpfs, with their modes: scratch space, never the host's.
FRESH = {Path("/tmp"): "01777", Path("/var/tmp"): "01777", Path("/run"): "0755"}
# The policy's working directory: a tmpfs of its own, empty even where the interpreter or this
# package lives under /tmp and is bound back there (a checkout in /tmp, as in CI).
WORKDIR = "/tmp/policy"
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class Sandbox:
    """How subprocess mode runs here: ``argv`` goes before the interpreter (empty when not
    isolated); ``status`` is what each decision reports."""

    argv: tuple[str, ...]
    status: str

    @property
    def isolated(self) -> bool:
        return bool(self.argv)


def current() -> Sandbox:
    """The sandbox for the current configuration; each distinct one is probed once."""
    if not sys.platform.startswith("linux"):
        return _unisolated(f"not isolated: {sys.platform} has no bwrap sandbox")
    bwrap = _tool("bwrap")
    if not bwrap:
        return _unisolated("not isolated: bwrap is not installed (Debian package bubblewrap)")
    try:
        hidden = hidden_paths()
    except ValueError as exc:
        return _unisolated(f"not isolated: {exc}")
    drop = os.geteuid() == 0
    setpriv = _tool("setpriv") if drop else None
    if drop and not setpriv:
        return _unisolated("not isolated: setpriv is not installed (Debian package util-linux)")
    argv = bwrap_argv(bwrap, hidden, exposed_paths(), setpriv)
    why_not = _probe(tuple(argv))
    if why_not:
        return _unisolated(f"not isolated: bwrap cannot run a policy here ({why_not})")
    who = f"uid {NOBODY}" if drop else f"uid {os.geteuid()} in a user namespace"
    return Sandbox(tuple(argv), f"isolated: bwrap sandbox as {who} (no network; keys, store "
                                "and Airflow home hidden)")


def hidden_paths() -> list[Path]:
    """What a policy must not read, resolved here in the parent: the vault's keys, the SQLite
    store's directory, Airflow's home and config, the worker's home. Paths that do not exist
    hold nothing to hide."""
    secrets = [config.keys_dir(), config.airflow_home()]
    store = _sqlite_file(config.database_url())
    if store:
        secrets.append(store.parent)
    if os.environ.get("AIRFLOW_CONFIG"):
        secrets.append(Path(os.environ["AIRFLOW_CONFIG"]))
    paths = [Path(p).resolve() for p in secrets]
    if Path("/") in paths:
        raise ValueError("a secret path (keys dir, store directory, AIRFLOW_HOME) is /")
    home = Path.home().resolve()  # "/" for users without a home: nothing to hide then
    if home != Path("/"):
        paths.append(home)
    return sorted({p for p in paths if p.exists()})


@functools.cache  # the interpreter and this file do not move while the process runs
def exposed_paths() -> tuple[Path, ...]:
    """What the child needs, bound back if it lives under a hidden path: the interpreter's
    installation (a venv and its base) and this folder (``child.py``)."""
    needed = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              Path(sys.executable).parent, Path(__file__).parent}
    return tuple(_outermost(Path(p).resolve() for p in needed))


def bwrap_argv(bwrap: str, hidden: Sequence[Path], exposed: Sequence[Path],
               setpriv: str | None) -> list[str]:
    """The command line that goes before ``python -I child.py ...``. With ``setpriv`` (a root
    worker) the policy drops to ``nobody`` once the mounts are made."""
    argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for path, mode in FRESH.items():
        argv += ["--perms", mode, "--tmpfs", str(path)]
    covered = _outermost([*FRESH, *hidden])
    for path in covered:
        if path not in FRESH:
            argv += _hide(path)
    bound = [p for p in exposed if _under(p, covered)]
    for path in bound:
        argv += _bind_back(path, covered)
    for path in hidden:  # a secret inside what was bound back is hidden again
        if _under(path, bound):
            argv += _hide(path)
    argv += ["--perms", FRESH[Path("/tmp")], "--tmpfs", WORKDIR]
    argv += ["--chdir", WORKDIR, "--unshare-pid", "--unshare-net", "--unshare-ipc",
             "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--"]
    if setpriv:
        argv += [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    return argv


def _hide(path: Path) -> list[str]:
    if path.is_file():
        return ["--ro-bind", "/dev/null", str(path)]
    return ["--perms", "0755", "--tmpfs", str(path)]


def _bind_back(path: Path, covered: list[Path]) -> list[str]:
    """Bind ``path`` back under the tmpfs that covers it, making its parents traversable
    (bwrap would create them 0700, closed to ``nobody``)."""
    top = next(c for c in covered if _under(path, [c]))
    argv = []
    for parent in reversed(path.parents):
        if parent != top and _under(parent, [top]):
            argv += ["--perms", "0755", "--dir", str(parent)]
    return [*argv, "--ro-bind", str(path), str(path)]


def _under(path: Path, roots) -> bool:
    """Whether ``path`` is one of ``roots`` or inside one (compared as text: fast)."""
    text = str(path)
    return any(text == str(root) or text.startswith(str(root).rstrip("/") + "/")
               for root in roots)


def _outermost(paths) -> list[Path]:
    """The paths, without those inside another one (its mount covers them)."""
    unique = sorted(set(paths), key=lambda p: len(p.parts))
    kept: list[Path] = []
    for path in unique:
        if not _under(path, kept):
            kept.append(path)
    return kept


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (``sqlite:///relative``, ``sqlite:////absolute``); None for
    another database or an in-memory one."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] != "sqlite":
        return None
    path = rest.partition("?")[0][1:]  # the first / separates the (empty) host
    if not path or path == ":memory:":
        return None
    return Path(path)


@functools.cache
def _tool(name: str) -> str | None:
    return shutil.which(name, path=ENV["PATH"])


@functools.lru_cache(maxsize=16)
def _probe(argv: tuple[str, ...]) -> str | None:
    """Why the sandbox cannot start the interpreter here, or None when it can."""
    try:
        done = subprocess.run([*argv, sys.executable, "-I", "-c", "pass"], env=ENV,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    if done.returncode == 0:
        return None
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


@functools.lru_cache(maxsize=16)
def _unisolated(status: str) -> Sandbox:
    log.warning("policy subprocess mode is %s; bind only trusted policies", status)
    return Sandbox((), status)
