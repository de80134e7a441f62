"""Helpers shared by the router's tests (router/airfleet_router).

Importing this module puts ``router/`` on ``sys.path`` (the router is a service of its own,
not part of the airfleet package). It also runs, as real processes:

- :class:`Upstream`: a tiny OpenAI-shaped inference server (Starlette + uvicorn) that answers
  which upstream it is (also in the header ``X-Airfleet-Engine``), and streams Server-Sent
  Events with a delay between chunks for ``"stream": true``; its ``/metrics`` shows vLLM's
  load gauges (requests in flight as running, plus a waiting count a test sets with
  ``set_waiting``); started as ``python -m tests.router_support upstream NAME`` on a socket
  the test bound (no port race);
- :class:`MockEngine`: the project's mock engine (the stand-in for vLLM), as a process;
- :class:`RouterProcess`: ``python -m airfleet_router`` with the environment pointing at a
  (fake) Kubernetes API, its output captured to a file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ROUTER_DIR = ROOT / "router"
if str(ROUTER_DIR) not in sys.path:
    sys.path.insert(0, str(ROUTER_DIR))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 15, ok=lambda r: r.status_code < 500,
              proc: subprocess.Popen | None = None) -> httpx.Response:
    """GET ``url`` until ``ok(response)``; fails early if ``proc`` exited."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}")
        try:
            response = httpx.get(url, timeout=2, trust_env=False)
            if ok(response):
                return response
            last = response
        except httpx.TransportError as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready within {timeout} s (last: {last!r})")


def pod(name: str, model: str | None, port: int, *, ready: bool = True,
        ip: str = "127.0.0.1", namespace: str = "airfleet-test", port_name: str = "http",
        annotations: dict | None = None, version: str | None = None,
        served_model: str | None = None, endpoint: str = "true",
        metrics_port: int | None = None) -> dict:
    """An endpoint pod as the API shows it (scheduled, with an IP, Ready or not), as the
    endpoint deploy flow labels it: ``version`` and ``served_model`` (the exact name, in the
    annotation ``airfleet.io/served-model``) when given."""
    labels = {"airfleet.io/endpoint": endpoint}
    if model is not None:
        labels["airfleet.io/model"] = model
    if version is not None:
        labels["airfleet.io/version"] = version
    annotations = dict(annotations or {})
    if served_model is not None:
        annotations["airfleet.io/served-model"] = served_model
    meta: dict = {"name": name, "namespace": namespace, "labels": labels}
    if annotations:
        meta["annotations"] = annotations
    ports = [{"name": port_name, "containerPort": port}]
    if metrics_port is not None:
        ports.append({"name": "metrics", "containerPort": metrics_port})
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {"containers": [{"name": "server", "image": "vllm/vllm-openai:v0.11.0",
                                 "ports": ports}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


# ---- the upstream (an inference server stand-in) ---------------------------------------------

class Upstream:
    """A running upstream process named ``name`` on 127.0.0.1:``port``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(1024)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        fd = self._sock.fileno()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.router_support", "upstream", name, str(fd)],
            pass_fds=[fd], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        # The child has its copy: ours would keep accepting (and never answering) connections
        # once the child is gone, where a dead server refuses them.
        self._sock.close()

    def wait(self) -> Upstream:
        wait_http(f"{self.url}/health", proc=self.proc)
        return self

    def set_waiting(self, waiting: int) -> None:
        """What ``vllm:num_requests_waiting`` shows from now on (other clients' queue)."""
        response = httpx.post(f"{self.url}/admin/waiting", json={"waiting": waiting},
                              trust_env=False)
        response.raise_for_status()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _upstream_app(name: str):
    import asyncio

    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    state = {"running": 0, "waiting": 0}

    async def infer(request: Request):
        state["running"] += 1
        try:
            response = await answer(request)
        except BaseException:
            state["running"] -= 1
            raise
        if isinstance(response, StreamingResponse):
            response.background = BackgroundTask(done)
        else:
            done()
        response.headers["x-airfleet-engine"] = name
        return response

    def done() -> None:
        state["running"] -= 1

    async def answer(request: Request):
        body = await request.json()
        seen = {"upstream": name, "model": body.get("model"), "path": request.url.path,
                "query": request.url.query,
                "authorization": request.headers.get("authorization"),
                "x_test": request.headers.get("x-test"),
                "cookie": request.headers.get("cookie")}
        if not body.get("stream"):
            response = JSONResponse(seen, headers={"x-upstream": name})
            if body.get("set_cookie"):
                response.set_cookie("session", body["set_cookie"])
            return response
        delay, chunks = float(body.get("delay", 0.3)), int(body.get("chunks", 3))

        async def events():
            for i in range(chunks):
                yield f"data: {json.dumps({**seen, 'chunk': i})}\n\n".encode()
                await asyncio.sleep(delay)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-upstream": name})

    async def health(request: Request):
        return JSONResponse({"upstream": name})

    async def metrics(request: Request):
        return PlainTextResponse(
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="m"}} {float(state["running"])}\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="m"}} {float(state["waiting"])}\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            'vllm:kv_cache_usage_perc{model_name="m"} 0.0\n')

    async def set_waiting(request: Request):
        state["waiting"] = int((await request.json())["waiting"])
        return JSONResponse(state)

    return Starlette(routes=[Route("/v1/chat/completions", infer, methods=["POST"]),
                             Route("/v1/completions", infer, methods=["POST"]),
                             Route("/health", health), Route("/metrics", metrics),
                             Route("/admin/waiting", set_waiting, methods=["POST"])])


