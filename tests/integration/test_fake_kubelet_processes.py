"""The fake API server's process kubelet (tests/fakes/kube_kubelet.py): pods of a Deployment
made through the real `kubernetes` client run as local processes on loopback addresses of
their own, with readiness, restarts and termination as the kubelet does them.

The upstream is a stand-in HTTP server (`python -c STAND_IN`, serving /health, /alive and
anything else with the pod's name), whose readiness and liveness fail while a flag file
exists. Each test names the Kubernetes documentation it holds the fake to:
https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/ (phases, container states,
restart back-off, termination) and https://kubernetes.io/docs/concepts/configuration/
liveness-readiness-startup-probes/ (probes).
"""

from __future__ import annotations

import signal
import sys
import time
import uuid

import httpx
import kubernetes
import psutil
import pytest
from kubernetes.client import CoreV1Api

from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.fakes.kube_kubelet import python_module_runner, repository
from tests.integration.fake_kube_support import (  # noqa: F401 - fixtures
    apps,
    client,
    core,
    fresh,
    ns,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PORT = 8000
MARKER = f"fake-kubelet-test-{uuid.uuid4().hex[:8]}"  # in every stand-in's argv: find leaks
STAND_IN = f"""# {MARKER}
import http.server, json, os, signal, sys
host, port = sys.argv[1], int(sys.argv[2])
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
def flagged(name):  # the flag file exists (and names this process, if it names one)
    path = os.environ.get(name)
    if not path or not os.path.exists(path):
        return False
    with open(path) as f:
        return f.read().strip() in ("", str(os.getpid()))
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        failing = (self.path == "/health" and flagged("UNREADY_FLAG")
                   or self.path == "/alive" and flagged("DEAD_FLAG"))
        body = json.dumps({{"pod": os.environ.get("HOSTNAME"), "path": self.path,
                           "version": os.environ.get("VERSION"),
                           "greeting": os.environ.get("GREETING")}}).encode()
        self.send_response(503 if failing else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, fmt, *args):
        print("request", fmt % args, flush=True)
print("serving on", host, port, flush=True)
http.server.ThreadingHTTPServer((host, port), Handler).serve_forever()
"""
IMAGE = "example.test/stand-in"


def stand_in(container: dict, pod_ip: str) -> list[str]:
    return [sys.executable, "-c", STAND_IN, pod_ip, *container.get("args", [str(PORT)])]


def crasher(container: dict, pod_ip: str) -> list[str]:
    return [sys.executable, "-c", f"# {MARKER}\nimport sys; print('bye'); sys.exit(3)"]


RUNNERS = {IMAGE: stand_in, "example.test/crasher": crasher}


@pytest.fixture(scope="module")
def server():
    with FakeKubeAPIServer(ready_delay=0.3, terminate_delay=0.2, run_images=RUNNERS) as server:
        yield server
    assert not leftovers(), "processes left after the server stopped"


def leftovers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if MARKER in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def deployment(tmp_path, name: str = "engine", replicas: int = 2, image: str = IMAGE,
               version: str = "v1", **container) -> dict:
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "UNREADY_FLAG", "value": f"{tmp_path}/$(POD_NAME).unready"},
           {"name": "DEAD_FLAG", "value": f"{tmp_path}/$(POD_NAME).dead"},
           {"name": "VERSION", "value": version}]
    spec = {"name": "server", "image": f"{image}:1.0", "args": [str(PORT)],
            "ports": [{"name": "http", "containerPort": PORT}], "env": env,
            "readinessProbe": {"httpGet": {"path": "/health", "port": "http"},
                               "periodSeconds": 1, "failureThreshold": 2},
            "startupProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1,
                             "failureThreshold": 50},
            "livenessProbe": {"httpGet": {"path": "/alive", "port": PORT},
                              "periodSeconds": 1, "failureThreshold": 2},
            **container}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [spec],
                                           "terminationGracePeriodSeconds": 1}}}}


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what} not met in {timeout} s")


