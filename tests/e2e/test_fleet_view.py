"""The fleet view in Airflow's UI, in headless Chromium (Debian's ``chromium``, driven by
Playwright): the clusters this test creates over REST appear with their phase, nodes and GPUs,
and a cluster's page shows its conditions and history. Each page is saved as a screenshot
under tests/e2e/screenshots/ (CI keeps them; the README's picture is one of them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.e2e.support import CLUSTER, ROOT, token, trigger, wait_run

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
# The flags this machine's kind needs (its network is closed: no background fetches).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = ROOT / "tests" / "e2e" / "screenshots"


def _ssh(name: str, workers: int) -> dict:
    cluster = json.loads(json.dumps(CLUSTER))
    cluster["metadata"] = {"name": name, "labels": {"team": "search"}}
    cluster["spec"]["config"]["ssh"]["workers"] = [f"10.0.1.{i + 2}" for i in range(workers)]
    return cluster


LEFT = ["10.0.1.2: container airfleet-ray-worker"]
CLUSTERS = {
    "view-llm": _ssh("view-llm", workers=2),
    "view-broken": _ssh("view-broken", workers=1),
    "view-left": _ssh("view-left", workers=1),
    "view-gpu": {"metadata": {"name": "view-gpu"},
                 "spec": {"type": "kubernetes", "provider": "existing",
                          "config": {"kubernetes": {
                              "credential": {"airflow_conn_id": "k8s_fake"}}}}},
}


@pytest.fixture
def fleet_of_three(client, dags_parsed, airflow):
    """Clusters made over REST: two Running (one with a GPU node), one Failed, and one deleted
    by force that left something behind."""
    (airflow["home"] / "fake-state.json").write_text(json.dumps({
        "fail_at": {"view-broken": "apply"}, "unhealthy": ["view-broken"],
        "leftovers": {"view-left": LEFT}}))
    runs = {name: trigger(client, "airfleet_cluster_create", {"cluster": c}).dag_run_id
            for name, c in CLUSTERS.items()}
    states = {name: wait_run(client, "airfleet_cluster_create", run)
              for name, run in runs.items()}
    assert states == {"view-llm": "success", "view-broken": "failed", "view-left": "success",
                      "view-gpu": "success"}
    run = trigger(client, "airfleet_cluster_delete", {"name": "view-left", "force": True})
    assert wait_run(client, "airfleet_cluster_delete", run.dag_run_id) == "success"
    # One health check, so the view has a health age and the Kubernetes cluster's nodes.
    run = trigger(client, "airfleet_cluster_health_check", {"names": list(CLUSTERS)})
    assert wait_run(client, "airfleet_cluster_health_check", run.dag_run_id) == "success"
    yield
    (airflow["home"] / "fake-state.json").unlink()
    runs = [trigger(client, "airfleet_cluster_delete", {"name": n}).dag_run_id for n in CLUSTERS]
    for run in runs:
        assert wait_run(client, "airfleet_cluster_delete", run) == "success"


@pytest.fixture
def browser(tmp_path):
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: apt-get install chromium"
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=FLAGS, viewport={"width": 1400, "height": 900})
        yield context
        context.close()


def _shot(page, name: str) -> Path:
    SHOTS.mkdir(exist_ok=True)
    path = SHOTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def test_the_fleet_view_shows_the_clusters_in_airflows_ui(fleet_of_three, browser, airflow):
    base = airflow["base"]
    # The UI's own session: Airflow's login leaves the token in the `_token` cookie.
    browser.add_cookies([{"name": "_token", "value": token(base, "viewer", "viewer"),
                          "url": base}])
    page = browser.new_page()
    page.goto(f"{base}/plugin/airfleet-fleet")
    # Airflow's navigation is around it; the view itself is in the page's iframe.
    view = page.frame_locator("iframe")
    rows = {name: view.locator(f'tr[data-cluster="{name}"]') for name in CLUSTERS}
    try:
        for row in rows.values():
            row.wait_for(timeout=30_000)
    finally:  # what the browser showed, for whoever reads a failure
        _shot(page, "fleet-view.png")

    cells = {name: [c.strip() for c in row.locator("td").all_inner_texts()]
             for name, row in rows.items()}
    llm, broken, gpu = cells["view-llm"], cells["view-broken"], cells["view-gpu"]
    assert llm[1].startswith("Running") and llm[2] == "3 / 3", llm
    assert broken[1] == "Failed\nfake probe: head unreachable", broken
    left = cells["view-left"][1]
    assert left.startswith("Deleted\ndeleted by force; left behind: ") and \
        f"Left behind (remove by hand):\n{LEFT[0]}" in left, left
    assert gpu[1].startswith("Running") and gpu[2] == "1 / 1" and gpu[3] == "1× NVIDIA-L4", gpu
    assert llm[4].endswith(" s ago") and gpu[4].endswith(" s ago"), (llm, gpu)
    # The last run that wrote each one's status: the health check (the delete, for view-left).
    assert all(c[5].startswith("health_check manual__") for n, c in cells.items()
               if n != "view-left"), cells
    assert cells["view-left"][5].startswith("delete manual__"), cells
    assert (SHOTS / "fleet-view.png").stat().st_size > 20_000

    view.get_by_role("link", name="view-gpu").click()
    view.get_by_role("heading", name="History").wait_for(timeout=15_000)
    text = view.locator("body").inner_text()
    assert "ComponentsReady\tTrue" in text and "NodesReady\tTrue" in text, text
    assert "gpu-1" in text, text  # its node
    assert "Registered" in text and "Created" in text, text  # its history
    _shot(page, "cluster-page.png")

    # The run link opens the Airflow run in the UI around the view.
    view.get_by_role("link", name="← Fleet").click()
    view.locator('tr[data-cluster="view-llm"] a.airflow-page').first.click()
    page.wait_for_url(f"{base}/dags/airfleet_cluster_health_check/runs/**", timeout=15_000)
    page.get_by_text("check_fleet").first.wait_for(timeout=15_000)


def test_the_api_docs_render_in_a_browser_with_no_internet(browser, airflow):
    base = airflow["base"]
    page = browser.new_page()
    outside: list[str] = []

    def only_airflow(route):  # anything not from the api-server is refused, and noted
        if route.request.url.startswith(base):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    page.route("**/*", only_airflow)
    page.goto(f"{base}/airfleet/api/v1/docs")
    try:
        page.locator(".information-container .title").filter(has_text="Airfleet API") \
            .wait_for(timeout=30_000)
        page.locator(".opblock-summary-path", has_text="/api/v1/clusters/{name}/events") \
            .first.wait_for(timeout=15_000)
    finally:
        _shot(page, "api-docs.png")
    assert outside == []
