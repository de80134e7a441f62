"""Races on real databases: many workers reach for one lease, or write one cluster row, at once.

On PostgreSQL the contenders are real OS processes (``spawn``), each with its own ``Store`` and
connection, released together by a barrier once every one of them is connected (and its
version read). On SQLite,
threads are enough: the store serializes writers with ``BEGIN IMMEDIATE`` and a busy timeout.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.integration

CONTENDERS = 20
START_TIMEOUT = 60  # spawning 20 interpreters on a small machine takes a few seconds
LEASE = "alpha"


def _request(name: str):
    from airfleet.resources import ClusterRequest

    return ClusterRequest.model_validate({
        "metadata": {"name": name},
        "spec": {"type": "ssh", "provider": "static",
                 "config": {"ssh": {"head": "10.0.0.1",
                                    "credential": {"airflow_conn_id": "ssh"}}}},
    })


def _contend(index: int, jobs, start, results) -> None:
    """One contender; runs jobs ``(url, kind, tag)`` until it gets None.

    Per job: build a ``Store`` and connect, wait at the start line with every other contender,
    make one attempt, report ``(index, outcome, detail)`` on ``results``.
    ``kind`` "lease": acquire the lease as ``run-<index>-<tag>``; ``kind`` "version": set the
    cluster's status naming the version read before the start line.
    """
    from airfleet.errors import Conflict, LeaseHeld
    from airfleet.resources import ClusterStatus, Phase
    from airfleet.store import Store

    for url, kind, tag in iter(jobs.get, None):
        store = read = outcome = None
        try:
            store = Store(url)
            read = store.require_cluster(LEASE) if kind == "version" else store.get_lease(LEASE)
        except Exception as exc:  # still meet the others at the start line, then report it
            outcome = ("error", repr(exc))
        start.wait(timeout=START_TIMEOUT)
        if outcome is None:
            try:
                if kind == "lease":
                    lease = store.acquire_lease(LEASE, f"run-{index}-{tag}", ttl=600)
                    outcome = ("won", lease.token)
                else:
                    status = ClusterStatus(phase=Phase.RUNNING, message=f"writer {index}")
                    record = store.set_status(LEASE, status, reason="Ready",
                                              run_id=f"run-{index}",
                                              expected_version=read.version)
                    outcome = ("won", record.version)
            except LeaseHeld as exc:
                outcome = ("held", str(exc))
            except Conflict as exc:
                outcome = ("conflict", str(exc))
            except Exception as exc:
                outcome = ("error", repr(exc))
        results.put((index, *outcome))
        if store is not None:
            store.dispose()


class Contenders:
    """``CONTENDERS`` workers running :func:`_contend`: spawned OS processes, or threads.

    Spawning twenty interpreters costs seconds, so one set of processes serves every test of
    the module; each race still builds fresh connections to that test's database."""

    def __init__(self, processes: bool):
        if processes:
            ctx = multiprocessing.get_context("spawn")
            self.jobs, self.start, self.results = ctx.Queue(), ctx.Barrier(CONTENDERS + 1), \
                ctx.Queue()
            make: Callable[..., Any] = ctx.Process
        else:
            self.jobs, self.start, self.results = queue.Queue(), \
                threading.Barrier(CONTENDERS + 1), queue.Queue()
            make = threading.Thread
        self.workers = [make(target=_contend, daemon=True,
                             args=(i, self.jobs, self.start, self.results))
                        for i in range(CONTENDERS)]

    def __enter__(self) -> Contenders:
        for worker in self.workers:
            worker.start()
        return self

    def race(self, url: str, kind: str, tag: str = "r0") -> dict[str, list[tuple[int, Any]]]:
        """Release every contender at once; return ``{outcome: [(index, detail), ...]}``."""
        for _ in self.workers:
            self.jobs.put((url, kind, tag))
        self.start.wait(timeout=START_TIMEOUT)
        outcomes: dict[str, list[tuple[int, Any]]] = {}
        for _ in self.workers:
            index, outcome, detail = self.results.get(timeout=30)
            outcomes.setdefault(outcome, []).append((index, detail))
        return outcomes

    def __exit__(self, *exc_info) -> None:
        for _ in self.workers:
            self.jobs.put(None)
        for worker in self.workers:
            worker.join(timeout=30)
        for worker in self.workers:
            if isinstance(worker, multiprocessing.process.BaseProcess) and worker.is_alive():
                worker.terminate()
                worker.join(timeout=5)