def pods(server, ns: str = "x") -> list[dict]:
    return server.list("Pod", ns)


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in pod.get("status", {}).get("conditions", []))


def available(server, replicas: int, name: str = "engine") -> dict | None:
    d = server.get("Deployment", name, "x")
    s = d.get("status", {})
    running = pods(server)
    return d if s.get("availableReplicas") == s.get("updatedReplicas") == replicas \
        and s.get("replicas") == replicas and len(running) == replicas \
        and all(ready(p) for p in running) else None


def answer(pod: dict, path: str = "/") -> dict:
    return httpx.get(f"http://{pod['status']['podIP']}:{PORT}{path}", timeout=3,
                     trust_env=False).json()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_deployment_gets_one_process_per_pod_on_an_address_of_its_own(
        server, apps, core, ns, tmp_path):
    """Pod lifecycle: Pending, then Running once its container started; Ready (and the
    Deployment available) once the readinessProbe succeeds. Each pod has an IP of its own
    where its process answers; the container's env comes from the spec (fieldRef and $(VAR)
    expansion, docs: "Expose Pod Information to Containers Through Environment Variables");
    the log subresource serves the process's output."""
    since = core.list_namespaced_pod(ns).metadata.resource_version
    apps.create_namespaced_deployment(ns, deployment(tmp_path))
    wait_for(lambda: available(server, 2), what="2 available replicas")
    running = pods(server)
    stream = kubernetes.watch.Watch().stream(core.list_namespaced_pod, ns,
                                             resource_version=since, timeout_seconds=1)
    seen: dict[str, list] = {}
    for event in stream:
        status = event["raw_object"]["status"]
        seen.setdefault(event["raw_object"]["metadata"]["name"], []).append(
            (status["phase"], ready(event["raw_object"])))
    for states in seen.values():  # Pending, Running but not Ready, then Ready
        assert states[0] == ("Pending", False) and states[-1] == ("Running", True)
        assert ("Running", False) in states
    ips = {p["status"]["podIP"] for p in running}
    assert len(ips) == 2 and all(ip.startswith("127.") and ip != "127.0.0.1" for ip in ips)
    for pod in running:
        status, name = pod["status"], pod["metadata"]["name"]
        assert status["phase"] == "Running" and status["hostIP"] == "127.0.0.1"
        (container,) = status["containerStatuses"]
        assert (container["ready"], container["started"], container["restartCount"]) == \
            (True, True, 0)
        assert set(container["state"]) == {"running"}
        assert answer(pod, "/hello") == {"pod": name, "path": "/hello", "version": "v1",
                                         "greeting": None}
        log_text = core.read_namespaced_pod_log(name, ns)
        assert "serving on" in log_text and "GET /hello" in log_text
    pids = server.processes.pids("x")
    assert len(set(pids.values())) == 2 and all(alive(pid) for pid in pids.values())


def test_ready_follows_the_readiness_probe_and_watchers_see_it(
        server, apps, core, ns, tmp_path):
    """Probes doc: a failing readinessProbe (failureThreshold times) turns the pod not Ready
    without restarting it, and Ready again once it succeeds; the change is a MODIFIED event
    for a watch, and the Deployment counts it (readyReplicas)."""
    apps.create_namespaced_deployment(ns, deployment(tmp_path))
    wait_for(lambda: available(server, 2), what="2 available replicas")
    pod = pods(server)[0]
    name, since = pod["metadata"]["name"], pod["metadata"]["resourceVersion"]
    flag = tmp_path / f"{name}.unready"
    flag.touch()
    wait_for(lambda: not ready(server.get("Pod", name, ns)), what="Ready False")
    assert server.get("Deployment", "engine", ns)["status"].get("readyReplicas") == 1
    flag.unlink()
    wait_for(lambda: ready(server.get("Pod", name, ns)), what="Ready True again")
    stream = kubernetes.watch.Watch().stream(core.list_namespaced_pod, ns,
                                             resource_version=since, timeout_seconds=1,
                                             field_selector=f"metadata.name={name}")
    seen = [(e["type"], ready(e["raw_object"])) for e in stream]
    assert ("MODIFIED", False) in seen and seen[-1] == ("MODIFIED", True)
    statuses = server.get("Pod", name, ns)["status"]["containerStatuses"]
    assert statuses[0]["restartCount"] == 0


