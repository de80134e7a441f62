"""moto's EKS with the states real EKS passes through: a thin HTTP proxy in front of
``moto_server`` (tests/fakes/moto_server.py).

moto makes clusters and node groups ACTIVE the moment they are created and forgets them the
moment they are deleted (FACTS.md), so the waiting path of a flow would never run. Every
request goes to moto unchanged; what comes back for a describe is changed as EKS would show it:

- after a create (or a node group's update-config) the next ``creating_polls`` describes of
  that resource say ``CREATING`` (``UPDATING``);
- after a delete the next ``deleting_polls`` describes answer 200 with the resource as last
  seen and ``DELETING``, then moto's 404;
- :meth:`fail_nodegroup` makes every describe of a node group say ``CREATE_FAILED`` with a
  health issue, as EKS does when its instances cannot launch.

Real boto3 and aiobotocore clients reach it through an Airflow AWS connection whose
``endpoint_url`` extra is :attr:`url`. ``describes`` counts the describes per resource.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections import Counter
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_NODEGROUP = re.compile(r"^/clusters/(?P<cluster>[^/]+)/node-groups/(?P<ng>[^/]+)$")
_CLUSTER = re.compile(r"^/clusters/(?P<cluster>[^/]+)$")
_NODEGROUPS = re.compile(r"^/clusters/(?P<cluster>[^/]+)/node-groups$")
_UPDATE = re.compile(r"^/clusters/(?P<cluster>[^/]+)/node-groups/(?P<ng>[^/]+)/update-config$")
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


class EKSStateProxy:
    def __init__(self, upstream: str, *, creating_polls: int = 0, deleting_polls: int = 0):
        self.upstream = upstream
        self.creating_polls, self.deleting_polls = creating_polls, deleting_polls
        self.describes: Counter[str] = Counter()
        self.url = ""
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[str, int]] = {}  # resource -> (state, describes left)
        self._last: dict[str, dict] = {}  # resource -> last body seen (served while DELETING)
        self._failed: dict[str, dict] = {}  # node group -> health issue
        self._app = Starlette(routes=[Route("/{path:path}", self._forward,
                                            methods=["GET", "POST", "PUT", "DELETE", "PATCH"])])
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # ---- control ------------------------------------------------------------------------------

    def fail_nodegroup(self, cluster: str, nodegroup: str, *,
                       code: str = "AsgInstanceLaunchFailures",
                       message: str = "Could not launch On-Demand Instances. "
                                      "InsufficientInstanceCapacity") -> None:
        with self._lock:
            self._failed[f"nodegroup/{cluster}/{nodegroup}"] = {
                "code": code, "message": message, "resourceIds": [f"eks-{nodegroup}-asg"]}

    def reset(self) -> None:
        with self._lock:
            self._pending.clear()
            self._last.clear()
            self._failed.clear()
            self.describes.clear()

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> EKSStateProxy:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(
            self._app, log_config=None, log_level="warning", access_log=False,
            lifespan="off", ws="none", http="h11"))
        self._thread = threading.Thread(target=asyncio.run, daemon=True,
                                        args=(self._server.serve(sockets=[sock]),))
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the EKS proxy did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    def __enter__(self) -> EKSStateProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- the proxy ----------------------------------------------------------------------------

    async def _forward(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        key = self._resource(path)
        shown = None  # the state this describe shows instead of moto's
        if method == "GET" and key:
            with self._lock:
                self.describes[key] += 1
                state, left = self._pending.pop(key, (None, 0))
                if left > 1:
                    self._pending[key] = (state, left - 1)
                if left:
                    shown = state
                if shown == "DELETING":
                    return self._json(200, self._with_state(self._last[key], "DELETING"))
        async with httpx.AsyncClient(base_url=self.upstream, timeout=30) as client:
            upstream = await client.request(
                method, path, params=request.query_params, content=await request.body(),
                headers={k: v for k, v in request.headers.items() if k.lower() not in _HOP})
        if upstream.status_code >= 300 or not upstream.content:
            return Response(upstream.content, upstream.status_code,
                            headers=self._headers(upstream))
        body = upstream.json()
        with self._lock:
            self._observe(method, path, key, body)
            if method == "GET" and key:
                if key in self._failed:
                    body = self._with_state(body, "CREATE_FAILED", self._failed[key])
                elif shown:
                    body = self._with_state(body, shown)
                return self._json(upstream.status_code, body)
        return Response(upstream.content, upstream.status_code, headers=self._headers(upstream))

    def _observe(self, method: str, path: str, key: str | None, body: dict) -> None:
        """Start the states a write leads to; remember resources as last seen."""
        if key:
            self._last[key] = body
        if method == "POST" and path == "/clusters":
            self._start(f"cluster/{body['cluster']['name']}", "CREATING", self.creating_polls)
        elif method == "POST" and (m := _NODEGROUPS.match(path)):
            self._start(f"nodegroup/{m['cluster']}/{body['nodegroup']['nodegroupName']}",
                        "CREATING", self.creating_polls)
        elif method == "POST" and (m := _UPDATE.match(path)):
            self._start(f"nodegroup/{m['cluster']}/{m['ng']}", "UPDATING", self.creating_polls)
        elif method == "DELETE" and key:
            self._start(key, "DELETING", self.deleting_polls)

    def _start(self, key: str, state: str, polls: int) -> None:
        if polls:
            self._pending[key] = (state, polls)

    @staticmethod
    def _resource(path: str) -> str | None:
        if m := _NODEGROUP.match(path):
            return f"nodegroup/{m['cluster']}/{m['ng']}"
        if m := _CLUSTER.match(path):
            return f"cluster/{m['cluster']}"
        return None

    @staticmethod
    def _with_state(body: dict, state: str, issue: dict | None = None) -> dict:
        body = json.loads(json.dumps(body))
        resource = body.get("cluster") or body.get("nodegroup")
        resource["status"] = state
        if issue:
            resource.setdefault("health", {})["issues"] = [issue]
        return body

    @staticmethod
    def _json(status: int, body: dict) -> Response:
        return Response(json.dumps(body), status, media_type="application/json")

    @staticmethod
    def _headers(upstream: httpx.Response) -> dict[str, str]:
        return {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
