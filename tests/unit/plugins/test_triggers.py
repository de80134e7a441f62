"""The drain trigger against a real HTTP server that answers like Ray's dashboard."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from airflow.sdk.module_loading import import_string

from airfleet_airflow.triggers import RayNodesDeadTrigger

NODES = {"10.0.0.2": "a1", "10.0.0.3": "b2"}


class Dashboard:
    """``/api/v0/nodes`` with node states the test changes while the trigger polls."""

    def __init__(self):
        self.states = {"a1": "ALIVE", "b2": "ALIVE"}
        self.requests = 0
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                dashboard.requests += 1
                rows = [{"node_id": i, "node_ip": ip, "state": dashboard.states[i],
                         "is_head_node": False} for ip, i in NODES.items()]
                body = json.dumps({"data": {"result": {"result": rows}}}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dash():
    d = Dashboard()
    yield d
    d.close()


def first_event(trigger):
    async def go():
        async for event in trigger.run():
            return event.payload
    return asyncio.run(asyncio.wait_for(go(), 30))


def test_serialize_round_trip():
    trigger = RayNodesDeadTrigger("http://h:8265", NODES, 1234.5, poll_interval=2)
    path, kwargs = trigger.serialize()
    again = import_string(path)(**kwargs)
    assert again.serialize() == (path, kwargs)
    assert kwargs == {"dashboard_url": "http://h:8265", "nodes": NODES, "deadline": 1234.5,
                      "poll_interval": 2}


def test_reports_dead_once_every_drained_node_is(dash):
    def die_later():
        time.sleep(0.5)
        dash.states["a1"] = "DEAD"
        time.sleep(0.5)
        dash.states["b2"] = "DEAD"

    threading.Thread(target=die_later).start()
    event = first_event(RayNodesDeadTrigger(dash.url, NODES, time.time() + 20, 0.1))
    assert event == {"status": "dead", "alive": [], "dead": list(NODES),
                     "message": "every drained node is DEAD"}
    assert dash.requests >= 3  # it polled until both were DEAD


def test_reports_the_nodes_still_alive_at_the_deadline(dash):
    dash.states["a1"] = "DEAD"
    started = time.monotonic()
    event = first_event(RayNodesDeadTrigger(dash.url, NODES, time.time() + 1, 0.2))
    assert event["status"] == "deadline" and event["alive"] == ["10.0.0.3"]
    assert event["dead"] == ["10.0.0.2"]
    assert 0.8 <= time.monotonic() - started < 5


def test_a_silent_dashboard_is_asked_until_the_deadline():
    event = first_event(RayNodesDeadTrigger("http://127.0.0.1:9", NODES, time.time() + 1, 0.2))
    assert event["status"] == "deadline" and event["alive"] == list(NODES)
    assert event["message"].startswith("dashboard did not answer")


@pytest.mark.parametrize("trigger_class, wait", [
    ("EksWaitTrigger", {"kind": "eks_nodegroup_active", "what": "EKS node group c/gpu CREATING",
                        "args": {"cluster": "c", "nodegroup": "gpu", "region": "eu-west-1",
                                 "aws_conn_id": "aws_default", "timeout": 1800}}),
    ("AksOperationTrigger", {"kind": "azure_operation", "what": "agentPool c/gpu: create",
                             "args": {"azure_conn_id": "azure_default", "subscription_id": "s",
                                      "resource_group": "rg", "cluster": "c", "pool": "gpu",
                                      "operation": "agent_pools.begin_create_or_update",
                                      "continuation_token": "eyJ2ZXJzaW9uIjoxfQ==",
                                      "timeout": 3600}}),
])
def test_cloud_wait_triggers_round_trip_and_carry_no_secret(trigger_class, wait):
    from airfleet_airflow import triggers

    trigger = triggers.cloud_wait_trigger(wait, 0.5)
    assert type(trigger).__name__ == trigger_class
    path, kwargs = trigger.serialize()
    assert import_string(path)(**kwargs).serialize() == (path, kwargs)
    assert kwargs == {"wait": wait, "poll_interval": 0.5}


def test_a_wait_of_an_unknown_kind_has_no_trigger():
    from airfleet_airflow.triggers import cloud_wait_trigger

    with pytest.raises(ValueError, match="no trigger waits on 'gce_cluster'"):
        cloud_wait_trigger({"kind": "gce_cluster", "what": "?", "args": {}}, 1)
