"""Benchmark: the memory Airfleet takes while idle, as PSS (proportional set size: shared pages
split between the processes that map them, so the sum over processes is what they cost the
machine together). Goal: `make run` (airflow standalone, SQLite) under 1.5 GiB.

Two stacks, each started the way a user starts it, on a free port and a private home:
- `bin/airfleet-dev run` (`make run`): api-server, scheduler, dag-processor, triggerer;
- `bin/airfleet-dev run --scale-out` (`make run-scale-out`): the same components plus two
  Celery workers (8 task slots each) and supervisord, on the local PostgreSQL and Redis. The
  PostgreSQL and Redis servers are not counted (they run whether Airfleet does or not; their
  share for Airfleet's connections is the backends' memory, printed apart).

Each stack is measured after it is healthy, every DAG is parsed, and it has idled for
``IDLE`` seconds (the scheduled health check runs once at the start: idle means no run
queued). The CPU the stack's processes used over that time is printed too (the scheduler
polls while idle); a scheduled health check that runs in the window is counted in it. Prints per component and in total and writes ``tests/benchmarks/results/
idle_footprint.json``; asserts nothing about memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pytest
import requests

from tests.e2e.support import ROOT, free_port, token, wait_healthy

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(900)]

RESULTS = ROOT / "tests" / "benchmarks" / "results" / "idle_footprint.json"
IDLE = float(os.environ.get("AIRFLEET_BENCH_IDLE_SECONDS")
             or (20 if os.environ.get("AIRFLEET_BENCH_QUICK") else 60))
GOAL_MIB = 1536
PG = "postgresql://postgres@127.0.0.1:5432"


def component(proc: psutil.Process) -> str:
    """A readable name for one process of the stack."""
    cmd = " ".join(proc.cmdline())
    for name in ("supervisord", "api_server", "api-server", "scheduler", "dag-processor",
                 "triggerer", "serve-logs"):
        if name in cmd:
            return name.replace("api_server", "api-server")
    if "celery" in cmd or "celeryd" in cmd:
        return "celery worker"
    if "standalone" in cmd:
        return "standalone"
    return proc.name()


def pss_by_component(root: int) -> dict[str, float]:
    top = psutil.Process(root)
    totals: dict[str, float] = defaultdict(float)
    for proc in [top, *top.children(recursive=True)]:
        try:
            totals[component(proc)] += proc.memory_full_info().pss / 2**20
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {name: round(mib, 1) for name, mib in sorted(totals.items())}


def cpu_seconds(root: int) -> float:
    """User + system CPU the stack's processes have used so far."""
    top, total = psutil.Process(root), 0.0
    for proc in [top, *top.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def postgres_backends_pss(databases: tuple[str, ...]) -> float:
    """PSS of the PostgreSQL backends serving the stack's databases (counted apart)."""
    import psycopg

    with psycopg.connect(PG + "/postgres") as pg:
        pids = [row[0] for row in pg.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = ANY(%s)", (list(databases),))]
    total = 0.0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_full_info().pss / 2**20
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return round(total, 1)


def measure(tmp_path: Path, *args: str, databases: tuple[str, ...] = (), **env: str) -> dict:
    home, port = tmp_path / "home", free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AIRFLEET"))}
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen([str(ROOT / "bin" / "airfleet-dev"), "run", *args], cwd=ROOT,
                            env={**clean, "AIRFLEET_AIRFLOW_HOME": str(home),
                                 "AIRFLEET_PORT": str(port), **env},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, tmp_path / "run.log")
        _wait_parsed(base)
        cpu = cpu_seconds(proc.pid)
        time.sleep(IDLE)
        # The scheduler loops every scheduler_idle_sleep_time when idle: its price in CPU.
        result = {"idle_cpu_share_of_one_core": round((cpu_seconds(proc.pid) - cpu) / IDLE, 3),
                  "components_mib": pss_by_component(proc.pid)}
        if databases:
            result["postgres_backends_mib"] = postgres_backends_pss(databases)
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        # The whole group, even when the launcher exited in time: `airflow standalone` can
        # exit and leave its scheduler, api-server and executor workers running (seen in CI:
        # a stack left idle through the benchmarks that came after this one).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _wait_parsed(base: str, timeout: float = 180) -> None:
    headers = {"Authorization": f"Bearer {token(base, 'admin', 'admin')}"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dags = requests.get(f"{base}/api/v2/dags", params={"tags": "airfleet"}, headers=headers,
                            timeout=10).json()["dags"]
        if len(dags) >= 8:
            return
        time.sleep(2)
    pytest.fail("Airfleet's DAGs were not parsed")


def _drop(databases: tuple[str, ...]) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(PG + "/postgres", autocommit=True) as pg:
        for db in databases:
            pg.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(db)))


def test_idle_footprint(tmp_path):
    standalone = measure(tmp_path / "standalone")
    db = f"airfleet_bench_idle_{os.getpid()}"
    databases = (db, f"{db}_store")
    _drop(databases)
    try:
        scale_out = measure(tmp_path / "scale-out", "--scale-out", databases=databases,
                            AIRFLEET_PG_DB=db,
                            AIRFLEET_REDIS_URL="redis://127.0.0.1:6379/12")
    finally:
        _drop(databases)
    figures = {"idle_seconds": IDLE, "unit": "MiB (PSS)", "goal_standalone_mib": GOAL_MIB}
    for name, result in (("standalone", standalone), ("scale_out", scale_out)):
        result["total_mib"] = round(sum(result["components_mib"].values()), 1)
        figures[name] = result
    figures["standalone"]["goal_met"] = figures["standalone"]["total_mib"] < GOAL_MIB
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    for name in ("standalone", "scale_out"):
        result = figures[name]
        parts = ", ".join(f"{k} {v:.0f}" for k, v in result["components_mib"].items())
        print(f"\n[idle] {name}: {result['total_mib']:.0f} MiB PSS after {IDLE:.0f} s idle "
              f"({parts}); CPU over those {IDLE:.0f} s "
              f"{result['idle_cpu_share_of_one_core']:.0%} of one core (any scheduled run in them "
              "included)"
              + (f"; PostgreSQL backends {result['postgres_backends_mib']:.0f} "
                              "MiB apart" if "postgres_backends_mib" in result else ""))
    print(f"[idle] standalone goal < {GOAL_MIB} MiB: "
          f"{'met' if figures['standalone']['goal_met'] else 'NOT met'}")
