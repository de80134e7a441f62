"""The simulated Ray dashboards answer as the head address they are reached on says."""

from __future__ import annotations

import httpx
import pytest

from airfleet.backends.ssh import dashboard
from tests.fakes.ray_dashboards import RayDashboards, head_address

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def port():
    with RayDashboards(slow_seconds=0.3) as dashboards:
        yield dashboards.port


def _url(behaviour: str, i: int, port: int) -> str:
    return dashboard.url(head_address(behaviour, i), port)


def test_each_head_address_is_its_own_dashboard(port):
    nodes = dashboard.list_nodes(_url("healthy", 7, port))
    assert [(n.ip, n.state, n.is_head) for n in nodes] == [
        ("127.20.0.8", "ALIVE", True), ("10.20.0.8", "ALIVE", False)]
    assert dashboard.gcs_healthy(_url("failing", 0, port))
    assert [n.state for n in dashboard.list_nodes(_url("failing", 0, port))] == \
        ["ALIVE", "DEAD"]
    assert dashboard.gcs_healthy(_url("slow", 300, port))  # 127.23.1.51


def test_broken_answers_500_hanging_never_and_unknown_404(port):
    assert not dashboard.gcs_healthy(_url("broken", 0, port))
    with pytest.raises(httpx.HTTPStatusError, match="500"):
        dashboard.list_nodes(_url("broken", 0, port))
    assert not dashboard.gcs_healthy(_url("hanging", 0, port), timeout=0.3)
    assert httpx.get(f"http://127.99.0.1:{port}/api/gcs_healthz").status_code == 404
