"""A kubelet for the fake Kubernetes API server that runs some pods as local processes.

Opt in per image repository (the tag or digest is ignored)::

    runners = {"airfleet/mock-engine": python_module_runner("airfleet_mock_engine")}
    with FakeKubeAPIServer(run_images=runners) as kube: ...

A pod with at least one container whose image is in `run_images` is run here instead of by
the timer kubelet of kube_controllers.py (pods of other images keep the timer: Running and
Ready `ready_delay` after creation). A runner is `runner(container, pod_ip)`, given the
container spec (command / args with `$(VAR)` expanded from its env) and the pod's IP, and
returns the argv to run, or a `Process` (argv, extra env, cwd). Other containers of such a
pod run no process and count as running and ready.

Each pod gets a loopback address of its own as `status.podIP` (127.R.x.y, R random per
server, so that two fakes on one machine rarely meet; an address whose containerPorts are
taken is skipped; the whole 127.0.0.0/8 is loopback on Linux), `hostIP` 127.0.0.1 (the node
is this machine). Its processes get the container's `env`: `value`, `valueFrom`
(secretKeyRef, configMapKeyRef, fieldRef to name / namespace / uid / labels / annotations /
podIP / hostIP / nodeName / serviceAccountName) and `envFrom`; a missing reference leaves the
container waiting in CreateContainerConfigError as the real kubelet does, an unsupported one
(resourceFieldRef, grpc probes) too, with a message saying the fake does not support it.
Output goes to `<log_dir>/<namespace>_<pod>_<uid>/<container>/<restartCount>.log`, as the
kubelet lays out /var/log/pods; `log_path()` gives it and `GET .../pods/<name>/log` serves it.

What the pod reports follows the processes (https://kubernetes.io/docs/concepts/workloads/
pods/pod-lifecycle/ and https://kubernetes.io/docs/concepts/configuration/
liveness-readiness-startup-probes/):

- phase Pending until a container started, then Running (restartPolicy Always), or Succeeded /
  Failed once every container exited for good (Never / OnFailure);
- probes: httpGet (path, port by number or containerPort name, scheme, headers; success is
  200-399), tcpSocket, exec (run here, in the pod's env). Times are the spec's scaled by
  `time_scale` (0.1: periodSeconds 10 -> 1 s) with a floor of `MIN_PERIOD`; failureThreshold
  and successThreshold count as the kubelet counts them. The startupProbe holds the others
  back until it succeeds (`started`); readiness is False until its first success, and a
  container without a readinessProbe is ready once started; a livenessProbe (or startupProbe)
  failing failureThreshold times kills the container, which restarts;
- a container that exits restarts per restartPolicy: the first time at once, then after a
  back-off doubling from `BACKOFF` to `BACKOFF_CAP` (the kubelet's 10 s .. 5 min, scaled),
  reset after the container ran `BACKOFF_CAP` * 2; meanwhile state.waiting is
  CrashLoopBackOff and lastState.terminated holds the exit;
- containerStatuses ready / started / restartCount / state / lastState, and the conditions
  PodReadyToStartContainers, Initialized, ContainersReady, Ready, PodScheduled, with
  lastTransitionTime moving only on a change.

Status is written through the server's store, so watchers get MODIFIED events and the
ReplicaSet / Deployment controllers count the pod ready or not. Deleting a pod (directly, by a
scale-down or rollout, with its namespace, by `reset()`) stops its processes: SIGTERM to the
process group, SIGKILL after terminationGracePeriodSeconds (default 30) capped to
`GRACE_CAP`. Deletion stays immediate in the API (the pod does not linger as Terminating).
`stop_all()` (the server's stop and reset) waits for every process to be gone.

Not modelled: scheduling (pods are bound to no node; resource requests such as nvidia.com/gpu
are neither checked nor allocated), init containers, volumes, lifecycle hooks, image pulls
(an image in the server's `bad_images` goes to the timer kubelet's ImagePullBackOff), Events.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import copy
import hashlib
import http.client
import ipaddress
import logging
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fakes.kube_controllers import deleting, images_of, now, qos_class

log = logging.getLogger(__name__)

MIN_PERIOD = 0.2  # seconds: the fastest a probe runs, whatever the scale
GRACE_CAP = 2.0  # seconds between SIGTERM and SIGKILL, at most
BACKOFF, BACKOFF_CAP = 1.0, 5.0  # restart back-off, seconds (the kubelet's 10 s and 5 min)
TICK = 0.1  # how often a pod's supervisor looks at its processes
BASE_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "SYSTEMROOT")  # from the test's own env


@dataclass(frozen=True)
class Process:
    """What a runner returns when argv alone is not enough."""

    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)  # added to the container's env
    cwd: str | None = None


Runner = Callable[[dict, str], "Sequence[str] | Process"]


def repository(image: str) -> str:
    """The image without its tag or digest: "reg:5000/a/b:1.0" -> "reg:5000/a/b"."""
    image = image.split("@", 1)[0]
    head, _, last = image.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def python_module_runner(module: str, *, host_flag: str = "--host",
                         cwd: str | None = None, pythonpath: str | None = None) -> Runner:
    """A runner for an image whose entrypoint is `python -m <module>`: the container's args
    follow it; a `command` replaces the entrypoint, as in a real pod, and must then be that
    same `python -m <module>` (the image holds nothing else). `<host_flag> <pod IP>` is
    forced (any host given is dropped); it runs in this interpreter."""
    def run(container: dict, pod_ip: str) -> Process:
        command = list(container.get("command") or [])
        if command and (len(command) < 3 or command[1:3] != ["-m", module]
                        or not command[0].startswith("python")):
            raise ValueError(f"container {container.get('name')!r}: command {command} does "
                             f"not run python -m {module}, the only program of this image")
        args, kept, skip = command[3:] + list(container.get("args") or []), [], False
        for arg in args:
            if skip:
                skip = False
            elif arg == host_flag:
                skip = True
            elif not arg.startswith(f"{host_flag}="):
                kept.append(arg)
        env = {"PYTHONPATH": pythonpath} if pythonpath else {}
        return Process([sys.executable, "-m", module, *kept, host_flag, pod_ip], env, cwd)

    return run


def command_runner(container: dict, pod_ip: str) -> list[str]:
    """A runner for the container's own command + args, run as they are."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if not argv:
        raise ValueError(f"container {container.get('name')!r} has no command to run here")
    return argv


