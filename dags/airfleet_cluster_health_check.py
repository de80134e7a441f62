"""
### Health check of the fleet

Every 5 minutes (no catchup, one run at a time), or on demand with `{"names": [...]}`.
Probes every managed cluster read-only and applies Running <-> Failed with the reason. The
fleet is split into `AIRFLEET_HEALTH_SHARDS` parts by a stable hash of the cluster name, one
`check_fleet` task instance each, which Airflow runs at once (on as many worker slots, or
Celery workers); each probes its part concurrently (at most `AIRFLEET_HEALTH_CONCURRENCY` at
once, each for at most `AIRFLEET_HEALTH_TIMEOUT_SECONDS`). Then `check_endpoints` probes the
endpoints the same way (ready replicas as the engines' `/health` has them; a version whose
engines are not all ready is Failed) and tells the run note what both found. Takes no lease: a
cluster held by a running flow is skipped, and an older observation never overwrites a newer
status.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

from airfleet import config
from airfleet_airflow import flow

# Read as the DAG is parsed and recorded in it (partial): every part of one run splits the
# fleet the same way, whatever a worker's environment says.
SHARDS = config.health_shards()


@task
def check_fleet(shard: int, shards: int) -> dict[str, str]:
    import time

    from airflow.sdk import get_current_context

    from airfleet import flows
    from airfleet.resources import HealthCheckConf, parse_conf
    from airfleet.store import Store
    from airfleet_airflow.clients import clients_for, credentials_read_once

    ctx = get_current_context()
    conf = parse_conf(HealthCheckConf, {"names": ctx["params"].get("names")})
    started = time.monotonic()
    with credentials_read_once():  # clusters sharing an SSH key: it is read once
        outcomes = flows.health_check(Store(), f"{ctx['dag'].dag_id}/{ctx['run_id']}",
                                      conf.names, clients_for, shard=(shard, shards))
    for name, outcome in sorted(outcomes.items()):
        print(f"{name}: {outcome}")
    print(f"part {shard + 1} of {shards}: checked {len(outcomes)} clusters in "
          f"{time.monotonic() - started:.1f} s: {_counts(outcomes)}")
    return outcomes


@task
def check_endpoints(parts: list[dict[str, str]]) -> dict[str, str]:
    """The endpoints; then the run note: what every part of the fleet's check found."""
    import time

    from airflow.sdk import get_current_context

    from airfleet import endpoint_flows
    from airfleet.store import Store
    from airfleet_airflow.clients import clients_for, credentials_read_once

    ctx = get_current_context()
    started = time.monotonic()
    with credentials_read_once():
        outcomes = endpoint_flows.probe_all(Store(), f"{ctx['dag'].dag_id}/{ctx['run_id']}",
                                            clients_for, ctx["params"].get("names"))
    for key, outcome in sorted(outcomes.items()):
        print(f"{key}: {outcome}")
    summary = (f"checked {len(outcomes)} endpoint versions in {time.monotonic() - started:.1f}"
               f" s: {_counts(outcomes)}")
    print(summary)
    # One read of every part (a slice): iterating reads part by part until one is missing,
    # which Airflow logs as an error ("XCom not found ... offset=N") in every check.
    fleet = {name: outcome for part in parts[:] for name, outcome in part.items()}
    missing = sorted(name for name, outcome in fleet.items() if outcome == "not registered")
    flow.say("; ".join([f"{name}: not registered, nothing to check" for name in missing]
                       + [f"checked {len(fleet)} clusters: {_counts(fleet)}"]
                       + ([summary] if outcomes else [])))
    return outcomes


def _counts(outcomes: dict[str, str]) -> str:
    """``{name: "skipped: held by ..."}`` -> ``"1 skipped"`` (how many of each outcome)."""
    from collections import Counter

    counts = Counter(o.split(":")[0] for o in outcomes.values())
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "none"


@dag(dag_id="airfleet_cluster_health_check", schedule=timedelta(minutes=5), catchup=False,
     max_active_runs=1, tags=flow.TAGS, params=flow.flow_params("health_check"),
     default_args=flow.DEFAULT_ARGS, doc_md=__doc__)
def airfleet_cluster_health_check():
    check_endpoints(check_fleet.partial(shards=SHARDS).expand(shard=list(range(SHARDS))))


airfleet_cluster_health_check()
