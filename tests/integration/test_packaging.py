"""The package declares what it imports: installed into a new venv from pyproject.toml's
dependencies alone (every extra), with none of the development venv's packages and no Airflow,
every module of ``airfleet`` and ``airfleet_mock_engine`` imports.

Offline: uv installs from its cache, which `make setup` filled with the same pinned versions
(constraints.txt); a dependency the cache lacks fails the install, naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).parent / "uv"
IMPORT_ALL = """
import importlib, json, pkgutil, sys
seen, broken = [], {}
for top in ("airfleet", "airfleet_mock_engine"):
    package = importlib.import_module(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        if info.name == "airfleet.migrations.env":  # Alembic's script: runs inside alembic
            continue
        try:
            importlib.import_module(info.name)
            seen.append(info.name)
        except Exception as exc:
            broken[info.name] = f"{type(exc).__name__}: {exc}"
import airfleet
print(json.dumps({"seen": seen, "broken": broken, "from": airfleet.__file__,
                  "airflow": importlib.util.find_spec("airflow") is not None}))
"""


def test_every_module_imports_from_the_declared_dependencies_alone(tmp_path):
    assert UV.exists(), f"{UV} is missing: run `make setup`"
    venv = tmp_path / "venv"
    subprocess.run([str(UV), "venv", "-q", "-p", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    # A copy of the source tree: building the wheel writes build/ and *.egg-info beside it.
    source = tmp_path / "src"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "pyproject.toml", "include"],
                           check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((ROOT / name).read_bytes())
    install = subprocess.run(
        [str(UV), "pip", "install", "-q", "--offline", "-p", str(python),
         "-c", str(ROOT / "constraints.txt"), f"{source}[all]"],
        capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]

    result = subprocess.run([str(python), "-I", "-c", IMPORT_ALL], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["broken"] == {}
    assert str(venv) in found["from"]  # the installed copy, not this checkout
    assert not found["airflow"]  # nothing of the development venv came along
    assert {"airfleet.backends.ssh.remote", "airfleet.backends.kubernetes.aks",
            "airfleet.backends.kubernetes.eks", "airfleet.policy.runner", "airfleet.cli",
            "airfleet_mock_engine.serve"} <= set(found["seen"])
    print(f"{len(found['seen'])} modules imported")
