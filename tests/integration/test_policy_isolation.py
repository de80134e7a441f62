"""Subprocess mode's sandbox against real processes: real bwrap, a real vault key pair, a real
SQLite store, a real Airflow home, and a policy that tries to read them.

Where this machine allows namespaces (Linux; as root, or with unprivileged user namespaces)
the sandbox must be there: a missing or broken bwrap fails these tests, it never skips them.
Where it does not, the tests check that Airfleet says subprocess mode is not isolated.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from airfleet import crypto, policy
from airfleet.policy import Binding, sandbox
from airfleet.store import Store
from airfleet.vault import Vault

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROOT_WORKER = os.geteuid() == 0
REQUEST = {"action": "add_node", "cluster": {"name": "llm-a", "labels": {}, "spec": None,
                                             "phase": "Running", "status": None},
           "input": {"node": {"name": "10.0.0.3", "role": "worker"}, "workers_after": 2},
           "health": None, "now": "2026-12-02T05:00:00+00:00", "run": None, "dry_run": False}
# Reads every path it is given and lists every folder; reports it all as its reason.
SNOOP = '''import json, os, socket


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("latin-1")
    except OSError as exc:
        return f"denied: {type(exc).__name__}"


def listing(path):
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        return f"denied: {type(exc).__name__}"


def connect(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return "connected"
    except OSError as exc:
        return f"denied: {type(exc).__name__}"


def evaluate(request):
    p = request["params"]
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return {"allowed": True, "reason": json.dumps({
        "files": {name: read(path) for name, path in p.get("files", {}).items()},
        "dirs": {name: listing(path) for name, path in p.get("dirs", {}).items()},
        "net": connect(p["port"]) if "port" in p else None,
        "cwd": os.getcwd(), "cwd_entries": os.listdir("."), "uid": os.getuid(),
        "no_new_privs": status["NoNewPrivs"].strip(), "caps": status["CapEff"].strip(),
        "bounding": status["CapBnd"].strip()})}
'''


def _namespaces_allowed(user: list[str] | None = None) -> bool:
    """Whether this kernel lets ``user`` (default: this process) make the namespaces the
    sandbox needs, asked of util-linux's unshare rather than of the code under test."""
    if not sys.platform.startswith("linux"):
        return False
    flags = ["--mount", "--pid", "--net", "--fork"]
    as_user = user or []
    if user or not ROOT_WORKER:
        flags = ["--user", "--map-root-user", *flags]
    return subprocess.run([*as_user, "unshare", *flags, "true"], capture_output=True,
                          timeout=30).returncode == 0


EXPECTED = _namespaces_allowed()


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside /tmp, /var/tmp, /run and $HOME, which the sandbox replaces wholesale:
    secrets planted here are kept from the policy by their own hidden-path mounts only."""
    base = next((b for b in ("/srv", "/opt", "/var/lib") if os.access(b, os.W_OK)), None)
    if base is None:  # a developer's machine: tmp_path is all there is
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="airfleet-isolation-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def planted(outside, monkeypatch) -> dict:
    """A vault key pair (``airfleet keys init``), a store holding a canary secret, and an
    Airflow home whose airflow.cfg holds a canary; all world-readable, so that only the
    sandbox, not file modes, can keep them from a policy."""
    canary = f"CANARY-{uuid.uuid4().hex}"
    home, keys, store_dir = outside / "airflow-home", outside / "keys", outside / "store"
    for folder in (home, store_dir):
        folder.mkdir()
    (home / "airflow.cfg").write_text(f"[core]\nfernet_key = {canary}-fernet\n")
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    monkeypatch.setenv("AIRFLEET_KEYS_DIR", str(keys))
    monkeypatch.setenv("AIRFLEET_DATABASE_URL", f"sqlite:///{store_dir / 'airfleet.db'}")
    crypto.init_keys(keys)
    store = Store()
    store.migrate()
    Vault(store, keys).put(b"the secret", description=f"{canary}-store")
    store.engine.dispose()
    subprocess.run(["chmod", "-R", "a+rX", str(outside)], check=True)
    key = keys / crypto.KEY_FILE
    files = {"key": key, "store": store_dir / "airfleet.db", "airflow_cfg": home / "airflow.cfg"}
    assert f"{canary}-store".encode() in files["store"].read_bytes()  # the canary is really there
    return {"canary": canary, "key_pem": key.read_text().strip().splitlines()[1],
            "files": {k: str(v) for k, v in files.items()},
            "dirs": {"keys": str(keys), "store": str(store_dir), "airflow_home": str(home)}}


@pytest.fixture
def folder(tmp_path) -> Path:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "snoop.py").write_text(SNOOP)
    return folder


def snoop(folder: Path, mode: str = "subprocess", **params) -> tuple[policy.Decision, dict]:
    binding = Binding("add_node", "snoop", mode=mode, params=params)
    (decision,) = policy.decide([binding], "add_node", REQUEST, folder)
    assert decision.allowed, decision.reason
    return decision, json.loads(decision.reason)


def isolated(decision: policy.Decision) -> bool:
    """The decision's own word; it must match what this machine allows."""
    assert decision.isolation.startswith("isolated:") is EXPECTED, (
        f"this machine allows namespaces: subprocess mode must be sandboxed here "
        f"(install bubblewrap: .ci/run does); it reports {decision.isolation!r}"
        if EXPECTED else f"no namespaces here, yet the runner claims {decision.isolation!r}")
    return EXPECTED


