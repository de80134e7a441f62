"""What the Kubernetes backend reports and changes is what is real: rollouts judged as
``kubectl rollout status`` judges them, updates by server-side apply (a field the spec drops
leaves the live object), immutable fields refused before anything is touched, a permission the
Role grants checked before it is needed, and a namespace that stays Terminating named with what
holds it. Through ``dag.test()``, the real ``kubernetes`` client and the fake API server, whose
own tests (tests/integration/test_fake_kube_*.py) hold it to the real server's behaviour."""

from __future__ import annotations

import copy
import time

import httpx
import kubernetes
import pytest

from airfleet.backends.kubernetes import manifests as m
from airfleet.backends.kubernetes.kube import FIELD_MANAGER
from airfleet.resources import Phase
from airfleet.store import Store
from tests.integration.kube_support import (  # noqa: F401 - fixtures
    cluster,
    kube,
    ours,
    output,
    run,
    server,
    states,
    writes,
)

pytestmark = pytest.mark.integration

BROKEN = "airfleet/router:broken"  # the fake never makes a pod of this image ready
NS = m.namespace_of("llm-a")


def phase_and_message(name: str = "llm-a") -> tuple[Phase, str]:
    status = Store().require_cluster(name).cluster.status
    return status.phase, status.message


def note(dag_run) -> str:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return session.scalar(select(DagRun).where(DagRun.dag_id == dag_run.dag_id,
                                                   DagRun.run_id == dag_run.run_id)).note


def test_an_update_to_an_image_that_never_runs_fails_naming_the_rollout_until_rolled_back(
        dags, kube):
    """The old replicas keep the router Available through the rollout; Airfleet must still
    call it failed once Kubernetes reports ProgressDeadlineExceeded."""
    spec = cluster(kube, ready_timeout_seconds=3)
    assert str(run(dags, "airfleet_cluster_create", {"cluster": spec}).state) == "success"
    kube.bad_images.add(BROKEN)
    broken = copy.deepcopy(spec)
    broken["spec"]["config"]["kubernetes"]["router"] = {"image": BROKEN}

    dr = run(dags, "airfleet_cluster_update", {"cluster": broken})
    assert str(dr.state) == "failed"
    assert states(dr)["wait_ready"] == "failed"
    phase, message = phase_and_message()
    assert phase is Phase.FAILED
    assert f"{m.ROUTER}: rollout failed: ProgressDeadlineExceeded" in message
    assert "has timed out progressing" in message
    assert "ProgressDeadlineExceeded" in note(dr).splitlines()[0]
    live = kube.get("Deployment", m.ROUTER, NS)
    available = {c["type"]: c["status"] for c in live["status"]["conditions"]}["Available"]
    assert available == "True"  # what a readiness check on Available alone would believe

    run(dags, "airfleet_cluster_health_check", {})
    phase, message = phase_and_message()
    assert phase is Phase.FAILED and "ProgressDeadlineExceeded" in message

    dr = run(dags, "airfleet_cluster_update", {"cluster": spec})  # roll back
    assert str(dr.state) == "success", states(dr)
    assert phase_and_message()[0] is Phase.RUNNING
    run(dags, "airfleet_cluster_health_check", {})
    status = Store().require_cluster("llm-a").cluster.status
    assert status.phase is Phase.RUNNING
    assert {c.type: c.reason for c in status.conditions}["ComponentsReady"] == "RolledOut"


def test_an_update_removes_what_the_spec_no_longer_asks_for_and_keeps_what_others_own(dags,
                                                                                      kube):
    """A merge patch keeps keys it omits; server-side apply removes the fields our manager
    applied before and no longer applies, and leaves other managers' fields alone."""
    spec = cluster(kube, router={"ingress": {"host": "llm.example", "class_name": "nginx"}})
    assert str(run(dags, "airfleet_cluster_create", {"cluster": spec}).state) == "success"
    assert kube.get("Ingress", m.ROUTER, NS)["spec"]["ingressClassName"] == "nginx"
    pod = kube.get("Deployment", m.ROUTER, NS)["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": m.PULL_SECRET}]
    # Someone else's annotation on the router (their field, under their manager).
    apps = kubernetes.client.AppsV1Api(
        kubernetes.config.new_client_from_config_dict(kube.kubeconfig()))
    apps.patch_namespaced_deployment(
        m.ROUTER, NS, {"metadata": {"annotations": {"team.example/owner": "search"}}},
        field_manager="someone")

    desired = copy.deepcopy(spec)
    desired["spec"]["config"]["kubernetes"]["router"] = {"ingress": {"host": "llm.example"}}
    del desired["spec"]["image_registry"]  # no registry login: no pull secret
    dr = run(dags, "airfleet_cluster_update", {"cluster": desired})
    assert str(dr.state) == "success", states(dr)

    ingress = kube.get("Ingress", m.ROUTER, NS)
    assert "ingressClassName" not in ingress["spec"]
    assert ingress["spec"]["rules"][0]["host"] == "llm.example"
    router = kube.get("Deployment", m.ROUTER, NS)
    assert "imagePullSecrets" not in router["spec"]["template"]["spec"]
    assert "imagePullSecrets" not in kube.get(
        "Deployment", m.METRICS, NS)["spec"]["template"]["spec"]
    assert kube.get("Secret", m.PULL_SECRET, NS) is None
    assert router["metadata"]["annotations"]["team.example/owner"] == "search"
    managers = {f["manager"]: f["operation"] for f in router["metadata"]["managedFields"]}
    assert managers[FIELD_MANAGER] == "Apply" and "someone" in managers
    assert phase_and_message()[0] is Phase.RUNNING

    # Converged: a re-run sends no write.
    before = len(writes(kube))
    assert str(run(dags, "airfleet_cluster_update", {"cluster": desired}).state) == "success"
    assert writes(kube)[before:] == []