def test_a_killed_process_is_restarted(server, apps, core, ns, tmp_path):
    """Pod lifecycle, container restart policy Always: the container restarts after its
    process exits; restartCount counts it, lastState.terminated holds the exit (137 for
    SIGKILL), the pod keeps its IP, and the previous instance's log stays readable."""
    apps.create_namespaced_deployment(ns, deployment(tmp_path, replicas=1))
    wait_for(lambda: available(server, 1), what="1 available replica")
    (pod,) = pods(server)
    name = pod["metadata"]["name"]
    (old_pid,) = server.processes.pids(ns).values()
    psutil.Process(old_pid).send_signal(signal.SIGKILL)

    def restarted():
        p = server.get("Pod", name, ns)
        return p if p["status"]["containerStatuses"][0]["restartCount"] == 1 and ready(p) \
            else None

    after = wait_for(restarted, what="restartCount 1 and Ready")
    container = after["status"]["containerStatuses"][0]
    assert container["lastState"]["terminated"]["exitCode"] == 137
    assert container["lastState"]["terminated"]["reason"] == "Error"
    assert after["status"]["podIP"] == pod["status"]["podIP"]
    (new_pid,) = server.processes.pids(ns).values()
    assert new_pid != old_pid and not alive(old_pid)
    assert answer(after)["pod"] == name
    assert "serving on" in core.read_namespaced_pod_log(name, ns, previous=True)


def test_a_failing_liveness_probe_restarts_the_container(server, apps, ns, tmp_path):
    """Probes doc: once the livenessProbe fails failureThreshold times the kubelet kills the
    container (SIGTERM: exit 143) and restarts it; the startupProbe holds the liveness probe
    back while the new process starts (the flag names the old process only)."""
    apps.create_namespaced_deployment(ns, deployment(tmp_path, replicas=1))
    wait_for(lambda: available(server, 1), what="1 available replica")
    name = pods(server)[0]["metadata"]["name"]
    (old_pid,) = server.processes.pids(ns).values()
    (tmp_path / f"{name}.dead").write_text(str(old_pid))
    wait_for(lambda: not alive(old_pid), what="the process killed")

    def restarted():
        status = server.get("Pod", name, ns)["status"]["containerStatuses"][0]
        return status if status["restartCount"] == 1 and status["ready"] else None

    status = wait_for(restarted, what="restarted and ready")
    assert status["lastState"]["terminated"]["exitCode"] == 143


def test_a_process_that_keeps_exiting_is_in_crash_loop_back_off(server, apps, core, ns,
                                                                  tmp_path):
    """Pod lifecycle, "container restarts": after the first restart the kubelet backs off
    (CrashLoopBackOff in state.waiting) and the pod stays Running but never Ready, so the
    Deployment is not available."""
    apps.create_namespaced_deployment(ns, deployment(tmp_path, replicas=1,
                                                     image="example.test/crasher"))

    def backing_off():
        (pod,) = pods(server)
        (c,) = pod["status"].get("containerStatuses") or [{}]
        return pod if c.get("restartCount", 0) >= 2 and \
            c["state"].get("waiting", {}).get("reason") == "CrashLoopBackOff" else None

    pod = wait_for(backing_off, what="CrashLoopBackOff")
    container = pod["status"]["containerStatuses"][0]
    assert pod["status"]["phase"] == "Running" and not ready(pod)
    assert container["lastState"]["terminated"]["exitCode"] == 3
    assert (container["ready"], container["started"]) == (False, False)
    assert "back-off" in container["state"]["waiting"]["message"]
    assert not server.get("Deployment", "engine", ns)["status"].get("availableReplicas")
    assert "bye" in core.read_namespaced_pod_log(pod["metadata"]["name"], ns, previous=True)


