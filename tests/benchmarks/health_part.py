"""One part of a sharded health check, in a process of its own as each ``check_fleet`` task
instance of the DAG is: ``python -m tests.benchmarks.health_part DB_URL INDEX PARTS
CONCURRENCY TIMEOUT``. Prints ``ready``; then for each run id it reads from stdin, checks its
part of the fleet (plain HTTP to the simulated dashboards, as test_health_fleet.py says) and
prints one JSON line: wall and CPU seconds, outcomes, this process's peak RSS (MiB)."""

from __future__ import annotations

import json
import sys
import time

from airfleet import flows
from airfleet.store import Store
from tests.benchmarks.test_health_fleet import DIRECT, peak_mib


def main(url: str, index: str, parts: str, concurrency: str, timeout: str) -> None:
    store = Store(url)
    print("ready", flush=True)
    for line in sys.stdin:
        started, cpu = time.monotonic(), time.process_time()
        outcomes = flows.health_check(store, line.strip(), clients_for=DIRECT,
                                      concurrency=int(concurrency), timeout=float(timeout),
                                      shard=(int(index), int(parts)))
        print(json.dumps({"wall": time.monotonic() - started, "cpu": time.process_time() - cpu,
                          "outcomes": outcomes, "peak_rss_mib": peak_mib()}), flush=True)
    store.dispose()


if __name__ == "__main__":
    main(*sys.argv[1:])