def test_the_sandbox_is_there_wherever_the_machine_allows_it():
    box = sandbox.current()
    if EXPECTED:
        assert box.isolated and box.status.startswith("isolated: bwrap sandbox"), box.status
        who = "uid 65534" if ROOT_WORKER else "in a user namespace"
        assert who in box.status
    else:
        assert not box.isolated and box.status.startswith("not isolated:"), box.status


def test_a_policy_cannot_read_the_vault_key_the_store_or_the_airflow_home(planted, folder):
    where = {"files": planted["files"], "dirs": planted["dirs"]}  # never the canary itself
    leaked_locally, _ = snoop(folder, mode="local", **where)  # the control: it would read them
    assert planted["canary"] in leaked_locally.reason and planted["key_pem"] in \
        leaked_locally.reason
    decision, seen = snoop(folder, **where)
    if not isolated(decision):
        return
    assert planted["canary"] not in decision.reason
    assert planted["key_pem"] not in decision.reason and "PRIVATE KEY" not in decision.reason
    for name, content in seen["files"].items():
        assert content.startswith("denied: "), f"{name} was readable: {content[:80]!r}"
    for name, entries in seen["dirs"].items():  # an empty folder in its place, or none
        assert entries in ([], "denied: FileNotFoundError"), f"{name}: {entries}"


ESCAPE = """import ctypes, json, os


def evaluate(request):
    libc = ctypes.CDLL(None, use_errno=True)
    steps = []
    # Its own user and mount namespaces (the kernel may allow them), then the hiding tmpfs off.
    if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
        steps.append("unshare: " + os.strerror(ctypes.get_errno()))
    for path in request["params"]["dirs"].values():
        if libc.umount2(path.encode(), 2) != 0:  # MNT_DETACH
            steps.append(f"umount {path}: " + os.strerror(ctypes.get_errno()))
    found = {}
    for name, path in request["params"]["files"].items():
        try:
            found[name] = open(path, "rb").read().decode("latin-1")
        except OSError as exc:
            found[name] = f"denied: {type(exc).__name__}"
    return {"allowed": True, "reason": json.dumps({"steps": steps, "files": found})}
"""


def test_a_policy_cannot_unmount_what_hides_the_secrets(planted, folder):
    (folder / "escape.py").write_text(ESCAPE)
    binding = Binding("add_node", "escape",
                      params={"files": planted["files"], "dirs": planted["dirs"]})
    (decision,) = policy.decide([binding], "add_node", REQUEST, folder)
    assert decision.allowed, decision.reason
    if not isolated(decision):
        return
    assert planted["canary"] not in decision.reason and planted["key_pem"] not in decision.reason
    seen = json.loads(decision.reason)
    assert all(v.startswith("denied: ") for v in seen["files"].values()), seen
    assert len(seen["steps"]) >= len(planted["dirs"]), seen  # each umount refused (locked)