class ConfigError(Exception):
    """The kubelet cannot create the container (CreateContainerConfigError)."""


_VAR = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a defined variable is replaced, $$ escapes, an undefined
    reference stays as written."""
    return _VAR.sub(lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


# --- probes -----------------------------------------------------------------------------------

@dataclass
class _Probe:
    kind: str  # startup / liveness / readiness
    spec: dict
    scale: float
    due: float = 0.0
    successes: int = 0
    failures: int = 0
    result: bool = False

    def __post_init__(self) -> None:
        self.period = max(self.spec.get("periodSeconds", 10) * self.scale, MIN_PERIOD)
        self.timeout = min(max(self.spec.get("timeoutSeconds", 1), 1), 2)
        self.failure_threshold = self.spec.get("failureThreshold", 3)
        # liveness and startup need one success, whatever the spec says (the API enforces it)
        self.success_threshold = 1 if self.kind != "readiness" \
            else self.spec.get("successThreshold", 1)
        self.result = self.kind == "liveness"  # readiness and startup start failed

    def arm(self, at: float) -> None:
        self.due = at + self.spec.get("initialDelaySeconds", 0) * self.scale
        self.successes = self.failures = 0
        self.result = self.kind == "liveness"

    def record(self, ok: bool) -> bool:
        """Count one outcome: the result turns at successThreshold consecutive successes or
        failureThreshold consecutive failures."""
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= self.success_threshold:
                self.result = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= self.failure_threshold:
                self.result = False
        return self.result


def _port(container: dict, port: Any) -> int:
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ConfigError(f"port {port!r} is not a containerPort of {container.get('name')!r}")


def probe_once(spec: dict, container: dict, pod_ip: str, env: Mapping[str, str],
               timeout: float) -> bool:
    """One probe, as the kubelet's prober runs it."""
    if "httpGet" in spec:
        get = spec["httpGet"]
        host, port = get.get("host") or pod_ip, _port(container, get.get("port"))
        if get.get("scheme", "HTTP").upper() == "HTTPS":  # the kubelet skips verification
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=ssl._create_unverified_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        headers = {"User-Agent": "kube-probe/1.32", "Accept": "*/*",
                   **{h["name"]: h["value"] for h in get.get("httpHeaders") or []}}
        try:
            conn.request("GET", get.get("path") or "/", headers=headers)
            return 200 <= conn.getresponse().status < 400
        except OSError:
            return False
        finally:
            conn.close()
    if "tcpSocket" in spec:
        tcp = spec["tcpSocket"]
        try:
            with socket.create_connection((tcp.get("host") or pod_ip,
                                           _port(container, tcp.get("port"))), timeout=timeout):
                return True
        except OSError:
            return False
    if "exec" in spec:
        try:
            return subprocess.run(spec["exec"].get("command") or ["false"], env=dict(env),
                                  capture_output=True, timeout=timeout).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False
    raise ConfigError(f"the fake kubelet does not run this probe: {sorted(spec)}")


