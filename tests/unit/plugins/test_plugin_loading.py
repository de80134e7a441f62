"""What loading the Airfleet plugin costs the processes that are not the api-server.

Every task process loads the plugins folder for the plugins' listeners (Airflow's
``airflow.sdk.listener.get_listener_manager``), as do the scheduler, dag-processor and
triggerer. Only the api-server serves the plugin's FastAPI app, so only Airflow's reading of
``fastapi_apps`` may import it: an import at load time cost every task 1-1.7 s of CPU and
43 MiB (py-spy of a Celery worker during the scale-out tests: half of its samples).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

# Run in a fresh interpreter: this test process has imported the API long before.
LOAD_AS_A_TASK_DOES = """
import json, sys
from airflow.sdk.listener import get_listener_manager

manager = get_listener_manager()
names = [getattr(hook, "__name__", "") for hook in manager.pm.get_plugins()]
print(json.dumps({"listener": "airfleet_airflow.listener" in names,
                  "api": "airfleet_airflow.api" in sys.modules,
                  "fastapi": "fastapi" in sys.modules}))
"""

READ_AS_THE_API_SERVER_DOES = """
import json
from airflow.plugins_manager import get_fastapi_plugins

apps, _ = get_fastapi_plugins()
print(json.dumps([{"prefix": a["url_prefix"], "routes": len(a["app"].routes)} for a in apps]))
"""


def _run(code: str):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "plugins"), str(ROOT / "include"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_task_process_gets_the_listener_without_importing_the_api():
    loaded = _run(LOAD_AS_A_TASK_DOES)
    assert loaded == {"listener": True, "api": False, "fastapi": False}


def test_the_api_server_gets_the_app_under_airfleet():
    apps = _run(READ_AS_THE_API_SERVER_DOES)
    assert [a["prefix"] for a in apps] == ["/airfleet"] and apps[0]["routes"] > 5
