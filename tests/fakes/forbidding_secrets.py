"""A secrets backend that writes down every look-up it is asked for (to the file named by
``AIRFLEET_LOOKUP_LOG``) and answers none: parsing a DAG file with it configured shows whether
the file reads a connection or a variable at parse time. (Raising would not do: the task SDK
swallows a backend's errors and moves on to the next backend.)"""

from __future__ import annotations

import os

from airflow.secrets import BaseSecretsBackend


def _note(kind: str, key: str) -> None:
    with open(os.environ["AIRFLEET_LOOKUP_LOG"], "a") as f:
        f.write(f"{kind} {key}\n")


class RecordLookups(BaseSecretsBackend):
    def get_conn_value(self, conn_id: str, team_name: str | None = None) -> str | None:
        _note("connection", conn_id)
        return None

    def get_variable(self, key: str, team_name: str | None = None) -> str | None:
        _note("variable", key)
        return None

    def get_config(self, key: str) -> str | None:
        return None
