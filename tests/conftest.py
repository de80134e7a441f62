"""Shared fixtures: isolated AIRFLOW_HOME / store / keys per test, and real databases."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Airflow reads its configuration once, at import: give the whole test session its own
# AIRFLOW_HOME (never the developer's) before anything imports airflow.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="airfleet-tests-airflow-")
os.environ.update({
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    # Airflow writes a generated secret into airflow.cfg only on some code paths; a suite
    # that reached none before an api-server app is built has none ("jwt_secret must be set").
    "AIRFLOW__API_AUTH__JWT_SECRET": "airfleet-tests-" + uuid.uuid4().hex * 2,
    # Triggers run here in-process (dag.test(), the trigger tests): no scheduler to race, so
    # no hold (the Airflows the e2e tests start run with the default, as users do).
    "AIRFLEET_RESUME_AFTER_SECONDS": "0",
})

PG_ADMIN_URL = os.environ.get("AIRFLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Airflow's metadata DB (SQLite) in the session's AIRFLOW_HOME, migrated once."""
    home = Path(os.environ["AIRFLOW_HOME"])
    if not (home / ".migrated").exists():
        subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
                       check=True, capture_output=True)
        (home / ".migrated").touch()
    return home


@pytest.fixture
def dags(airflow_db) -> dict:
    """The DAGs of dags/, parsed afresh for each test: ``dag.test()`` keeps a run's conf in
    the DAG object's Params (``Param.resolve`` stores the value), so a DAG object shared
    between tests would hand one test's conf (e.g. health check ``names``) to the next."""
    return dags_for_dag_test()