# --- one container ----------------------------------------------------------------------------

class _Container:
    def __init__(self, spec: dict, runner: Runner | None, scale: float):
        self.spec, self.runner, self.name = spec, runner, spec.get("name", "")
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.restarts = 0
        self.crashes = 0  # exits since the back-off was last reset
        self.started_at = ""
        self.ran_since = 0.0
        self.next_start = 0.0
        self.waiting: tuple[str, str] | None = ("ContainerCreating", "")
        self.last: dict = {}
        self.done = False  # exited for good (restartPolicy)
        self.container_id = ""
        self.probes = {kind: _Probe(kind, spec[f"{kind}Probe"], scale)
                       for kind in ("startup", "liveness", "readiness")
                       if spec.get(f"{kind}Probe")}

    @property
    def running(self) -> bool:
        return self.proc is not None or (self.runner is None and not self.waiting)

    @property
    def started(self) -> bool:
        return self.running and (self.runner is None or "startup" not in self.probes
                                 or self.probes["startup"].result)

    @property
    def ready(self) -> bool:
        if not self.started:
            return False
        return "readiness" not in self.probes or self.probes["readiness"].result

    def status(self) -> dict:
        image = self.spec.get("image", "")
        digest = hashlib.sha256(image.encode()).hexdigest()
        out: dict[str, Any] = {"name": self.name, "image": image,
                               "imageID": f"{repository(image)}@sha256:{digest}",
                               "ready": self.ready, "started": self.started,
                               "restartCount": self.restarts, "lastState": copy.deepcopy(self.last)}
        if self.container_id:
            out["containerID"] = self.container_id
        if self.running:
            out["state"] = {"running": {"startedAt": self.started_at}}
        elif self.done:
            out["state"] = copy.deepcopy(self.last)
            out["lastState"] = {}
        else:
            reason, message = self.waiting or ("ContainerCreating", "")
            out["state"] = {"waiting": {"reason": reason, **({"message": message}
                                                             if message else {})}}
        return out


# --- one pod ----------------------------------------------------------------------------------