def test_the_policy_starts_in_an_empty_folder_as_nobody_with_no_privileges(folder):
    decision, seen = snoop(folder)
    if not isolated(decision):
        return
    assert seen["cwd"] == "/tmp/policy" and seen["cwd_entries"] == []
    assert seen["no_new_privs"] == "1"
    assert int(seen["caps"], 16) == 0 and int(seen["bounding"], 16) == 0
    assert seen["uid"] == (65534 if ROOT_WORKER else os.geteuid())


def test_root_only_files_elsewhere_stay_closed_to_a_policy_of_a_root_worker(outside, folder):
    if not ROOT_WORKER:
        pytest.skip("a worker that is not root runs policies as its own uid (documented)")
    private = outside / "root-only.txt"
    private.write_text("root-only canary")
    private.chmod(0o600)
    decision, seen = snoop(folder, files={"root_only": str(private)})
    if isolated(decision):
        assert seen["files"]["root_only"] == "denied: PermissionError"


def test_a_policy_has_no_network(folder):
    with socket.create_server(("127.0.0.1", 0)) as server:
        decision, seen = snoop(folder, port=server.getsockname()[1])
    if isolated(decision):
        assert seen["net"].startswith("denied: ")


def test_a_timeout_kills_the_policy_and_everything_it_started(folder):
    marker = f"airfleet-orphan-{uuid.uuid4().hex}"
    (folder / "spawner.py").write_text(
        "import subprocess, time\n\ndef evaluate(request):\n"
        f"    subprocess.Popen(['/bin/sh', '-c', 'sleep 300; : {marker}'],\n"
        "                     start_new_session=True)  # out of reach of a process-group kill\n"
        "    time.sleep(300)\n")
    started = time.monotonic()
    (decision,) = policy.decide([Binding("add_node", "spawner", timeout_seconds=1.5)],
                                "add_node", REQUEST, folder)
    assert time.monotonic() - started < 5
    assert not decision.allowed and "did not answer within 1.5 s (stopped)" in decision.reason
    isolated(decision)
    time.sleep(0.5)  # the kernel tears the PID namespace down after its init dies
    assert not _running(marker), "still running after the timeout"


def test_the_policy_dies_with_the_worker(tmp_path):
    if not EXPECTED:
        pytest.skip("unsandboxed, a policy may outlive its worker (policies/README.md)")
    folder = tmp_path / f"airfleet-worker-{uuid.uuid4().hex}"  # in the child's command line
    folder.mkdir()
    (folder / "sleepy.py").write_text("import time\n\ndef evaluate(request):\n"
                                      "    time.sleep(300)\n")
    worker = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from airfleet import policy\n"
        "b = policy.Binding('add_node', 'sleepy', timeout_seconds=300)\n"
        "policy.decide([b], 'add_node', {'input': {}}, Path(sys.argv[1]))"), str(folder)])
    try:
        deadline = time.monotonic() + 30
        while not _running(folder.name, "child.py") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _running(folder.name, "child.py"), "the policy never started"
    finally:
        worker.kill()
        worker.wait()
    time.sleep(1)
    assert not _running(folder.name), "the policy outlived its worker"


def test_the_memory_limit_holds_in_the_sandbox(folder):
    (folder / "hog.py").write_text("def evaluate(request):\n    data = bytearray(2 << 30)\n"
                                   "    return {'allowed': True, 'reason': str(len(data))}\n")
    (decision,) = policy.decide([Binding("add_node", "hog", memory_mb=256)], "add_node",
                                REQUEST, folder)
    isolated(decision)
    assert not decision.allowed and "ran out of memory (limit 256 MB)" in decision.reason


