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
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
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
