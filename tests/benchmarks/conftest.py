"""The benchmarks' order: what the SSH tunnel costs one probe is measured first
(test_tunnel_cost.py), so the health benchmark's projection for a fleet reached through
tunnels uses this run's figure (results/tunnel_cost.json) and not one printed on an earlier day."""

from __future__ import annotations

FIRST = "tests/benchmarks/test_tunnel_cost.py"


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid.split("::", 1)[0] != FIRST)  # stable otherwise