@pytest.mark.parametrize("change, field, why", [
    (lambda c: c["pvc"].update(storage_class="slow"),
     "cluster.spec.model_caches.0.pvc.storage_class", "cannot change once created"),
    (lambda c: c["pvc"].update(access_mode="ReadWriteOnce"),
     "cluster.spec.model_caches.0.pvc.access_mode", "cannot change once created"),
    (lambda c: c["pvc"].update(size="50Gi"),
     "cluster.spec.model_caches.0.pvc.size", "may not shrink"),
], ids=["storage-class", "access-mode", "shrink"])
def test_a_change_kubernetes_refuses_is_refused_in_validate_naming_the_field(dags, kube, capfd,
                                                                             caplog, change,
                                                                             field, why):
    spec = cluster(kube)
    assert str(run(dags, "airfleet_cluster_create", {"cluster": spec}).state) == "success"
    before, events = len(writes(kube)), len(Store().events("llm-a"))
    desired = copy.deepcopy(spec)
    change(desired["spec"]["model_caches"][0])
    dr = run(dags, "airfleet_cluster_update", {"cluster": desired})
    assert str(dr.state) == "failed"
    assert states(dr)["admit"] == "failed"
    said = output(capfd, caplog)
    assert f"{field}: {why}" in said and "give the cache a new name" in said
    assert writes(kube)[before:] == []
    assert len(Store().events("llm-a")) == events  # not even a row
    assert phase_and_message()[0] is Phase.RUNNING


def test_a_cache_may_grow(dags, kube):
    """Kubernetes lets a bound claim's storage request grow (volume expansion)."""
    spec = cluster(kube)
    assert str(run(dags, "airfleet_cluster_create", {"cluster": spec}).state) == "success"
    pvc = kube.get("PersistentVolumeClaim", "cache-hf", NS)  # as a provisioner binds it:
    kube.update({**pvc, "status": {"phase": "Bound", "capacity": {"storage": "100Gi"}}})
    desired = copy.deepcopy(spec)
    desired["spec"]["model_caches"][0]["pvc"]["size"] = "200Gi"
    assert str(run(dags, "airfleet_cluster_update", {"cluster": desired}).state) == "success"
    pvc = kube.get("PersistentVolumeClaim", "cache-hf", NS)
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"


def test_a_caller_without_watch_endpoints_is_refused_in_validate_and_nothing_is_written(
        dags, kube, capfd, caplog):
    """The router's Role grants watch on endpoints; Kubernetes refuses to let a caller grant
    what it does not hold, so the create would fail halfway without this check."""
    kube.deny("watch", "endpoints")
    dr = run(dags, "airfleet_cluster_create", {"cluster": cluster(kube)})
    assert str(dr.state) == "failed"
    assert states(dr)["admit"] == "failed"
    assert f"watch endpoints (in namespace {NS})" in output(capfd, caplog)
    assert f"watch endpoints (in namespace {NS})" in note(dr).splitlines()[0]
    assert writes(kube) == [] and ours(kube) == []  # not the namespace, not the secret
    assert Store().list_clusters(include_deleted=True) == []


