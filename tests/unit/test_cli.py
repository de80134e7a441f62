"""The ``airfleet`` command line, run for real in a subprocess against a private AIRFLOW_HOME.

Data goes to stdout, errors to stderr with exit code 1. The store and the vault are also used
in-process (same database, same keys) to set up what the commands read.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from airfleet import crypto
from airfleet.resources import ClusterRequest, ClusterStatus, Phase
from airfleet.store import Store
from airfleet.store.migrations import current_revision
from airfleet.vault import Vault

AIRFLEET = shutil.which("airfleet", path=str(Path(sys.executable).parent)) or \
    str(Path(sys.executable).parent / "airfleet")
PLAINTEXT = b"\x00binary\xff secret\nwith a trailing newline\n"


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """``airfleet ARGS`` with this test's environment (AIRFLOW_HOME and friends)."""
    return subprocess.run([AIRFLEET, *args], input=stdin, capture_output=True,
                          env=dict(os.environ), timeout=120, check=False)


def ok(*args: str, stdin: bytes = b"") -> bytes:
    done = run(*args, stdin=stdin)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def fails(*args: str, stdin: bytes = b"") -> str:
    """Run a command that must fail cleanly; return its stderr."""
    done = run(*args, stdin=stdin)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == b""
    err = done.stderr.decode()
    assert err.startswith("airfleet: error: ")
    assert "Traceback" not in err
    return err


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def request(name: str) -> ClusterRequest:
    return ClusterRequest.model_validate({
        "metadata": {"name": name, "labels": {"team": "ml"}},
        "spec": {"type": "ssh", "provider": "static",
                 "config": {"ssh": {"head": "10.0.0.1",
                                    "credential": {"airflow_conn_id": "ssh_alpha"}}}},
    })


