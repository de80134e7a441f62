"""Timing spans around the code a create runs, for the create benchmark: in this process
(``dag.test`` runs tasks here) or, through ``spans_site/sitecustomize.py``, in every process
of a running Airflow (tasks run in processes of the scheduler's executor).

Kinds of span:

- ``execute``: Airflow's call of a task's ``execute`` (or of its ``execute_complete`` after a
  deferral), label the task id: what the task process spends outside it is Airflow's;
- ``flow``: the steps of :mod:`airfleet.flows` (validate, lease, policies, first writes,
  release, finish) and ``clients``: building a cluster's clients from the Airflow hooks;
- ``verb``: :func:`airfleet.flows.run_verb` (the lease renew, the store, the backend call);
- ``backend``: the static-nodes backend's own verbs (SSH commands and waits).

In a running Airflow nothing is imported early: each module is patched as it is imported, so
a task process imports what it would import anyway (preloading in the scheduler would make
every forked task look faster than it is).
"""

from __future__ import annotations

import functools
import importlib.abc
import inspect
import json
import os
import sys
import threading
import time
from collections.abc import Callable

SPANS_ENV = "AIRFLEET_BENCH_SPANS"  # a JSONL file: each process appends its spans
FLOW_STEPS = ("validate", "acquire", "precheck", "admit", "release", "held_by", "ended_in",
              "finish", "begin", "register")
BACKEND_VERBS = ("apply", "detect_accelerators", "wait_ready", "provision")

Sink = Callable[[dict], None]


def wrap(owner, name: str, kind: str, label: Callable[..., str], sink: Sink) -> Callable:
    """Replace ``owner.name`` with a timed wrapper; returns the original."""
    original = getattr(owner, name)
    if getattr(original, "__airfleet_span__", False):
        return original
    if inspect.iscoroutinefunction(original):
        @functools.wraps(original)
        async def wrapper(*args, **kwargs):
            at, t = time.time(), time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                sink({"kind": kind, "label": label(*args, **kwargs), "at": at,
                      "seconds": time.perf_counter() - t, "pid": os.getpid()})
    else:
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            at, t = time.time(), time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sink({"kind": kind, "label": label(*args, **kwargs), "at": at,
                      "seconds": time.perf_counter() - t, "pid": os.getpid()})
    wrapper.__airfleet_span__ = True
    setattr(owner, name, wrapper)
    return original


def patch_task_runner(module, sink: Sink) -> None:
    wrap(module, "_execute_task", "execute",
         lambda *a, **k: getattr(k.get("ti") or a[1], "task_id", "?"), sink)


def patch_flows(module, sink: Sink) -> None:
    for step in FLOW_STEPS:
        wrap(module, step, "flow", lambda *a, s=step, **k: s, sink)
    wrap(module, "run_verb", "verb", lambda store, lease, verb, *a, **k: verb, sink)


def patch_clients(module, sink: Sink) -> None:
    wrap(module, "clients_for", "clients", lambda *a, **k: "clients_for", sink)


def patch_ssh_backend(module, sink: Sink) -> None:
    for verb in BACKEND_VERBS:
        wrap(module.SSHBackend, verb, "backend", lambda *a, v=verb, **k: v, sink)


PATCHES = {
    "airflow.sdk.execution_time.task_runner": patch_task_runner,
    "airfleet.flows": patch_flows,
    "airfleet_airflow.clients": patch_clients,
    "airfleet.backends.ssh.backend": patch_ssh_backend,
}


def patch_loaded(sink: Sink) -> None:
    """Patch the modules already imported (in this process: ``dag.test``)."""
    import importlib

    for name, patch in PATCHES.items():
        patch(importlib.import_module(name), sink)


class FileSink:
    """Appends each span as a JSON line (one write per span: processes do not interleave)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def __call__(self, span: dict) -> None:
        line = json.dumps(span) + "\n"
        with self._lock, open(self.path, "a") as out:
            out.write(line)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patch each module of :data:`PATCHES` right after it is first imported."""

    def __init__(self, sink: Sink):
        self.sink = sink

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader, patch, sink = spec.loader, PATCHES[name], self.sink
        exec_module = loader.exec_module

        def patched_exec(module):
            exec_module(module)
            patch(module, sink)

        loader.exec_module = patched_exec
        return spec


def install_on_import() -> None:
    """From ``sitecustomize``: when :data:`SPANS_ENV` names a file, patch on import."""
    path = os.environ.get(SPANS_ENV)
    if path and not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(FileSink(path)))


def read(path) -> list[dict]:
    try:
        with open(path) as spans:
            return [json.loads(line) for line in spans if line.strip()]
    except FileNotFoundError:
        return []


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals (nested spans counted once)."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total
