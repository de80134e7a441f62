"""
### Health check of the fleet

Every 5 minutes (no catchup, one run at a time), or on demand with `{"names": [...]}`.
Probes every managed cluster read-only, concurrently in this one task (at most
`AIRFLEET_HEALTH_CONCURRENCY` at once, each for at most `AIRFLEET_HEALTH_TIMEOUT_SECONDS`), and
applies Running <-> Failed with the reason. Then the endpoints the same way (ready replicas
as the engines' `/health` has them; a version whose engines are not all ready is Failed). Takes
no lease: a cluster held by a running flow is skipped, and an older observation never
overwrites a newer status.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

from airfleet_airflow import flow


@task
def check_fleet() -> dict[str, str]:
    import time
    from collections import Counter

    from airflow.sdk import get_current_context

    from airfleet import flows
    from airfleet.resources import HealthCheckConf, parse_conf
    from airfleet.store import Store
    from airfleet_airflow.clients import clients_for

    ctx = get_current_context()
    conf = parse_conf(HealthCheckConf, {"names": ctx["params"].get("names")})
    started = time.monotonic()
    outcomes = flows.health_check(Store(), f"{ctx['dag'].dag_id}/{ctx['run_id']}", conf.names,
                                  clients_for)
    for name, outcome in sorted(outcomes.items()):
        print(f"{name}: {outcome}")
    counts = Counter(o.split(":")[0] for o in outcomes.values())
    summary = (f"checked {len(outcomes)} clusters in {time.monotonic() - started:.1f} s: "
               + ", ".join(f"{n} {what}" for what, n in sorted(counts.items())))
    print(summary)
    missing = sorted(name for name, outcome in outcomes.items() if outcome == "not registered")
    flow.say("; ".join([f"{name}: not registered, nothing to check" for name in missing]
                       + [summary]))
    return outcomes


@task
def check_endpoints() -> dict[str, str]:
    import time
    from collections import Counter

    from airflow.sdk import get_current_context

    from airfleet import endpoint_flows
    from airfleet.store import Store
    from airfleet_airflow.clients import clients_for

    ctx = get_current_context()
    started = time.monotonic()
    outcomes = endpoint_flows.probe_all(Store(), f"{ctx['dag'].dag_id}/{ctx['run_id']}",
                                        clients_for, ctx["params"].get("names"))
    for key, outcome in sorted(outcomes.items()):
        print(f"{key}: {outcome}")
    counts = Counter(o.split(":")[0] for o in outcomes.values())
    summary = (f"checked {len(outcomes)} endpoint versions in {time.monotonic() - started:.1f}"
               " s" + "".join(f", {n} {what}" for what, n in sorted(counts.items())))
    print(summary)
    if outcomes:
        flow.say(summary)
    return outcomes


@dag(dag_id="airfleet_cluster_health_check", schedule=timedelta(minutes=5), catchup=False,
     max_active_runs=1, tags=flow.TAGS, params=flow.flow_params("health_check"),
     default_args=flow.DEFAULT_ARGS, doc_md=__doc__)
def airfleet_cluster_health_check():
    check_fleet() >> check_endpoints()


airfleet_cluster_health_check()