@pytest.fixture(scope="module")
def cli_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key pair made once by ``airfleet keys init --dir`` (RSA-4096 takes a second)."""
    directory = tmp_path_factory.mktemp("cli-keys") / "keys"
    done = subprocess.run([AIRFLEET, "keys", "init", "--dir", str(directory)],
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return directory


@pytest.fixture
def keys(airfleet_home: Path, cli_keys: Path) -> Path:
    directory = Path(os.environ["AIRFLEET_KEYS_DIR"])
    assert directory.parent == airfleet_home
    shutil.copytree(cli_keys, directory)
    return directory


@pytest.fixture
def store(airfleet_home: Path):
    ok("db", "migrate")
    store = Store()
    yield store
    store.dispose()


def test_the_cli_is_the_installed_entry_point():
    assert Path(AIRFLEET).is_file() and os.access(AIRFLEET, os.X_OK)


def test_db_migrate_is_idempotent(airfleet_home: Path):
    url = f"sqlite:///{airfleet_home / 'airfleet.db'}"
    for _ in range(2):
        out = ok("db", "migrate").decode()
        assert out == f"airfleet store at revision 0005 ({url})\n"
    store = Store(url)
    try:
        assert current_revision(store.engine) == "0005"
        assert store.list_clusters() == []
    finally:
        store.dispose()


def test_db_migrate_on_a_database_it_cannot_reach_fails_cleanly(airfleet_home: Path):
    err = fails("db", "migrate", "--url", "postgresql://nobody:hunter2@127.0.0.1:1/airfleet")
    assert "the store failed" in err and "airfleet db migrate" in err
    assert "hunter2" not in err


def test_a_command_before_migrate_fails_cleanly(airfleet_home: Path):
    err = fails("clusters", "list")
    assert "no such table" in err and "airfleet db migrate" in err


def test_keys_init_then_again_refuses_and_keeps_the_key(airfleet_home: Path):
    keys = Path(os.environ["AIRFLEET_KEYS_DIR"])
    out = ok("keys", "init").decode()
    private, public = keys / crypto.KEY_FILE, keys / crypto.PUBLIC_KEY_FILE
    kid = crypto.key_id(crypto.load_public_key(keys))
    assert f"(key id {kid})" in out
    assert crypto.key_id(crypto.load_private_key(keys).public_key()) == kid
    assert (mode(keys), mode(private), mode(public)) == (0o700, 0o600, 0o644)
    before = {p.name: p.read_bytes() for p in keys.iterdir()}

    err = fails("keys", "init")

    assert f"already exist at {private}" in err
    assert "airfleet keys rotate" in err
    assert {p.name: p.read_bytes() for p in keys.iterdir()} == before
    assert mode(private) == 0o600


def test_keys_public_prints_the_public_key(keys: Path):
    assert ok("keys", "public") == (keys / crypto.PUBLIC_KEY_FILE).read_bytes()


def test_seal_then_unseal_round_trips_bytes(keys: Path):
    out = ok("seal", stdin=PLAINTEXT).decode()
    envelope = out.strip()
    assert out == envelope + "\n"
    assert crypto.envelope_key_id(envelope) == crypto.key_id(crypto.load_public_key(keys))
    assert PLAINTEXT not in out.encode()

    assert ok("unseal", stdin=out.encode()) == PLAINTEXT
    assert crypto.unseal(crypto.load_private_key(keys), envelope) == PLAINTEXT


def test_seal_with_only_a_public_key_file(keys: Path, tmp_path: Path):
    public = tmp_path / "platform.pub"
    shutil.copy(keys / crypto.PUBLIC_KEY_FILE, public)
    envelope = ok("seal", "--public-key", str(public), "--dir", str(tmp_path / "no-keys"),
                  stdin=b"client side")
    assert ok("unseal", stdin=envelope) == b"client side"


def test_unseal_of_a_flipped_byte_fails_closed(keys: Path):
    envelope = ok("seal", stdin=PLAINTEXT).decode().strip()
    head, ciphertext = envelope.rsplit(".", 1)
    middle = len(ciphertext) // 2
    flipped = "B" if ciphertext[middle] == "A" else "A"
    tampered = f"{head}.{ciphertext[:middle]}{flipped}{ciphertext[middle + 1:]}"
    assert tampered != envelope

    err = fails("unseal", stdin=tampered.encode())

    assert "envelope was tampered with or is corrupt" in err
    assert PLAINTEXT.decode(errors="replace") not in err


def test_seal_with_empty_stdin_fails(keys: Path):
    err = fails("seal", stdin=b"")
    assert "nothing to seal" in err


def test_keys_rotate_keeps_stored_secrets_readable(keys: Path, store: Store):
    vault = Vault(store, keys)
    stored = {vault.put(b"first secret"): b"first secret",
              vault.put_sealed(crypto.seal(crypto.load_public_key(keys), PLAINTEXT)): PLAINTEXT}
    old_id = crypto.key_id(crypto.load_public_key(keys))

    out = ok("keys", "rotate").decode()

    new_id = crypto.key_id(crypto.load_public_key(keys))
    assert new_id != old_id
    assert f"vault key rotated to {new_id}; 2 stored secret(s) re-wrapped" in out
    assert (keys / f"{crypto.KEY_FILE}.{old_id}.old").exists()
    assert mode(keys / crypto.KEY_FILE) == 0o600
    for secret_id, plaintext in stored.items():
        assert store.get_secret(secret_id).key_id == new_id
        assert ok("unseal", "--id", secret_id) == plaintext
    err = fails("unseal", "--id", "vlt_" + "0" * 32)
    assert f"vault secret vlt_{'0' * 32} does not exist" in err


def test_clusters_list_get_and_events_as_json(store: Store):
    assert json.loads(ok("clusters", "list", "-o", "json")) == []
    assert ok("clusters", "list").decode() == "(none)\n"

    record, _ = store.register_cluster(request("alpha"), run_id="run-1", token=None)
    store.set_status("alpha", ClusterStatus(phase=Phase.RUNNING, message="ready"),
                     reason="Ready", run_id="run-2")

    [listed] = json.loads(ok("clusters", "list", "-o", "json"))
    assert {k: listed[k] for k in ("name", "type", "provider", "phase", "nodes", "generation",
                                   "observed_generation", "message")} == {
        "name": "alpha", "type": "ssh", "provider": "static", "phase": "Running", "nodes": 0,
        "generation": 1, "observed_generation": 0, "message": "ready"}
    assert datetime.fromisoformat(listed["observed_at"]).utcoffset() is not None
    assert json.loads(ok("clusters", "list", "--phase", "Failed", "-o", "json")) == []
    table = ok("clusters", "list").decode().splitlines()
    assert table[0].split() == ["NAME", "TYPE", "PROVIDER", "PHASE", "NODES", "OBSERVED_AT",
                                "MESSAGE"]
    assert table[1].split()[:4] == ["alpha", "ssh", "static", "Running"]

    got = json.loads(ok("clusters", "get", "alpha"))
    assert got["uid"] == record.uid
    assert (got["version"], got["generation"]) == (2, 1)
    assert got["metadata"] == {"name": "alpha", "labels": {"team": "ml"}}
    assert got["spec"]["config"]["ssh"]["head"] == "10.0.0.1"
    assert got["status"]["phase"] == "Running"
    assert got["status"]["last_run_id"] == "run-2"

    events = json.loads(ok("events", "alpha", "-o", "json"))
    assert [(e["from_phase"], e["to_phase"], e["reason"], e["run_id"]) for e in events] == [
        (None, "Pending", "Registered", "run-1"), ("Pending", "Running", "Ready", "run-2")]
    assert all(e["cluster"] == "alpha" for e in events)
    assert [datetime.fromisoformat(e["at"]) for e in events] == [e.at for e in
                                                                 store.events("alpha")]


def test_deleted_clusters_are_listed_only_with_all(store: Store):
    store.register_cluster(request("alpha"), run_id="run-1", token=None)
    store.transition("alpha", Phase.DELETED, reason="Deleted", run_id="run-2")
    assert json.loads(ok("clusters", "list", "-o", "json")) == []
    [listed] = json.loads(ok("clusters", "list", "--all", "-o", "json"))
    assert (listed["name"], listed["phase"]) == ("alpha", "Deleted")
    assert "cluster alpha is not registered" in fails("clusters", "get", "alpha")


def test_lease_show_and_break(store: Store):
    held = store.acquire_lease("alpha", "run-7", ttl=600)

    shown = json.loads(ok("lease", "show", "alpha", "-o", "json"))
    assert {k: shown[k] for k in ("name", "holder", "token", "held")} == {
        "name": "alpha", "holder": "run-7", "token": 1, "held": True}
    assert datetime.fromisoformat(shown["expires_at"]) == held.expires_at

    out = ok("lease", "break", "alpha").decode()
    assert "lease of run-7 (token 1) broken" in out

    lease = store.get_lease("alpha")
    assert (lease.holder, lease.held) == (None, False)
    shown = json.loads(ok("lease", "show", "alpha", "-o", "json"))
    assert (shown["holder"], shown["held"], shown["expires_at"]) == (None, False, None)
    assert "lease was not held" in ok("lease", "break", "alpha").decode()
    assert store.acquire_lease("alpha", "run-8", ttl=600).token == 2


@pytest.mark.parametrize("args", [("clusters", "get", "ghost"), ("events", "ghost"),
                                  ("lease", "show", "ghost")])
def test_an_unknown_cluster_is_an_error_naming_it(store: Store, args):
    err = fails(*args)
    assert "cluster ghost" in err


def test_a_malformed_command_line_exits_2(airfleet_home: Path):
    done = run("clusters", "frobnicate")
    assert done.returncode == 2
    assert b"invalid choice" in done.stderr


# ---- policies -----------------------------------------------------------------------------

ADD_NODE = {"action": "add_node", "cluster": {"name": "llm-a", "labels": {}, "spec": None,
                                              "phase": "Running", "status": None},
            "input": {"node": {"name": "10.0.0.9", "role": "worker"}, "workers_after": 9},
            "health": None, "now": "2026-12-02T05:00:00+00:00", "run": None, "dry_run": False}


def test_policies_list_show_the_shipped_policies_with_versions_and_bindings(store):
    ok("policies", "bind", "add_node=max_nodes", "--param", "max_nodes=8")
    rows = {r["name"]: r for r in json.loads(ok("policies", "list", "-o", "json"))}
    assert {"max_nodes", "cap_node_pool", "allowed_gpu_models", "min_workers",
            "maintenance_window", "required_labels"} <= set(rows)
    assert rows["max_nodes"]["bound"] == "add_node@*" and len(rows["max_nodes"]["version"]) == 12
    shown = json.loads(ok("policies", "show", "max_nodes"))
    assert shown["version"] == rows["max_nodes"]["version"] and "def evaluate" in shown["source"]
    assert shown["bindings"][0]["params"] == {"max_nodes": 8}
    assert "no policy 'nope'" in fails("policies", "show", "nope")
    (binding,) = json.loads(ok("policies", "bindings", "-o", "json"))
    assert (binding["action"], binding["policy"], binding["mode"]) == \
        ("add_node", "max_nodes", "subprocess")
    (entry,) = json.loads(ok("policies", "audit", "-o", "json"))
    assert entry["kind"] == "bind" and entry["actor"].startswith("cli")


def test_policies_test_evaluates_a_request_and_exits_3_on_deny(store, tmp_path):
    path = tmp_path / "request.json"
    path.write_text(json.dumps(ADD_NODE))
    denied = run("policies", "test", "max_nodes", "--request", str(path),
                 "--param", "max_nodes=8")
    assert denied.returncode == 3, denied.stderr.decode()
    decision = json.loads(denied.stdout)
    assert decision["allowed"] is False and "above max_nodes 8" in decision["reason"]
    allowed = json.loads(ok("policies", "test", "max_nodes", "--request", "-", "--mode", "local",
                            stdin=json.dumps(ADD_NODE).encode()))
    assert allowed["allowed"] is True and allowed["mode"] == "local"
    assert "not JSON" in fails("policies", "test", "max_nodes", "--request", "-", stdin=b"{")
    assert Store().policy_audit() == []  # a test decides nothing for real