class MockEngine:
    """``python -m airfleet_mock_engine`` (include/airfleet_mock_engine): OpenAI-compatible,
    vLLM's /metrics names, ``X-Airfleet-Engine: <engine id>`` on every response; it answers
    as each of ``models`` (its served names)."""

    def __init__(self, engine_id: str, *models: str) -> None:
        self.engine_id = engine_id
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "airfleet_mock_engine", "--host", "127.0.0.1", "--port",
             str(self.port), "--model", models[0], "--served-model-name", *models,
             "--engine-id", engine_id, "--token-latency-ms", "0",
             "--uvicorn-log-level", "warning"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT / "include")})

    def wait(self) -> MockEngine:
        wait_http(f"{self.url}/health", proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- the router ------------------------------------------------------------------------------

class RouterProcess:
    """``python -m airfleet_router [args]`` with ``AIRFLEET_ROUTER_*`` from the keywords (only
    those given, plus host and a free port); stdout and stderr go to ``log``."""

    def __init__(self, log: Path, *, api_url: str | None = None, namespace: str | None = None,
                 token_file: Path | None = None, args: tuple[str, ...] = (),
                 **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.token_file = token_file
        self._out = open(log, "wb")  # noqa: SIM115 (closed in stop)
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("AIRFLEET_ROUTER_", "KUBERNETES_"))}
        given = {"API_URL": api_url, "NAMESPACE": namespace,
                 "TOKEN_FILE": str(token_file) if token_file else None,
                 "HOST": "127.0.0.1", "PORT": str(self.port)}
        environ.update({f"AIRFLEET_ROUTER_{k}": v for k, v in given.items() if v is not None})
        environ.update(env, PYTHONPATH=str(ROUTER_DIR))
        self.proc = subprocess.Popen([sys.executable, "-m", "airfleet_router", *args],
                                     env=environ, cwd=ROOT, stdout=self._out,
                                     stderr=subprocess.STDOUT)

    def wait_synced(self, timeout: float = 15) -> RouterProcess:
        wait_http(f"{self.url}/healthz", timeout, ok=lambda r: r.status_code == 200,
                  proc=self.proc)
        return self

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def _serve_upstream(name: str, fd: int) -> None:
    import uvicorn

    # socket(fileno=) detects the family (AF_INET), so the event loop sets TCP_NODELAY on
    # accepted connections; uvicorn's own fd= option would take it for a Unix socket and leave
    # Nagle on (40 ms stalls against delayed ACKs).
    sock = socket.socket(fileno=fd)
    config = uvicorn.Config(_upstream_app(name), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    if sys.argv[1:2] == ["upstream"]:
        _serve_upstream(sys.argv[2], int(sys.argv[3]))
