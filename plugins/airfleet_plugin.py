"""The Airfleet plugin: its REST API and fleet view on Airflow's api-server, under /airfleet,
and the listener that gives each Airfleet run its run note.

Airflow imports every top-level file of the plugins folder; the code lives in the
``airfleet_airflow`` package (ignored by ``.airflowignore``), this file only registers it.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airfleet_airflow import listener


class _ApiApps:
    """``fastapi_apps``, built when Airflow reads it: in the api-server (and ``airflow
    plugins``). Every task process loads the plugins too, for their listeners; importing the
    API there (FastAPI and Airflow's own API modules) cost each task 1-1.7 s of CPU and 43 MiB,
    about half of what a task process spent."""

    def __get__(self, plugin: object, owner: type | None = None) -> list[dict]:
        from airfleet_airflow.api import app

        return [{"app": app, "url_prefix": "/airfleet", "name": "Airfleet API"}]


class AirfleetPlugin(AirflowPlugin):
    name = "airfleet"
    fastapi_apps = _ApiApps()
    external_views = [{"name": "Fleet", "href": "/airfleet/ui/", "destination": "nav",
                       "url_route": "airfleet-fleet", "category": "Airfleet"}]
    listeners = [listener]
