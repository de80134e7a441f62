"""The Airfleet plugin: its REST API and fleet view on Airflow's api-server, under /airfleet,
and the listener that gives each Airfleet run its run note.

Airflow imports every top-level file of the plugins folder; the code lives in the
``airfleet_airflow`` package (ignored by ``.airflowignore``), this file only registers it.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airfleet_airflow import listener
from airfleet_airflow.api import app


class AirfleetPlugin(AirflowPlugin):
    name = "airfleet"
    fastapi_apps = [{"app": app, "url_prefix": "/airfleet", "name": "Airfleet API"}]
    external_views = [{"name": "Fleet", "href": "/airfleet/ui/", "destination": "nav",
                       "url_route": "airfleet-fleet", "category": "Airfleet"}]
    listeners = [listener]