class _PodSupervisor:
    """A thread that runs one pod's containers, probes them and reports the pod's status."""

    def __init__(self, owner: PodProcesses, pod: dict, ip: str):
        m = pod["metadata"]
        self.owner, self.ip = owner, ip
        self.namespace, self.name, self.uid = m["namespace"], m["name"], m["uid"]
        self.key = (self.namespace, self.name)
        spec = pod.get("spec") or {}
        self.policy = spec.get("restartPolicy", "Always")
        self.grace = min(spec.get("terminationGracePeriodSeconds", 30), GRACE_CAP)
        self.containers = [_Container(c, owner.runner_for(c.get("image", "")), owner.time_scale)
                           for c in spec.get("containers") or []]
        self.log_dir = owner.log_dir / f"{self.namespace}_{self.name}_{self.uid}"
        self.stopping = threading.Event()
        self.conditions: dict[str, tuple[str, str]] = {}  # type -> (status, lastTransitionTime)
        self.start_time = ""
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"fake-kubelet-{self.namespace}/{self.name}")

    # --- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._write()
            while not self.stopping.is_set():
                if not self._tick():
                    break
                self.stopping.wait(TICK)
        except Exception:  # a bug in the fake: say so, leave no process behind
            log.exception("fake kubelet failed on pod %s/%s", *self.key)
        finally:
            self._kill_all()
            self.owner.released(self)

    def _tick(self) -> bool:
        at = time.monotonic()
        for c in self.containers:
            if c.proc is not None and c.proc.poll() is not None:
                self._exited(c, c.proc.returncode, "Completed" if c.proc.returncode == 0
                             else "Error")
            if c.proc is None and not c.done and at >= c.next_start and not self.stopping.is_set():
                self._start(c)
            if c.proc is not None:
                self._probe(c, time.monotonic())
        return self._write() and not all(c.done for c in self.containers)

    def _start(self, c: _Container) -> None:
        if c.runner is None:  # no process: running and ready, as the timer kubelet has it
            c.waiting, c.started_at = None, c.started_at or now()
            return
        try:
            with self.owner.lock:
                pod = self.owner.current(self)
                if pod is None:
                    self.stopping.set()
                    return
                c.env = container_env(self.owner.store, pod, c.spec, self.ip)
            spec = {**c.spec, **{k: [expand(a, c.env) for a in c.spec.get(k) or []]
                                 for k in ("command", "args")}}
            what = c.runner(spec, self.ip)
        except ConfigError as exc:
            c.waiting, c.next_start = ("CreateContainerConfigError", str(exc)), \
                time.monotonic() + BACKOFF
            log.error("fake kubelet: pod %s/%s container %s: %s", *self.key, c.name, exc)
            return
        process = what if isinstance(what, Process) else Process(list(what))
        env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
        home = self.log_dir / "home"  # a writable HOME of the pod's own
        home.mkdir(parents=True, exist_ok=True)
        env.update(HOSTNAME=self.name, HOME=str(home), **c.env, **process.env)
        path = self.log_path(c, c.restarts)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "ab") as out:
                c.proc = subprocess.Popen(list(process.argv), env=env, cwd=process.cwd,
                                          stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:  # the runtime's StartError: exit code 128, then back-off
            with open(path, "ab") as out:
                out.write(f"fake kubelet: {exc}\n".encode())
            c.started_at = now()
            self._exited(c, 128, "StartError", str(exc))
            return
        self.owner.started(c.proc.pid)
        c.waiting, c.started_at, c.ran_since = None, now(), time.monotonic()
        c.container_id = f"containerd://{uuid.uuid4().hex}{uuid.uuid4().hex}"
        self.start_time = self.start_time or c.started_at
        for p in c.probes.values():
            p.arm(c.ran_since)

    def _probe(self, c: _Container, at: float) -> None:
        startup = c.probes.get("startup")
        kinds = ["startup"] if startup and not startup.result else ["liveness", "readiness"]
        for kind in kinds:
            p = c.probes.get(kind)
            if p is None or at < p.due:
                continue
            p.due = at + p.period
            try:
                ok = probe_once(p.spec, c.spec, self.ip, c.env, p.timeout)
            except ConfigError as exc:
                log.error("fake kubelet: pod %s/%s: %s", *self.key, exc)
                ok = False
            if not p.record(ok) and kind != "readiness" and p.failures >= p.failure_threshold:
                log.info("fake kubelet: %s probe of %s/%s %s failed, restarting", kind,
                         *self.key, c.name)
                code = self._stop(c)
                self._exited(c, code, "Error", restart_anyway=True)
                return

    def _exited(self, c: _Container, code: int, reason: str, message: str = "", *,
                restart_anyway: bool = False) -> None:
        """The container's process is gone: record it, and restart it (per restartPolicy,
        with the back-off) or leave it terminated."""
        if c.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.proc.pid, signal.SIGKILL)  # what is left of its process group
            self.owner.gone(c.proc.pid)
        c.proc = None
        code = 128 - code if code < 0 else code  # killed by a signal: 128 + signal number
        c.last = {"terminated": {"exitCode": code, "reason": reason,
                                 **({"message": message} if message else {}),
                                 "startedAt": c.started_at, "finishedAt": now(),
                                 **({"containerID": c.container_id} if c.container_id else {})}}
        restart = self.policy == "Always" or (self.policy == "OnFailure" and code != 0) \
            or (restart_anyway and self.policy != "Never")
        if not restart:
            c.done = True
            return
        at = time.monotonic()
        if c.ran_since and at - c.ran_since > BACKOFF_CAP * 2:
            c.crashes = 0
        c.crashes += 1
        delay = 0.0 if c.crashes == 1 else min(BACKOFF * 2 ** (c.crashes - 2), BACKOFF_CAP)
        c.restarts += 1
        c.next_start = at + delay
        c.waiting = ("CrashLoopBackOff", f"back-off {delay:g}s restarting failed container="
                     f"{c.name} pod={self.name}_{self.namespace}({self.uid})")
        for p in c.probes.values():
            p.arm(at)

    # --- stopping -----------------------------------------------------------------------------

    def _stop(self, c: _Container) -> int:
        """SIGTERM, SIGKILL after the grace period; the exit code (negative: a signal)."""
        self._kill([c])
        return c.proc.returncode if c.proc is not None else 137

    def _kill(self, containers: list[_Container]) -> None:
        procs = [c.proc for c in containers if c.proc is not None and c.proc.poll() is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(deadline - time.monotonic(), 0))
        for c in containers:
            if c.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()

    def _kill_all(self) -> None:
        running = [c for c in self.containers if c.proc is not None]
        self._kill(running)
        for c in running:
            self.owner.gone(c.proc.pid)
            c.proc = None

    # --- status -------------------------------------------------------------------------------

    def log_path(self, c: _Container, restarts: int) -> Path:
        return self.log_dir / c.name / f"{restarts}.log"

    def _condition(self, kind: str, ok: bool) -> dict:
        flag = "True" if ok else "False"
        old = self.conditions.get(kind)
        if old is None or old[0] != flag:
            self.conditions[kind] = old = (flag, now())
        out = {"type": kind, "status": flag, "lastProbeTime": None, "lastTransitionTime": old[1]}
        if not ok and kind in ("Ready", "ContainersReady"):
            names = " ".join(c.name for c in self.containers if not c.ready)
            out.update(reason="ContainersNotReady",
                       message=f"containers with unready status: [{names}]")
        return out

    def status(self, pod: dict) -> dict:
        ready = all(c.ready for c in self.containers)
        if self.containers and all(c.done for c in self.containers):
            failed = any(c.last["terminated"]["exitCode"] for c in self.containers)
            phase = "Failed" if failed else "Succeeded"
        else:
            phase = "Running" if self.start_time else "Pending"
        conditions = [self._condition(kind, ok) for kind, ok in (
            ("PodReadyToStartContainers", True), ("Initialized", True), ("Ready", ready),
            ("ContainersReady", ready), ("PodScheduled", True))]
        status = {"phase": phase, "conditions": conditions, "hostIP": "127.0.0.1",
                  "hostIPs": [{"ip": "127.0.0.1"}], "podIP": self.ip, "podIPs": [{"ip": self.ip}],
                  "containerStatuses": [c.status() for c in self.containers],
                  "qosClass": qos_class(pod.get("spec") or {})}
        if self.start_time:
            status["startTime"] = self.start_time
        return status

    def _write(self) -> bool:
        """Report the status through the store (watchers and controllers see it); False once
        the pod is gone."""
        with self.owner.lock:
            pod = self.owner.current(self)
            if pod is None or self.stopping.is_set():
                self.stopping.set()
                return False
            status = self.status(pod)
            if pod.get("status") != status:
                new = copy.deepcopy(pod)
                new["status"] = status
                self.owner.store.put(pod, new)
        return True


