"""The policy engine: bind-time checks, the three execution modes against real interpreters and
a real HTTP server, and what a policy may change."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from airfleet import policy
from airfleet.errors import InvalidRequest
from airfleet.policy import Binding

ALLOW = 'def evaluate(request):\n    return {"allowed": True, "reason": "fine"}\n'
REQUEST = {"action": "add_node", "cluster": {"name": "llm-a", "labels": {}, "spec": None,
                                             "phase": "Running", "status": None},
           "input": {"node": {"name": "10.0.0.3", "role": "worker"}, "workers_after": 2},
           "health": None, "now": "2026-12-02T05:00:00+00:00", "run": None, "dry_run": False}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    policies = {
        "allow": ALLOW,
        "deny": 'def evaluate(request):\n    return {"allowed": False, '
                '"reason": f"no {request[\'input\'][\'node\'][\'name\']}"}\n',
        "sleeper": "import time\n\ndef evaluate(request):\n    time.sleep(3600)\n",
        "raiser": "def evaluate(request):\n    raise RuntimeError('boom')\n",
        "chatty": "import os\n\ndef evaluate(request):\n    print('garbage {')\n"
                  "    os.write(1, b'more garbage')\n"
                  "    return {'allowed': True, 'reason': 'said a lot'}\n",
        "shrug": "def evaluate(request):\n    return 'yes'\n",
        "quitter": "import os\n\ndef evaluate(request):\n    os._exit(0)\n",
        "hog": "def evaluate(request):\n    data = bytearray(2 << 30)\n"
               "    return {'allowed': True, 'reason': str(len(data))}\n",
        "env": "import json, os\n\ndef evaluate(request):\n"
               "    return {'allowed': True, 'reason': json.dumps(dict(os.environ))}\n",
        "params": "def evaluate(request):\n    limit = request['params'].get('max', 1)\n"
                  "    after = request['input']['workers_after']\n"
                  "    return {'allowed': after <= limit, 'reason': f'{after} vs {limit}'}\n",
        "shrink": "def evaluate(request):\n    to = dict(request['input']['to'], desired=1)\n"
                  "    return {'allowed': True, 'reason': 'lowered',\n"
                  "            'input': dict(request['input'], to=to)}\n",
        "sneaky": "def evaluate(request):\n"
                  "    return {'allowed': True, 'reason': 'x',\n"
                  "            'input': dict(request['input'], workers_after=0)}\n",
        "object": "class D:\n    allowed = False\n    reason = 'as an object'\n\n"
                  "def evaluate(request):\n    return D()\n",
        "no_entry": "def judge(request):\n    return {}\n",
    }
    for name, source in policies.items():
        (tmp_path / f"{name}.py").write_text(source)
    return tmp_path


def decide(folder: Path, name: str, request=REQUEST, **binding) -> policy.Decision:
    b = Binding(action=request["action"], policy=name, **binding)
    (decision,) = policy.decide([b], request["action"], request, folder)
    return decision


# ---- bind time -----------------------------------------------------------------------------

@pytest.mark.parametrize(("binding", "message"), [
    (Binding("add_nodes", "allow"), "unknown action 'add_nodes'"),
    (Binding("add_node", "missing"), "no policy 'missing' in"),
    (Binding("add_node", "no_entry"), "has no module-level evaluate(request)"),
    (Binding("add_node", "allow", version="000000000000"), "not 000000000000"),
    (Binding("add_node", "allow", mode="docker"), "unknown mode 'docker'"),
    (Binding("add_node", "allow", mode="http"), "mode http needs --url"),
    (Binding("add_node", "allow", timeout_seconds=0), "timeout_seconds"),
    (Binding("add_node", "Bad-Name"), "a policy name is a Python module name"),
])
def test_a_bad_binding_is_refused_at_bind_time(folder, binding, message):
    with pytest.raises(InvalidRequest, match="binding|policy") as err:
        policy.check_binding(binding, folder)
    assert message in str(err.value)


def test_a_good_binding_passes_and_lists_what_is_there(folder):
    pinned = policy.source_version(ALLOW)
    assert policy.check_binding(Binding("add_node", "allow", version=pinned), folder)
    assert "allow" in policy.available(folder) and "no_entry" not in policy.available(folder)


def test_no_binding_allows_and_says_so(folder):
    (d,) = policy.decide([], "remove_node", REQUEST, folder)
    assert d.allowed and d.reason == "no policy is bound to remove_node"


# ---- subprocess mode (the default) -----------------------------------------------------------

def test_subprocess_allow_and_deny_with_the_policys_reason(folder):
    allowed = decide(folder, "allow")
    assert allowed.allowed and allowed.reason == "fine" and allowed.mode == "subprocess"
    assert allowed.version == policy.source_version(ALLOW)
    denied = decide(folder, "deny")
    assert not denied.allowed and denied.reason == "no 10.0.0.3"


def test_a_hanging_policy_is_denied_at_its_timeout_and_stopped(folder):
    started = time.monotonic()
    d = decide(folder, "sleeper", timeout_seconds=1.5)
    assert time.monotonic() - started < 5
    assert not d.allowed and "did not answer within 1.5 s (stopped)" in d.reason


@pytest.mark.parametrize(("name", "reason"), [
    ("raiser", "policy raiser raised RuntimeError: boom"),
    ("shrug", "answered without a boolean 'allowed': {}"),
    ("quitter", "answered something that is not JSON"),
    ("hog", "ran out of memory (limit 256 MB)"),
])
def test_a_policy_that_fails_is_a_deny_naming_why(folder, name, reason):
    d = decide(folder, name, memory_mb=256)
    assert not d.allowed and reason in d.reason


def test_what_a_policy_prints_never_becomes_its_answer(folder):
    d = decide(folder, "chatty")
    assert d.allowed and d.reason == "said a lot"


def test_the_child_gets_a_minimal_environment(folder, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_CANARY", "postgresql://u:canary-secret@db/x")
    d = decide(folder, "env")
    # PWD: the working directory the sandbox set (bwrap exports it)
    assert "canary-secret" not in d.reason and \
        set(json.loads(d.reason)) <= {"PATH", "LANG", "PWD"}


def test_each_decision_says_how_far_its_policy_was_kept_from_secrets(folder):
    from airfleet.policy import sandbox

    assert decide(folder, "allow").isolation == sandbox.current().status  # probed on this host
    assert decide(folder, "allow", mode="local").isolation.startswith("not isolated:")
    (unbound,) = policy.decide([], "add_node", REQUEST, folder)
    assert unbound.isolation is None  # no policy ran


def test_binding_params_reach_the_policy(folder):
    assert not decide(folder, "params").allowed
    assert decide(folder, "params", params={"max": 2}).allowed


def test_a_decision_object_is_accepted_as_well_as_a_dict(folder):
    for mode in ("subprocess", "local"):
        d = decide(folder, "object", mode=mode)
        assert not d.allowed and d.reason == "as an object"


# ---- what a policy may change ---------------------------------------------------------------

SCALE = {**REQUEST, "action": "scale_nodegroup",
         "input": {"pool": "gpu", "from": {"min": 0, "max": 3, "desired": 1},
                   "to": {"min": 0, "max": 5, "desired": 4}}}


def test_a_policy_may_change_the_fields_its_action_allows(folder):
    d = decide(folder, "shrink", SCALE)
    assert d.allowed and d.changed == ("to",) and d.input["to"]["desired"] == 1


def test_a_change_to_another_field_is_a_deny(folder):
    d = decide(folder, "sneaky")
    assert not d.allowed and "changed input field(s) workers_after" in d.reason


def test_each_policy_sees_the_input_as_the_one_before_left_it(folder):
    (tmp := folder / "after_shrink.py").write_text(
        "def evaluate(request):\n    d = request['input']['to']['desired']\n"
        "    return {'allowed': d == 1, 'reason': f'desired {d}'}\n")
    bindings = [Binding("scale_nodegroup", "shrink"), Binding("scale_nodegroup", tmp.stem)]
    first, second = policy.decide(bindings, "scale_nodegroup", SCALE, folder)
    assert first.changed == ("to",) and second.allowed and second.reason == "desired 1"


def test_a_changed_file_no_longer_matches_a_pinned_version(folder):
    pinned = policy.source_version(ALLOW)
    (folder / "allow.py").write_text(ALLOW + "# edited\n")
    d = decide(folder, "allow", version=pinned)
    assert not d.allowed and f"the binding pins {pinned}" in d.reason


# ---- local mode ------------------------------------------------------------------------------

def test_local_mode_runs_in_process_and_still_times_out(folder):
    assert decide(folder, "allow", mode="local").allowed
    assert "raised RuntimeError: boom" in decide(folder, "raiser", mode="local").reason
    started = time.monotonic()
    d = decide(folder, "sleeper", mode="local", timeout_seconds=0.5)
    assert time.monotonic() - started < 2 and not d.allowed and "abandoned" in d.reason


# ---- http mode -------------------------------------------------------------------------------

class _PolicyServer(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append(body)
        if self.path == "/slow":
            time.sleep(3)
        status, answer = {
            "/allow": (200, {"allowed": True, "reason": f"ok {body['action']}"}),
            "/deny": (200, {"allowed": False, "reason": "not on Fridays"}),
            "/slow": (200, {"allowed": True, "reason": "late"}),
            "/error": (500, {"detail": "broken"}),
        }.get(self.path, (404, {}))
        data = json.dumps(answer).encode() if self.path != "/garbage" else b"<html>"
        self.send_response(status if self.path != "/garbage" else 200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _PolicyServer)
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def http(folder, server, path, **binding):
    url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    return decide(folder, "remote", mode="http", url=url, **binding)


def test_http_mode_posts_the_request_and_takes_the_answer(folder, server):
    allowed = http(folder, server, "/allow", params={"k": 1})
    assert allowed.allowed and allowed.reason == "ok add_node" and allowed.version is None
    assert server.seen[-1]["input"] == REQUEST["input"] and server.seen[-1]["params"] == {"k": 1}
    denied = http(folder, server, "/deny")
    assert not denied.allowed and denied.reason == "not on Fridays"


@pytest.mark.parametrize(("path", "reason"), [
    ("/slow", "did not answer within 1 s"),
    ("/error", "answered HTTP 500"),
    ("/garbage", "answered something that is not JSON: '<html>'"),
])
def test_a_failing_policy_server_denies_unless_fail_open(folder, server, path, reason):
    started = time.monotonic()
    closed = http(folder, server, path, timeout_seconds=1)
    assert time.monotonic() - started < 2.5
    assert not closed.allowed and reason in closed.reason
    opened = http(folder, server, path, timeout_seconds=1, fail_open=True)
    assert opened.allowed and reason in opened.reason and "fail-open" in opened.reason


def test_an_unreachable_policy_server_denies(folder):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    d = decide(folder, "remote", mode="http", url=f"http://127.0.0.1:{port}/", timeout_seconds=1)
    assert not d.allowed and "is unreachable (ConnectionError)" in d.reason


# ---- http mode against OPA's Data API (tests/fakes/opa_server.py: real Rego) ------------------

SHIPPED_REGO = Path(__file__).resolve().parents[2] / "policies" / "opa" / "delete_cluster.rego"


@pytest.fixture(scope="module")
def opa():
    from tests.fakes.opa_server import OpaServer

    with OpaServer() as server:
        assert server.put_policy("airfleet/delete_cluster", SHIPPED_REGO.read_text())[0] == 200
        yield server


def delete(folder, opa, document: str, labels: dict) -> policy.Decision:
    request = {**REQUEST, "action": "delete_cluster", "input": {"force": False},
               "cluster": {**REQUEST["cluster"], "labels": labels}}
    binding = Binding("delete_cluster", "prod_guard", mode="http",
                      url=f"{opa.url}/v1/data/{document}", params={"team": "infra"})
    return policy.decide([binding], "delete_cluster", request, folder)[0]


def test_an_opa_url_gets_the_request_as_input_and_its_result_as_the_decision(folder, opa):
    denied = delete(folder, opa, "airfleet/delete_cluster/decision", {"env": "prod"})
    assert not denied.allowed and denied.reason == (
        "cluster llm-a is labelled env=prod: deleting it needs the label changed first")
    method, path, body = opa.requests[-1]
    sent = json.loads(body)
    assert (method, path) == ("POST", "/v1/data/airfleet/delete_cluster/decision")
    assert list(sent) == ["input"] and sent["input"]["action"] == "delete_cluster"
    assert sent["input"]["params"] == {"team": "infra"}
    allowed = delete(folder, opa, "airfleet/delete_cluster/decision", {"env": "dev"})
    assert allowed.allowed and allowed.reason == "not a production cluster"


def test_an_opa_boolean_result_allows_or_denies(folder, opa):
    yes = delete(folder, opa, "airfleet/delete_cluster/allow", {})
    assert yes.allowed and yes.reason == "data.airfleet.delete_cluster.allow is true"
    no = delete(folder, opa, "airfleet/delete_cluster/allow", {"env": "prod"})
    assert not no.allowed and no.reason == "data.airfleet.delete_cluster.allow is false"


def test_an_undefined_opa_document_denies_naming_it(folder, opa):
    d = delete(folder, opa, "airfleet/delete_clusters/decision", {})
    assert not d.allowed and d.reason == (
        "policy prod_guard is undefined in OPA: data.airfleet.delete_clusters.decision has "
        "no value; check the Rego package and rule the URL names, or give the rule a default")


def test_binding_to_opas_whole_data_document_is_refused(folder):
    binding = Binding("delete_cluster", "prod_guard", mode="http",
                      url="http://opa:8181/v1/data/")
    with pytest.raises(InvalidRequest, match=r"whole data document; name the rule"):
        policy.check_binding(binding, folder)


def test_the_readmes_rego_is_the_shipped_example():
    readme = (SHIPPED_REGO.parents[2] / "README.md").read_text()
    block = readme.split("```rego\n", 1)[1].split("```", 1)[0]
    assert block.strip() and block in SHIPPED_REGO.read_text()
