"""Airfleet core: resources, lifecycle, store, vault and backends.

This package imports no Airflow module, so it is fast to import and test, and the CLI, the
plugins and the DAGs all share it.
"""

__version__ = "0.1.0"