def container_env(store: Any, pod: dict, container: dict, pod_ip: str) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom, then env (later wins),
    $(VAR) references expanded against what came before."""
    ns, env = pod["metadata"]["namespace"], {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, ref in (("ConfigMap", source.get("configMapRef")),
                          ("Secret", source.get("secretRef"))):
            if ref is None:
                continue
            obj = store.get(kind, ns, ref.get("name", ""))
            if obj is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{kind.lower()} "{ref.get("name")}" not found')
            env.update({prefix + k: v for k, v in _data(obj).items()})
    for var in container.get("env") or []:
        if "valueFrom" not in var:
            env[var["name"]] = expand(var.get("value", ""), env)
            continue
        value = _value_from(store, pod, var["valueFrom"], pod_ip)
        if value is not None:
            env[var["name"]] = value
    return env


def _data(obj: dict) -> dict[str, str]:
    if obj["kind"] == "Secret":
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    return dict(obj.get("data") or {})


def _value_from(store: Any, pod: dict, source: dict, pod_ip: str) -> str | None:
    ns = pod["metadata"]["namespace"]
    for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
        if key in source:
            ref = source[key]
            obj = store.get(kind, ns, ref.get("name", ""))
            data = _data(obj) if obj is not None else None
            if data is None or ref.get("key") not in data:
                if ref.get("optional"):
                    return None
                if data is None:
                    raise ConfigError(f'{kind.lower()} "{ref.get("name")}" not found')
                raise ConfigError(f"couldn't find key {ref.get('key')} in {kind} "
                                  f"{ns}/{ref.get('name')}")
            return data[ref["key"]]
    if "fieldRef" in source:
        path, m = source["fieldRef"].get("fieldPath", ""), pod["metadata"]
        simple = {"metadata.name": m["name"], "metadata.namespace": ns, "metadata.uid": m["uid"],
                  "status.podIP": pod_ip, "status.hostIP": "127.0.0.1",
                  "spec.nodeName": (pod.get("spec") or {}).get("nodeName", ""),
                  "spec.serviceAccountName":
                      (pod.get("spec") or {}).get("serviceAccountName", "default")}
        if path in simple:
            return simple[path]
        if found := re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path):
            return (m.get(found[1]) or {}).get(found[2], "")
        raise ConfigError(f"the fake kubelet does not support fieldRef {path!r}")
    raise ConfigError(f"the fake kubelet does not support valueFrom {sorted(source)}")


# --- all pods ---------------------------------------------------------------------------------

class PodProcesses:
    """The pods this kubelet runs as processes, for the server's controllers (see the module
    docstring). `observe` is called for every Pod event, under the server's lock."""

    TIME_SCALE = 0.1  # probe periods and delays, as a share of the spec's seconds

    def __init__(self, server: Any, store: Any):
        self.server, self.store, self.lock = server, store, server._lock
        self.time_scale = self.TIME_SCALE
        self._pods: dict[str, _PodSupervisor] = {}  # by uid
        self._pids: set[int] = set()
        self._ips: set[str] = set()
        self._net = random.randint(16, 254)  # 127.<net>.x.y; 127.0.0.0/16 left to others
        self._next = 1
        self._log_root: Path | None = None
        self._guard = threading.Lock()  # _pods, _pids, _ips, from the supervisors' threads
        atexit.register(self._kill_now)

    @property
    def log_dir(self) -> Path:
        if self._log_root is None:
            self._log_root = Path(tempfile.mkdtemp(prefix="fake-kubelet-logs-"))
        return self._log_root

    def runner_for(self, image: str) -> Runner | None:
        runners = self.server.run_images or {}
        return runners.get(image) or runners.get(repository(image))

    def wants(self, pod: dict) -> bool:
        spec = pod.get("spec") or {}
        images = images_of(spec)
        return bool(self.server.run_images) and not images & set(self.server.bad_images) \
            and any(self.runner_for(c.get("image", "")) for c in spec.get("containers") or [])

    def handles(self, pod: dict) -> bool:
        return pod["metadata"].get("uid") in self._pods

    def observe(self, event: str, pod: dict) -> None:
        uid = pod["metadata"].get("uid")
        if event == "ADDED" and uid not in self._pods and not deleting(pod) and self.wants(pod):
            self._admit(pod)
        elif (event == "DELETED" or deleting(pod)) and uid in self._pods:
            self._pods[uid].stopping.set()

    def current(self, sup: _PodSupervisor) -> dict | None:
        """The pod as stored, if it is still the one `sup` runs (call under the lock)."""
        pod = self.store.get("Pod", sup.namespace, sup.name)
        if pod is None or pod["metadata"]["uid"] != sup.uid or deleting(pod):
            return None
        return pod

    def _admit(self, pod: dict) -> None:
        ports = [int(p["containerPort"]) for c in (pod.get("spec") or {}).get("containers") or []
                 for p in c.get("ports") or [] if p.get("containerPort")]
        sup = _PodSupervisor(self, pod, self._allocate(ports))
        with self._guard:
            self._pods[sup.uid] = sup
        sup.thread.start()

    def _allocate(self, ports: list[int]) -> str:
        with self._guard:
            for _ in range(65000):
                self._next = self._next % 65000 + 1
                ip = str(ipaddress.IPv4Address(f"127.{self._net}.0.1") + self._next)
                if ip not in self._ips and ip.split(".")[-1] not in ("0", "255") \
                        and all(_free(ip, port) for port in ports):
                    self._ips.add(ip)
                    return ip
        raise RuntimeError("the fake kubelet ran out of loopback addresses")

    def started(self, pid: int) -> None:
        with self._guard:
            self._pids.add(pid)

    def gone(self, pid: int) -> None:
        with self._guard:
            self._pids.discard(pid)

    def released(self, sup: _PodSupervisor) -> None:
        with self._guard:
            self._pods.pop(sup.uid, None)
            self._ips.discard(sup.ip)

    # --- for tests ----------------------------------------------------------------------------

    def pids(self, namespace: str | None = None, name: str | None = None) -> dict[tuple, int]:
        """(namespace, pod, container) -> pid of every process running now."""
        with self._guard:
            pods = list(self._pods.values())
        return {(s.namespace, s.name, c.name): c.proc.pid for s in pods for c in s.containers
                if c.proc is not None and c.proc.returncode is None
                and (namespace in (None, s.namespace))
                and (name in (None, s.name))}

    def log_path(self, namespace: str, name: str, container: str | None = None, *,
                 previous: bool = False) -> Path | None:
        """The log file of a container of a running pod (the only one if not named), or of
        its previous instance."""
        with self._guard:
            sup = next((s for s in self._pods.values() if (s.namespace, s.name) ==
                        (namespace, name)), None)
        if sup is None:
            return None
        c = next((c for c in sup.containers if container in (None, c.name)), None)
        if c is None or c.runner is None or (previous and c.restarts == 0):
            return None
        return sup.log_path(c, c.restarts - 1 if previous else c.restarts)

    def stop_all(self, timeout: float = GRACE_CAP + 5) -> None:
        """Stop every pod's processes and wait for them (never call it under the lock)."""
        with self._guard:
            pods = list(self._pods.values())
        for sup in pods:
            sup.stopping.set()
        for sup in pods:
            sup.thread.join(timeout)
        self._kill_now()

    def reset(self) -> None:
        """No pod runs any more; `time_scale` back to its default."""
        self.stop_all()
        self.time_scale = self.TIME_SCALE

    def cleanup(self) -> None:
        self.stop_all()
        if self._log_root is not None:
            shutil.rmtree(self._log_root, ignore_errors=True)
            self._log_root = None

    def _kill_now(self) -> None:
        """Last resort (a supervisor that did not finish, the interpreter exiting)."""
        with self._guard:
            pids = list(self._pids)
            self._pids.clear()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def _free(ip: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True

