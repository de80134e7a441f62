"""``airfleet``: the operator's command line for the store, the vault, clusters and leases.

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
    return parser


if __name__ == "__main__":
    sys.exit(main())