def test_env_from_secrets_and_config_maps_and_a_missing_one(server, apps, core, ns, tmp_path):
    """Env from a Secret key and a ConfigMap (envFrom) reaches the process; a reference to a
    missing Secret leaves the container waiting in CreateContainerConfigError (docs:
    "Distribute Credentials Securely Using Secrets")."""
    core.create_namespaced_secret(ns, {"metadata": {"name": "s"},
                                       "stringData": {"greeting": "hello"}})
    core.create_namespaced_config_map(ns, {"metadata": {"name": "c"},
                                           "data": {"VERSION": "from-config-map"}})
    spec = deployment(tmp_path, replicas=1)
    container = spec["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [*container["env"][:3], {"name": "GREETING", "valueFrom": {
        "secretKeyRef": {"name": "s", "key": "greeting"}}}]
    container["envFrom"] = [{"configMapRef": {"name": "c"}}]
    apps.create_namespaced_deployment(ns, spec)
    wait_for(lambda: available(server, 1), what="1 available replica")
    assert answer(pods(server)[0])["greeting"] == "hello"
    assert answer(pods(server)[0])["version"] == "from-config-map"

    missing = deployment(tmp_path, name="broken", replicas=1)
    missing["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}})
    apps.create_namespaced_deployment(ns, missing)

    def waiting():
        (pod,) = core.list_namespaced_pod(ns, label_selector="app=broken").items
        statuses = pod.status.container_statuses or []
        return statuses and statuses[0].state.waiting \
            and statuses[0].state.waiting.reason == "CreateContainerConfigError" \
            and statuses[0].state.waiting.message

    assert wait_for(waiting, what="CreateContainerConfigError") == 'secret "absent" not found'


def test_a_pod_created_directly_runs_too_and_stops_when_deleted(server, core, ns, tmp_path):
    """A kubelet runs every pod bound to it, not only those of a ReplicaSet; deleting the
    pod through the API stops its process. The log subresource asks for a container name
    when the pod has several (the second container here runs no process)."""
    template = deployment(tmp_path)["spec"]["template"]
    template["spec"]["containers"].append({"name": "sidecar", "image": "busybox:1"})
    core.create_namespaced_pod(ns, {"metadata": {"name": "bare"}, "spec": template["spec"]})
    pod = wait_for(lambda: (p := server.get("Pod", "bare", ns)) and ready(p) and p,
                   what="the bare pod Ready")
    assert answer(pod)["pod"] == "bare"
    assert [c["ready"] for c in pod["status"]["containerStatuses"]] == [True, True]
    with pytest.raises(kubernetes.client.ApiException) as raised:
        core.read_namespaced_pod_log("bare", ns)
    assert raised.value.status == 400 and "choose one of: [server sidecar]" in raised.value.body
    assert "serving on" in core.read_namespaced_pod_log("bare", ns, container="server")
    (pid,) = server.processes.pids(ns).values()
    core.delete_namespaced_pod("bare", ns)
    wait_for(lambda: not alive(pid), what="the process gone")


def test_runner_helpers():
    """Images match by repository (tag or digest ignored); the Python module runner forces
    the pod's IP as the host, whatever the args say."""
    assert repository("airfleet/mock-engine:0.1") == "airfleet/mock-engine"
    assert repository("reg.example:5000/a/b@sha256:00") == "reg.example:5000/a/b"
    run = python_module_runner("airfleet_mock_engine")
    process = run({"args": ["--host", "0.0.0.0", "--port", "8000", "--host=::"]}, "127.9.0.2")
    assert list(process.argv) == [sys.executable, "-m", "airfleet_mock_engine", "--port",
                                  "8000", "--host", "127.9.0.2"]
    # A command replaces the image's entrypoint (as the endpoint Deployments write it).
    process = run({"command": ["python", "-m", "airfleet_mock_engine", "--model", "m"],
                   "args": ["--port", "8000"]}, "127.9.0.3")
    assert list(process.argv)[3:] == ["--model", "m", "--port", "8000", "--host", "127.9.0.3"]
    with pytest.raises(ValueError, match="does not run python -m airfleet_mock_engine"):
        run({"name": "engine", "command": ["vllm", "serve", "m"]}, "127.9.0.4")


def test_scaling_down_stops_a_process(server, apps, ns, tmp_path):
    """ReplicaSet controller: a scale-down deletes a pod; deleting a pod stops its process
    (pod lifecycle, "Termination of Pods": SIGTERM, then SIGKILL after the grace period)."""
    apps.create_namespaced_deployment(ns, deployment(tmp_path))
    wait_for(lambda: available(server, 2), what="2 available replicas")
    before = server.processes.pids(ns)
    apps.patch_namespaced_deployment_scale("engine", ns, {"spec": {"replicas": 1}})
    wait_for(lambda: available(server, 1), what="1 available replica")
    (kept,) = pods(server)
    stopped = [pid for (_, pod, _), pid in before.items() if pod != kept["metadata"]["name"]]
    assert len(stopped) == 1
    wait_for(lambda: not alive(stopped[0]), what="the scaled-down process gone")
    wait_for(lambda: list(server.processes.pids(ns).values()) ==
             [before[(ns, kept["metadata"]["name"], "server")]], what="one process left")
    assert answer(kept)["pod"] == kept["metadata"]["name"]


def test_a_rolling_update_replaces_the_processes(server, apps, ns, tmp_path):
    """Deployment doc, "Updating a Deployment": new pods (here answering v2) replace the old
    ones, whose processes stop."""
    apps.create_namespaced_deployment(ns, deployment(tmp_path))
    wait_for(lambda: available(server, 2), what="2 available replicas")
    old = set(server.processes.pids(ns).values())
    env = deployment(tmp_path, version="v2")["spec"]["template"]["spec"]["containers"][0]["env"]
    apps.patch_namespaced_deployment("engine", ns, {"spec": {"template": {"spec": {
        "containers": [{"name": "server", "env": env}]}}}})

    def rolled():
        running = pods(server)
        return running if available(server, 2) \
            and all(p["metadata"]["labels"]["pod-template-hash"] for p in running) \
            and {answer(p)["version"] for p in running} == {"v2"} else None

    running = wait_for(rolled, timeout=20, what="rolled out to v2")
    wait_for(lambda: not any(alive(pid) for pid in old), what="old processes gone")
    new = set(server.processes.pids(ns).values())
    assert len(new) == 2 and not new & old and len({p["status"]["podIP"] for p in running}) == 2


def test_deleting_the_namespace_stops_every_process(server, apps, core, ns, tmp_path):
    """Namespace deletion deletes its pods, and so their processes."""
    apps.create_namespaced_deployment(ns, deployment(tmp_path))
    wait_for(lambda: available(server, 2), what="2 available replicas")
    pids = list(server.processes.pids(ns).values())
    core.delete_namespace(ns)
    wait_for(lambda: server.get("Namespace", ns) is None, what="the namespace gone")
    wait_for(lambda: not any(alive(pid) for pid in pids), what="processes gone")
    wait_for(lambda: server.processes.pids(ns) == {}, what="no process listed")


def test_stopping_the_server_leaves_no_process(tmp_path):
    """The server's stop ends every process, even one that ignores SIGTERM (SIGKILL after
    the grace period, capped at 2 s)."""
    runners = {repository(f"{IMAGE}:2"): stand_in}
    with FakeKubeAPIServer(run_images=runners) as other:
        api = kubernetes.config.new_client_from_config_dict(other.kubeconfig())
        core, apps = CoreV1Api(api), kubernetes.client.AppsV1Api(api)
        core.create_namespace({"metadata": {"name": "x"}})
        stubborn = deployment(tmp_path, replicas=2)
        stubborn["spec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": "IGNORE_TERM", "value": "1"})
        apps.create_namespaced_deployment("x", stubborn)
        wait_for(lambda: available(other, 2), what="2 available replicas")
        pids = list(other.processes.pids("x").values())
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        api.close()
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert not any(alive(pid) for pid in pids)
    assert not leftovers()
