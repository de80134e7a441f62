"""``airfleet``: the operator's command line for the store, the vault, clusters, leases and
policies.

Data goes to stdout (``-o json`` where output is data), errors to stderr with exit code 1
(2 for a malformed command line).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from airfleet import config
from airfleet.errors import AirfleetError

Handler = Callable[[argparse.Namespace], int | None]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (AirfleetError, OSError, ValueError) as exc:
        print(f"airfleet: error: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        # The driver's first line only: the full text carries the SQL and its parameters.
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        print(f"airfleet: error: the store failed: {reason} (is the database reachable, and "
              "created with `airfleet db migrate`?)", file=sys.stderr)
        return 1


# ---- handlers -----------------------------------------------------------------------------

def _db_migrate(args) -> None:
    from airfleet.store import Store

    store = Store(args.url)
    print(f"airfleet store at revision {store.migrate()} ({_redact_url(store.url)})")


def _keys_init(args) -> None:
    from airfleet import crypto

    kid = crypto.init_keys(_keys(args))
    print(f"vault keys created in {_keys(args)} (key id {kid}); keep "
          f"{crypto.KEY_FILE} secret, share {crypto.PUBLIC_KEY_FILE} for sealing")


def _keys_rotate(args) -> None:
    from airfleet.store import Store
    from airfleet.vault import Vault

    new_id, count = Vault(Store(), _keys(args)).rotate()
    print(f"vault key rotated to {new_id}; {count} stored secret(s) re-wrapped; the old key "
          f"stays in {_keys(args)} as *.old until you remove it")


def _keys_public(args) -> None:
    from airfleet import crypto

    sys.stdout.write((_keys(args) / crypto.PUBLIC_KEY_FILE).read_text())


def _seal(args) -> None:
    from airfleet import crypto

    if args.public_key:
        public = crypto.load_public_key_file(Path(args.public_key))
    else:
        public = crypto.load_public_key(_keys(args))
    data = sys.stdin.buffer.read()
    if not data:
        raise AirfleetError("nothing to seal: pipe the secret on stdin")
    print(crypto.seal(public, data))


def _unseal(args) -> None:
    from airfleet import crypto

    if args.id:
        from airfleet.store import Store
        from airfleet.vault import Vault

        plaintext = Vault(Store(), _keys(args)).get(args.id)
    else:
        plaintext = crypto.unseal(crypto.load_private_key(_keys(args)),
                                  sys.stdin.read().strip())
    sys.stdout.buffer.write(plaintext)


def _clusters_list(args) -> None:
    from airfleet.store import Store

    records = Store().list_clusters(phase=args.phase, include_deleted=args.all)
    rows = [{"name": r.name, "type": r.cluster.spec.type.value,
             "provider": r.cluster.spec.provider.value, "phase": r.phase.value,
             "nodes": len(r.cluster.status.nodes), "generation": r.generation,
             "observed_generation": r.observed_generation,
             "observed_at": _iso(r.cluster.status.observed_at),
             "message": r.cluster.status.message} for r in records]
    _emit(args, rows, ["name", "type", "provider", "phase", "nodes", "observed_at", "message"])


def _clusters_get(args) -> None:
    from airfleet.store import Store

    record = Store().require_cluster(args.name)
    data = {**record.cluster.model_dump(mode="json"), "uid": record.uid,
            "generation": record.generation, "observed_generation": record.observed_generation,
            "version": record.version}
    print(json.dumps(data, indent=2))


def _events(args) -> None:
    from airfleet.store import Store

    events = Store().events(args.name)
    if not events:
        raise AirfleetError(f"no events for cluster {args.name}")
    rows = [{**asdict(e), "at": _iso(e.at)} for e in events]
    _emit(args, rows, ["at", "kind", "from_phase", "to_phase", "reason", "run_id", "message"])


def _lease_show(args) -> None:
    from airfleet.store import Store

    lease = Store().get_lease(args.name)
    if lease is None:
        raise AirfleetError(f"cluster {args.name} has never been leased")
    row = {"name": lease.name, "holder": lease.holder, "token": lease.token,
           "held": lease.held, "acquired_at": _iso(lease.acquired_at),
           "expires_at": _iso(lease.expires_at)}
    _emit(args, [row], list(row), single=True)


def _lease_break(args) -> None:
    from airfleet.store import Store

    previous = Store().break_lease(args.name)
    if previous is None or previous.holder is None:
        print(f"cluster {args.name}: lease was not held")
    else:
        print(f"cluster {args.name}: lease of {previous.holder} (token {previous.token}) "
              "broken; its further writes will be refused")


def _policies_list(args) -> None:
    from airfleet import policy
    from airfleet.store import Store

    bound: dict[str, list[str]] = {}
    for b in Store().bindings(every_scope=True):
        bound.setdefault(b.policy, []).append(f"{b.action}@{b.cluster or '*'}")
    rows = [{"name": name, "version": policy.source_version(
                policy.policy_path(name).read_text()),
             "bound": ", ".join(bound.get(name, [])),
             "summary": _summary(policy.policy_path(name))} for name in policy.available()]
    _emit(args, rows, ["name", "version", "bound", "summary"])


def _summary(path: Path) -> str:
    import ast

    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _policies_show(args) -> None:
    from airfleet import policy
    from airfleet.store import Store

    path = policy.policy_path(args.name)
    if not path.is_file():
        raise AirfleetError(f"no policy {args.name!r} in {path.parent} (policies there: "
                            f"{', '.join(policy.available()) or 'none'})")
    source = path.read_text()
    bindings = [b.to_dict() for b in Store().bindings(every_scope=True)
                if b.policy == args.name]
    print(json.dumps({"name": args.name, "path": str(path),
                      "version": policy.source_version(source), "bindings": bindings,
                      "source": source}, indent=2))


def _policies_test(args) -> None:
    """Evaluate a policy on a request (JSON file or stdin) as a binding would; exit 3 when it
    denies."""
    from airfleet import policy

    text = Path(args.request).read_text() if args.request != "-" else sys.stdin.read()
    try:
        request = json.loads(text)
    except ValueError as exc:
        raise AirfleetError(f"--request: not JSON ({exc})") from None
    if not isinstance(request, dict) or "input" not in request:
        raise AirfleetError("--request: a policy request is an object with at least "
                            "\"input\" (see policies/README.md)")
    action = args.action or request.get("action")
    binding = policy.check_binding(_binding(args, action, args.name, None))
    request = {**request, "action": action}
    decision = policy.decide([binding], action, request)[0]
    print(json.dumps(decision.to_dict(), indent=2))
    return 0 if decision.allowed else 3


def _policies_bind(args) -> None:
    from airfleet import policy
    from airfleet.store import Store

    changes: dict[str, list] = {}
    for item in args.bindings:
        action, sep, names = item.partition("=")
        if not sep:
            raise AirfleetError(f"{item!r}: write ACTION=POLICY[@VERSION][,POLICY...] "
                                "(ACTION= with nothing after it removes the binding)")
        if action in changes:
            raise AirfleetError(f"{action}: given twice; name all its policies at once, "
                                "comma-separated")
        changes[action] = []
        for spec in filter(None, names.split(",")):
            name, _, version = spec.partition("@")
            changes[action].append(policy.check_binding(
                _binding(args, action, name, version or None)))
        if not names and action not in policy.ACTIONS:
            raise AirfleetError(f"unknown action {action!r}; actions are "
                                f"{', '.join(policy.ACTIONS)}")
    store = Store()
    if args.cluster and store.get_cluster(args.cluster) is None:
        raise AirfleetError(f"--cluster: cluster {args.cluster} is not registered")
    store.set_bindings(changes, cluster=args.cluster, actor=_actor())
    scope = f"cluster {args.cluster}" if args.cluster else "every cluster"
    for action, bound in changes.items():
        what = ", ".join(b.policy for b in bound) or "nothing (unbound)"
        print(f"{action} on {scope}: {what}")


def _binding(args, action: str, name: str, version: str | None):
    from airfleet.policy import Binding

    return Binding(action=action, policy=name, cluster=getattr(args, "cluster", None),
                   version=version, mode=args.mode, timeout_seconds=args.timeout,
                   memory_mb=args.memory_mb, url=args.url, fail_open=args.fail_open,
                   params=dict(_param(p) for p in args.param))


def _param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise AirfleetError(f"--param {text!r}: write KEY=VALUE (VALUE as JSON or text)")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _policies_bindings(args) -> None:
    from airfleet.store import Store

    bindings = Store().bindings(args.cluster, every_scope=args.all)
    rows = [{**b.to_dict(), "cluster": b.cluster or "*",
             "params": json.dumps(b.params) if b.params else ""} for b in bindings]
    _emit(args, rows, ["cluster", "action", "policy", "version", "mode", "timeout_seconds",
                       "params"])


def _policies_audit(args) -> None:
    from airfleet.store import Store

    rows = Store().policy_audit(args.cluster, limit=args.limit)
    _emit(args, rows, ["at", "kind", "cluster", "action", "policy", "allowed", "run_id",
                       "actor", "reason"])


def _stability_enable(args) -> None:
    """Bind a stability suite (a policy judging check_stability) to a cluster, or to all."""
    from airfleet import policy
    from airfleet.store import Store

    store = Store()
    if args.name and store.get_cluster(args.name) is None:
        raise AirfleetError(f"cluster {args.name} is not registered")
    args.param = [*args.param, f"interval_seconds={args.interval}"]
    suite = args.suite
    if args.gx_suite:  # a GX expectation suite: kept in the binding itself
        from airfleet.policy import gx

        if args.suite != "stability":
            raise AirfleetError("give --suite (a policy) or --gx-suite (a GX suite), not both")

        try:
            text = Path(args.gx_suite).read_text()
        except OSError as exc:
            raise AirfleetError(f"--gx-suite {args.gx_suite}: {exc.strerror}") from None
        given = gx.check_suite(text, f"--gx-suite {args.gx_suite}")
        args.mode, suite = "gx", gx.policy_name(given)
        args.param.append(f"suite={json.dumps(given)}")
    binding = policy.check_binding(_binding(args, "check_stability", suite, None))
    store.set_bindings({"check_stability": [binding]}, cluster=args.name, actor=_actor())
    print(f"stability suite {suite} enabled for {_scope(args.name)}, every "
          f"{args.interval:g} s at most (at each health check past that)")


def _stability_disable(args) -> None:
    from airfleet.store import Store

    Store().set_bindings({"check_stability": []}, cluster=args.name, actor=_actor())
    print(f"stability checks disabled for {_scope(args.name)}")


def _stability_interval(args) -> None:
    from dataclasses import replace

    from airfleet.store import Store

    store = Store()
    bound = [b for b in store.bindings(args.name) if b.action == "check_stability"]
    if not bound:
        raise AirfleetError(f"no stability suite is bound for {_scope(args.name)}; enable one "
                            "first")
    store.set_bindings({"check_stability": [
        replace(b, params={**b.params, "interval_seconds": args.seconds}) for b in bound]},
        cluster=args.name, actor=_actor())
    print(f"stability checks for {_scope(args.name)}: every {args.seconds:g} s at most")


def _stability_run(args) -> None:
    from airfleet.flows import check_stability
    from airfleet.store import Store

    condition = check_stability(Store(), args.name, run_id="cli")
    print(json.dumps(condition.model_dump(mode="json"), indent=2))
    return 0 if condition.status == "True" else 3


def _scope(name: str | None) -> str:
    return f"cluster {name}" if name else "every cluster"


# ---- plumbing -----------------------------------------------------------------------------

def _keys(args) -> Path:
    return Path(args.dir) if getattr(args, "dir", None) else config.keys_dir()


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def _redact_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _emit(args, rows: list[dict[str, Any]], columns: list[str], single: bool = False) -> None:
    if args.output == "json":
        print(json.dumps(rows[0] if single else rows, indent=2, default=str))
        return
    if not rows:
        print("(none)")
        return
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="airfleet",
        description="The operator's command line for the store, the vault, clusters and leases.")
    verbs = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(group, name: str, handler: Handler, help: str, output: bool = False,
                keys: bool = False) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        if output:
            sub.add_argument("-o", "--output", choices=["table", "json"], default="table")
        if keys:
            sub.add_argument("--dir", help="vault keys folder (default: $AIRFLEET_KEYS_DIR or "
                                           "$AIRFLOW_HOME/airfleet-keys)")
        return sub

    db = verbs.add_parser("db", help="the store").add_subparsers(required=True, metavar="VERB")
    command(db, "migrate", _db_migrate, "create or upgrade the store's schema (idempotent)") \
        .add_argument("--url", help="database URL (default: $AIRFLEET_DATABASE_URL)")

    keys = verbs.add_parser("keys", help="the vault's key pair").add_subparsers(
        required=True, metavar="VERB")
    command(keys, "init", _keys_init, "create the key pair (never overwrites)", keys=True)
    command(keys, "rotate", _keys_rotate, "new key pair; re-wrap every stored secret", keys=True)
    command(keys, "public", _keys_public, "print the public key (for sealing elsewhere)",
            keys=True)

    seal = command(verbs, "seal", _seal, "encrypt stdin for the vault; print the envelope",
                   keys=True)
    seal.add_argument("--public-key", help="a public key PEM file instead of --dir")
    command(verbs, "unseal", _unseal, "decrypt an envelope from stdin, or a stored secret "
            "(--id); needs the private key", keys=True).add_argument("--id")

    clusters = verbs.add_parser("clusters", help="recorded clusters").add_subparsers(
        required=True, metavar="VERB")
    listing = command(clusters, "list", _clusters_list, "list clusters", output=True)
    listing.add_argument("--phase")
    listing.add_argument("--all", action="store_true", help="include deleted clusters")
    command(clusters, "get", _clusters_get, "one cluster as JSON").add_argument("name")

    command(verbs, "events", _events, "a cluster's history", output=True).add_argument("name")

    lease = verbs.add_parser("lease", help="per-cluster leases").add_subparsers(
        required=True, metavar="VERB")
    command(lease, "show", _lease_show, "who holds a cluster's lease", output=True) \
        .add_argument("name")
    command(lease, "break", _lease_break, "free a lease whose run is gone").add_argument("name")

    policies = verbs.add_parser("policies", help="governance policies and their bindings") \
        .add_subparsers(required=True, metavar="VERB")
    command(policies, "list", _policies_list, "the policies in the policies folder",
            output=True)
    command(policies, "show", _policies_show, "a policy's version, bindings and source") \
        .add_argument("name")
    test = command(policies, "test", _policies_test,
                   "evaluate a policy on a request as a binding would (exit 3: denied)")
    test.add_argument("name")
    test.add_argument("--request", required=True, help="a request JSON file, - for stdin")
    test.add_argument("--action", help="the action (default: the request's)")
    bind = command(policies, "bind", _policies_bind,
                   "set bindings: each ACTION given gets exactly these policies "
                   "(ACTION= unbinds); actions not given keep theirs")
    bind.add_argument("bindings", nargs="+", metavar="ACTION=POLICY[@VERSION][,POLICY...]")
    bind.add_argument("--cluster", help="bind for this cluster only (it wins over the global "
                                        "bindings of the action)")
    for sub in (test, bind):
        sub.add_argument("--mode", choices=["subprocess", "local", "http"],
                         default="subprocess")
        sub.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
        sub.add_argument("--memory-mb", type=int, default=512,
                         help="subprocess mode: address-space limit (default 512)")
        sub.add_argument("--url", help="http mode: the policy server's URL")
        sub.add_argument("--fail-open", action="store_true",
                         help="http mode: allow when the server does not answer")
        sub.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                         help="a policy parameter (VALUE as JSON, else text); repeatable")
    shown = command(policies, "bindings", _policies_bindings, "the bindings of a scope",
                    output=True)
    shown.add_argument("--cluster", help="this cluster's bindings (default: the global ones)")
    shown.add_argument("--all", action="store_true", help="every scope")
    audit = command(policies, "audit", _policies_audit,
                    "the audit trail: binding changes and decisions", output=True)
    audit.add_argument("--cluster")
    audit.add_argument("--limit", type=int, default=100)

    stability = verbs.add_parser("stability", help="stability checks run by the health checks") \
        .add_subparsers(required=True, metavar="VERB")
    enable = command(stability, "enable", _stability_enable,
                     "judge a cluster's (or, without NAME, every cluster's) health data with a "
                     "stability suite")
    enable.add_argument("name", nargs="?")
    enable.add_argument("--suite", default="stability", help="the suite: a policy judging "
                        "check_stability (default: the shipped stability)")
    enable.add_argument("--gx-suite", metavar="FILE.json",
                        help="the suite: a Great Expectations 1.x expectation suite (JSON, as "
                        "GX writes it) run against the node table of each health check")
    enable.add_argument("--interval", type=float, default=0.0,
                        help="seconds between evaluations (default 0: every health check)")
    enable.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a suite parameter, e.g. min_ready_ratio=0.9; repeatable")
    enable.add_argument("--mode", choices=["subprocess", "local"], default="subprocess")
    enable.add_argument("--timeout", type=float, default=10.0)
    enable.add_argument("--memory-mb", type=int, default=512)
    enable.set_defaults(url=None, fail_open=False)
    command(stability, "disable", _stability_disable, "remove a cluster's own suite (a "
            "global one, if enabled, then applies) or, without NAME, the global suite") \
        .add_argument("name", nargs="?")
    interval = command(stability, "interval", _stability_interval,
                       "set the seconds between evaluations")
    interval.add_argument("name", nargs="?")
    interval.add_argument("seconds", type=float)
    command(stability, "run", _stability_run, "evaluate a cluster's suite now on its recorded "
            "health data; print the Stable condition (exit 3: Unstable)").add_argument("name")
    return parser


if __name__ == "__main__":
    sys.exit(main())