def dags_for_dag_test() -> dict:
    """The DAGs of dags/ as ``dag.test()`` can run them: without their deadline alerts.

    Airflow 3.3.2's ``dag.test()`` cannot end a run of a DAG that has deadline alerts: it runs
    ``deserialize(serialize(dag))``, whose ``deadline`` still holds the alerts' serialized
    dicts where the scheduler's DAG holds their database ids, and ``DagRun.update_state``
    looks each up by id when the run succeeds (``DeadlineAlertModel.get_by_id({})``:
    "'dict' object has no attribute 'hex'"). The alerts are tested where Airflow's scheduler
    runs them: tests/unit/plugins/test_deadlines.py (what each DAG declares) and
    tests/e2e/test_rest.py (a deadline missed, the callback run by the triggerer)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    for dag in bag.dags.values():
        dag.deadline = None
    return bag.dags


@pytest.fixture
def fleet(farm, airfleet_home, monkeypatch):
    """A module's NodeFarm (its ``farm`` fixture) as Airfleet reaches it: the Airflow SSH
    connection ``ssh_fleet`` with the farm's key, the builtin backends, a fresh store; Ray
    stopped on every node afterwards."""
    from airfleet.store import Store
    from tests.fakes.static_fleet import CONN_ENV, ssh_connection, stop_ray

    monkeypatch.setenv(CONN_ENV, ssh_connection(farm))
    monkeypatch.delenv("AIRFLEET_BACKENDS", raising=False)
    Store().migrate()
    yield farm
    stop_ray(farm)


@pytest.fixture
def airfleet_home(tmp_path, monkeypatch) -> Path:
    """A private Airfleet home: the store (SQLite) and vault keys live inside it."""
    home = tmp_path / "airfleet-home"
    home.mkdir()
    monkeypatch.setenv("AIRFLEET_DATABASE_URL", f"sqlite:///{home / 'airfleet.db'}")
    monkeypatch.setenv("AIRFLEET_KEYS_DIR", str(home / "keys"))
    return home


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'airfleet.db'}"


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database on the machine's server, dropped afterwards. Fails loudly
    when the server is not there: these tests must not pass silently without it."""
    from sqlalchemy import create_engine, text

    name = f"airfleet_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request) -> str:
    """Run a test on both databases the store supports."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url):
    from airfleet.store import Store

    s = Store(db_url)
    s.migrate()
    yield s
    s.dispose()


# -- `make test` in phases (bin/airfleet-dev `tests`) --------------------------------------------
# Most modules run side by side on pytest-xdist workers: what they start is their own (free
# ports, NodeFarm subnets held by lock files, uuid-named PostgreSQL databases, the AIRFLOW_HOME
# made above per worker process). These tests bound a wait to within about a second of what
# they expect: marked `serial`, they run after the parallel phase, one at a time.
SERIAL = {
    "tests/integration/test_remote.py": {
        "test_an_unreachable_node_raises_node_unreachable_within_the_connect_timeout",
        "test_a_command_past_its_timeout_raises_and_is_killed_on_the_node",
        "test_run_all_returns_the_fast_node_without_waiting_for_the_slow_one"},
    "tests/integration/test_fake_kube_apiserver.py": {
        "test_watch_timeout_seconds_ends_the_stream", "test_slow_next_delays_matching_requests"},
    "tests/integration/test_node_farm.py": {
        "test_stop_refuses_fast_and_start_comes_back_with_the_same_host_key"},
    "tests/unit/test_flows.py": {
        "test_a_fleet_is_probed_concurrently_at_most_concurrency_at_once",
        "test_a_hanging_cluster_times_out_and_a_slow_one_waits_for_no_write"},
    "tests/unit/test_fleet_health.py": {
        "test_a_fleet_is_probed_concurrently_and_a_hanging_cluster_only_times_out"},
    "tests/unit/plugins/test_triggers.py": {
        "test_a_silent_dashboard_is_asked_until_the_deadline"},
}
# The parallel phase gives each worker a module at a time (`--dist loadfile`: module-scoped
# NodeFarms and fake servers start once), except that the HEAVY modules form one unit: they
# start real Ray nodes or a whole Airflow (api-server, scheduler, triggerer) and bound their
# waits in tens of seconds, and on 2 cores two of them at once were seen to time out. One
# worker runs them in turn (the e2e REST and fleet-view modules share one Airflow there) while
# the other takes the unit tests and the modules that drive in-process fakes.
# In this order; the two sharing a session-scoped Airflow last, so that it stops when they end.
HEAVY = ["tests/unit/engines/test_mock_engine.py", "tests/integration/test_node_farm.py",
         "tests/integration/test_remote.py", "tests/integration/test_ssh_containers.py",
         "tests/integration/test_ssh_backend.py", "tests/integration/test_endpoints_static.py",
         "tests/e2e/test_readme.py", "tests/e2e/test_fleet_view.py", "tests/e2e/test_rest.py"]
GROUPS = dict.fromkeys(HEAVY, "heavy")
# The longest work units first, so that the parallel phase does not end with one of them
# running alone (`--no-loadscope-reorder` keeps this order).
LONGEST = ["heavy", "tests/integration/test_kubernetes_backend.py",
           "tests/integration/test_cloud_flows.py", "tests/integration/test_kubernetes_updates.py",
           "tests/integration/test_endpoints_kubernetes.py", "tests/integration/test_flows.py",
           "tests/unit/test_cli.py"]


def _unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return GROUPS.get(path, path)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.originalname in SERIAL.get(item.nodeid.split("::", 1)[0], ()):
            item.add_marker(pytest.mark.serial)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts alike (xdist checks)
        rank = {unit: i for i, unit in enumerate(LONGEST)}
        order = {path: i for i, path in enumerate(HEAVY)}
        items.sort(key=lambda item: (rank.get(_unit(item.nodeid), len(rank)),
                                     order.get(item.nodeid.split("::", 1)[0], 0)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with GROUPS as units, and a worker's next unit sent only when one test
    of its current one is left: xdist's default, two, can queue a long module behind the two
    long last tests of an e2e module."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModuleScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

        def _reschedule(self, node) -> None:
            if (not node.shutting_down and self.workqueue
                    and self._pending_of(self.assigned_work[node]) > 1):
                return
            super()._reschedule(node)

    return ModuleScheduling(config, log)
