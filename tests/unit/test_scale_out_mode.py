"""`bin/airfleet-dev run --scale-out`: its settings are docker-compose.yaml's, and a missing
PostgreSQL or Redis stops it before anything starts, naming which and how to start it.
(The stack itself runs in tests/e2e/test_scale_out.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT / "deploy" / "airflow.env"


def shared_settings() -> dict[str, str]:
    lines = [line.strip() for line in SHARED.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def dev(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AIRFLEET"))}
    return subprocess.run([str(ROOT / "bin" / "airfleet-dev"), *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env={**clean, "AIRFLEET_AIRFLOW_HOME": str(home), **env})


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket goes


def test_compose_and_the_native_mode_read_one_list_of_settings(tmp_path):
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    settings = shared_settings()
    assert settings["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    for name, svc in compose["services"].items():
        if not name.startswith("airflow-"):
            continue
        assert svc["env_file"][0] == "deploy/airflow.env", name
        # compose's `environment` would win over the file: no shared key may appear there.
        overridden = set(settings) & set(svc.get("environment") or {})
        assert not overridden, f"{name} overrides shared settings {overridden}"

    out = dev("env", "--scale-out", home=tmp_path)
    assert out.returncode == 0, out.stderr
    exported = dict(line.removeprefix("export ").split("=", 1)
                    for line in out.stdout.splitlines() if line.startswith("export "))
    for key, value in settings.items():
        assert exported.get(key) == value, f"--scale-out exports {key}={exported.get(key)!r}"
    assert exported["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert exported["AIRFLEET_DATABASE_URL"].endswith("/airfleet_scale_out_store")


@pytest.mark.parametrize("down, named", [
    ({"AIRFLEET_PG_URL": "postgresql://postgres@127.0.0.1:{port}"}, ["PostgreSQL"]),
    ({"AIRFLEET_REDIS_URL": "redis://127.0.0.1:{port}/0"}, ["Redis"]),
    ({"AIRFLEET_PG_URL": "postgresql://postgres@127.0.0.1:{port}",
      "AIRFLEET_REDIS_URL": "redis://127.0.0.1:{port}/0"}, ["PostgreSQL", "Redis"]),
])
def test_an_unreachable_postgres_or_redis_is_named_and_nothing_starts(tmp_path, down, named):
    port = closed_port()
    env = {key: value.format(port=port) for key, value in down.items()}
    out = dev("run", "--scale-out", home=tmp_path / "home",
              AIRFLEET_PORT=str(closed_port()), AIRFLEET_PG_DB="airfleet_never_created", **env)

    assert out.returncode == 1, out.stderr
    for service in named:
        assert f"{service} is not reachable at " in out.stderr, out.stderr
    assert f"127.0.0.1:{port}" in out.stderr
    assert ("AIRFLEET_PG_URL" in out.stderr) == ("PostgreSQL" in named)
    assert ("AIRFLEET_REDIS_URL" in out.stderr) == ("Redis" in named)
    assert "nothing was started" in out.stderr
    # Nothing half-made: no home (no migration ran), no supervisor, no database.
    assert not (tmp_path / "home").exists()
    if "PostgreSQL" not in named:
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres") as pg:
            assert not pg.execute("SELECT 1 FROM pg_database WHERE datname LIKE "
                                  "'airfleet_never_created%'").fetchone()


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers must be a positive integer, not '0'"),
    (["--workers", "two"], "--workers must be a positive integer, not 'two'"),
    (["--scale"], "unknown option --scale"),
])
def test_bad_options_are_refused_before_anything(tmp_path, args, message):
    out = dev("run", "--scale-out", *args, home=tmp_path / "home")
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not (tmp_path / "home").exists()