@pytest.fixture(scope="module")
def processes():
    with Contenders(processes=True) as contenders:
        yield contenders


@pytest.fixture(scope="module")
def threads():
    with Contenders(processes=False) as contenders:
        yield contenders


def _migrated(url: str):
    from airfleet.store import Store

    store = Store(url)
    store.migrate()
    return store


def _check_lease_race(url: str, contenders: Contenders) -> None:
    store = _migrated(url)
    try:
        first = contenders.race(url, "lease", tag="r0")
        assert set(first) == {"won", "held"}, first.get("error")
        [(winner, token)] = first["won"]
        assert token == 1
        assert len(first["held"]) == CONTENDERS - 1
        holder = f"run-{winner}-r0"
        assert all(f"held by run {holder} until" in message for _, message in first["held"])
        lease = store.get_lease(LEASE)
        assert (lease.holder, lease.token, lease.held) == (holder, 1, True)

        # The winner's run dies: its last renewal was short, and it runs out.
        assert store.acquire_lease(LEASE, holder, ttl=0.3).token == 1
        time.sleep(0.6)
        assert not store.get_lease(LEASE).held

        second = contenders.race(url, "lease", tag="r1")
        assert set(second) == {"won", "held"}, second.get("error")
        [(successor, token)] = second["won"]
        assert token == 2  # exactly one takeover: the previous token + 1
        assert len(second["held"]) == CONTENDERS - 1
        successor_holder = f"run-{successor}-r1"
        assert all(f"held by run {successor_holder} until" in message
                   for _, message in second["held"])
        lease = store.get_lease(LEASE)
        assert (lease.holder, lease.token, lease.held) == (successor_holder, 2, True)
    finally:
        store.dispose()


def _check_version_race(url: str, contenders: Contenders) -> None:
    from airfleet.resources import Phase

    store = _migrated(url)
    try:
        store.register_cluster(_request(LEASE), run_id="run-register", token=None)
        read = store.require_cluster(LEASE)

        outcome = contenders.race(url, "version")

        assert set(outcome) == {"won", "conflict"}, outcome.get("error")
        [(winner, version)] = outcome["won"]
        assert version == read.version + 1
        assert len(outcome["conflict"]) == CONTENDERS - 1
        assert all(f"changed since version {read.version}" in message
                   for _, message in outcome["conflict"])
        stored = store.require_cluster(LEASE)
        assert (stored.phase, stored.version) == (Phase.RUNNING, read.version + 1)
        assert stored.cluster.status.message == f"writer {winner}"
        assert stored.cluster.status.last_run_id == f"run-{winner}"
        moves = [(e.from_phase, e.to_phase, e.run_id) for e in store.events(LEASE)
                 if e.kind == "Transition"]
        assert moves == [("Pending", "Running", f"run-{winner}")]
    finally:
        store.dispose()


@pytest.mark.postgres
def test_twenty_processes_race_for_one_lease_on_postgresql(pg_url, processes):
    _check_lease_race(pg_url, processes)


@pytest.mark.postgres
def test_twenty_processes_write_one_cluster_version_on_postgresql(pg_url, processes):
    _check_version_race(pg_url, processes)


def test_twenty_threads_race_for_one_lease_on_sqlite(sqlite_url, threads):
    _check_lease_race(sqlite_url, threads)


def test_twenty_threads_write_one_cluster_version_on_sqlite(sqlite_url, threads):
    _check_version_race(sqlite_url, threads)