DECIDE = """import json, sys
from pathlib import Path
from airfleet import policy
params = json.loads(sys.argv[2])
binding = policy.Binding("add_node", "snoop", params=params)
(decision,) = policy.decide([binding], "add_node", json.loads(sys.argv[3]), Path(sys.argv[1]))
print(json.dumps(decision.to_dict()))
"""


@pytest.fixture
def nobodys(outside) -> dict:
    """An Airflow home and a vault keys folder that ``nobody`` owns, with canaries, and a
    folder with the snoop policy: for a worker running as ``nobody``."""
    home, keys, folder = outside / "airflow-home", outside / "keys", outside / "policies"
    for path in (home, keys, folder):
        path.mkdir()
    canary = f"CANARY-{uuid.uuid4().hex}"
    (home / "airflow.cfg").write_text(canary)
    (keys / crypto.KEY_FILE).write_text(canary)
    (folder / "snoop.py").write_text(SNOOP)
    subprocess.run(["chown", "-R", "65534:65534", str(outside)], check=True)
    outside.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONPATH": str(ROOT / "include"),
           "AIRFLOW_HOME": str(home), "AIRFLEET_KEYS_DIR": str(keys),
           "AIRFLEET_DATABASE_URL": f"sqlite:///{home / 'airfleet.db'}"}
    files = {"cfg": str(home / "airflow.cfg"), "key": str(keys / crypto.KEY_FILE)}
    return {"canary": canary, "env": env, "folder": folder, "params": {"files": files}}


def _decide_as(prefix: list[str], python: str, nobodys: dict) -> dict:
    """A decision of the snoop policy by a worker started with ``prefix``."""
    done = subprocess.run([*prefix, python, "-c", DECIDE, str(nobodys["folder"]),
                           json.dumps(nobodys["params"]), json.dumps(REQUEST)],
                          env=nobodys["env"], cwd="/", capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    decision = json.loads(done.stdout)
    assert decision["allowed"], decision["reason"]  # isolated or not, the policy decides
    return decision


def test_a_worker_that_is_not_root_is_sandboxed_in_a_user_namespace_or_says_it_is_not(
        nobodys):
    """The official Airflow image runs its worker as uid 50000: this runs the runner as
    ``nobody`` (Debian's python3, the airfleet package by path) with secrets ``nobody`` owns,
    so that file modes would let it read them."""
    if not ROOT_WORKER:
        pytest.skip("this process is not root: the other tests run the non-root path already")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    python = shutil.which("python3", path="/usr/bin:/bin")
    decision = _decide_as(as_nobody, python, nobodys)
    expected = _namespaces_allowed(as_nobody)
    assert decision["isolation"].startswith("isolated:") is expected, decision["isolation"]
    if expected:
        assert "uid 65534 in a user namespace" in decision["isolation"]
        assert nobodys["canary"] not in decision["reason"]
        assert json.loads(decision["reason"])["uid"] == 65534


def test_where_namespaces_are_refused_subprocess_mode_says_it_is_not_isolated(nobodys):
    """A worker in a user namespace that may not nest another (bwrap --disable-userns, as
    under a container profile that refuses them): the policy still decides, the decision
    says ``not isolated``, and that is the truth: the policy read the canary."""
    if not EXPECTED:
        pytest.skip("this whole machine refuses namespaces: every test here checks that")
    no_namespaces = [shutil.which("bwrap"), "--unshare-user", "--uid", "65534", "--gid",
                     "65534", "--disable-userns", "--ro-bind", "/", "/", "--dev", "/dev",
                     "--proc", "/proc", "--unshare-pid", "--die-with-parent", "--"]
    python = sys.executable if ROOT_WORKER else shutil.which("python3", path="/usr/bin:/bin")
    decision = _decide_as(no_namespaces, python, nobodys)
    assert decision["isolation"].startswith("not isolated: bwrap cannot run a policy here"), \
        decision["isolation"]
    assert nobodys["canary"] in decision["reason"]


def _running(*markers: str) -> list[Path]:
    """The processes whose command line holds every marker."""
    return [p for p in Path("/proc").glob("[0-9]*")
            if all(m in _cmdline(p) for m in markers)]


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
