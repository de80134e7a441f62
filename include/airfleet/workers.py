"""Which worker ran a task (``[core] hostname_callable``, see deploy/airflow.env).

Airflow records the host name in every task instance. Several Celery workers on one host (the
native scale-out mode, ``bin/airfleet-dev run --scale-out``) share it, so the worker's own name
(``AIRFLEET_WORKER_NAME``, set per worker) goes in front; in a container it is unset and the
host name, the container's own, already tells workers apart."""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    host = socket.getfqdn()
    worker = os.environ.get("AIRFLEET_WORKER_NAME")
    return f"{worker}.{host}" if worker else host