def test_a_deleted_namespace_is_waited_for_in_the_triggerer(dags, kube, capfd, caplog,
                                                            monkeypatch):
    """Kubernetes keeps a deleted namespace Terminating while it deletes the content."""
    monkeypatch.setenv("AIRFLEET_READY_INLINE_SECONDS", "0.5")
    assert str(run(dags, "airfleet_cluster_create", {"cluster": cluster(kube)}).state) == "success"
    kube.terminate_delay = 3
    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-a"})
    assert str(dr.state) == "success", states(dr)
    assert f"namespace {NS} still Terminating; waiting up to" in output(capfd, caplog)
    assert kube.get("Namespace", NS) is None and ours(kube) == []
    assert note(dr) == "llm-a: Running → Deleting → Deleted (every component removed)"


def test_a_namespace_held_by_a_finalizer_is_named_and_force_records_it_left(dags, kube,
                                                                            monkeypatch):
    """A namespace stays Terminating while an object in it carries a finalizer."""
    monkeypatch.setattr("airfleet.backends.kubernetes.backend.NAMESPACE_GONE_SECONDS", 3)
    monkeypatch.setenv("AIRFLEET_READY_INLINE_SECONDS", "0.5")  # the rest in the triggerer
    assert str(run(dags, "airfleet_cluster_create", {"cluster": cluster(kube)}).state) == "success"
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "held", "namespace": NS, "finalizers": ["example.com/hold"]}})

    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-a"})
    assert str(dr.state) == "failed"
    phase, message = phase_and_message()
    assert phase is Phase.FAILED
    assert f"namespace {NS} still Terminating" in message
    assert "example.com/hold" in message and '"force": true' in message
    assert kube.get("Namespace", NS)["status"]["phase"] == "Terminating"

    dr = run(dags, "airfleet_cluster_delete", {"name": "llm-a", "force": True})
    assert str(dr.state) == "success", states(dr)
    [gone] = Store().list_clusters(include_deleted=True)
    assert gone.phase is Phase.DELETED
    [left] = gone.cluster.status.left_behind
    assert f"namespace {NS} still Terminating" in left and "example.com/hold" in left
    assert note(dr).splitlines()[0].startswith("llm-a: Failed → Deleting → Deleted (deleted by "
                                               "force; left behind: namespace")

    held = kube.get("ConfigMap", "held", NS)
    kube.update({**held, "metadata": {**held["metadata"], "finalizers": []}})
    deadline = time.monotonic() + 5
    while kube.get("Namespace", NS) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kube.get("Namespace", NS) is None


def test_the_router_needs_no_more_than_its_role_grants(dags, kube, tmp_path):
    """The real router, with the token its pods get (its ServiceAccount) and nothing but what
    Airfleet's Role grants that account, lists and watches its namespace's pods and routes.
    Take watch from the Role and its watch is refused: this test fails if the Role stops
    granting what the router needs."""
    from tests.router_support import RouterProcess, Upstream, pod

    assert str(run(dags, "airfleet_cluster_create", {"cluster": cluster(kube)}).state) == "success"
    token_file, ca_file = tmp_path / "token", tmp_path / "ca.pem"
    token_file.write_text(kube.service_account_token(NS, m.POD_READER))
    ca_file.write_bytes(kube.ca_pem)
    upstream = Upstream("A").wait()
    kube.create(pod("llm-0", "llm", upstream.port, namespace=NS))
    router = RouterProcess(tmp_path / "router.log", api_url=kube.https_url, namespace=NS,
                           token_file=token_file, AIRFLEET_ROUTER_CA_FILE=str(ca_file),
                           AIRFLEET_ROUTER_WATCH_TIMEOUT="1")
    try:
        router.wait_synced()
        with httpx.Client(base_url=router.url, timeout=10, trust_env=False) as client:
            answer = client.post("/v1/chat/completions", json={"model": "llm", "messages": []})
            assert answer.status_code == 200, answer.text
            assert answer.json()["upstream"] == "A"
        # The same identity may read nothing else (the Role is all it has).
        secrets = httpx.get(f"{kube.url}/api/v1/namespaces/{NS}/secrets", trust_env=False,
                            headers={"Authorization": f"Bearer {token_file.read_text()}"})
        assert secrets.status_code == 403, secrets.text

        role = kube.get("Role", m.POD_READER, NS)
        rules = [{**r, "verbs": [v for v in r["verbs"] if v != "watch"]} for r in role["rules"]]
        kube.update({**role, "rules": rules})
        deadline, watch = time.monotonic() + 10, {}
        while time.monotonic() < deadline:
            watch = httpx.get(f"{router.url}/healthz", trust_env=False).json()["watch"]
            if watch["state"] == "backoff" and "403" in (watch.get("last_error") or ""):
                break
            time.sleep(0.2)
        assert watch["state"] == "backoff" and "403" in watch["last_error"], watch
    finally:
        router.stop()
        upstream.stop()
