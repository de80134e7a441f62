"""The mock inference engine (include/airfleet_mock_engine): its OpenAI-compatible API in
process (httpx's ASGI transport), its queue and metrics, its CLI as a real uvicorn process
streaming over loopback, and its Ray Serve application object (built, not run)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import pytest
from airfleet_mock_engine import Engine, EngineConfig, build_app
from airfleet_mock_engine.__main__ import main as cli_main
from airfleet_mock_engine.engine import _Sequence

from tests.router_support import ROOT, free_port, wait_http

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def make_app(**kwargs):
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("engine_id", "engine-a")
    return build_app(EngineConfig(**kwargs))


def run(app, scenario):
    """Run ``scenario(client)`` against ``app`` over httpx's ASGI transport."""
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
            return await scenario(client)
    return asyncio.run(main())


def call(app, method, path, **kwargs) -> httpx.Response:
    return run(app, lambda c: c.request(method, path, **kwargs))


def sse(text: str) -> list:
    """The events of an SSE body: parsed JSON chunks, and the final "[DONE]"."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metrics(app) -> dict[str, float]:
    """``name{labels}`` -> value from /metrics, checking each sample has a TYPE line."""
    text = call(app, "GET", "/metrics").text
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    out = {}
    for name, labels, value in re.findall(r"^([^#\s{]+)\{([^}]*)\} (\S+)$", text, re.M):
        family = name.removesuffix("_total") if types.get(name) is None else name
        assert family in types, f"{name} has no # TYPE line"
        out[f"{name}{{{labels}}}"] = float(value)
    return out


LABELS = f'model_name="{MODEL}",engine="0"'


# ---- plain endpoints -----------------------------------------------------------------------------

def test_health_and_models():
    app = make_app(served_model_names=("chat", "chat-alias"), max_model_len=2048)
    health = call(app, "GET", "/health")
    assert (health.status_code, health.content) == (200, b"")
    assert health.headers["x-airfleet-engine"] == "engine-a"

    models = call(app, "GET", "/v1/models")
    assert models.status_code == 200
    body = models.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["chat", "chat-alias"]
    for m in body["data"]:
        assert (m["object"], m["owned_by"], m["root"], m["max_model_len"]) == \
            ("model", "airfleet-mock", MODEL, 2048)
        assert isinstance(m["created"], int)


def test_served_name_defaults_to_model_and_engine_id_to_host():
    import socket

    config = EngineConfig(model=MODEL)
    assert config.served_model_names == (MODEL,)
    assert config.engine_id == socket.gethostname()
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(model=MODEL, max_num_seqs=0)
    with pytest.raises(ValueError, match="token_latency_ms"):
        EngineConfig(model=MODEL, token_latency_ms=-1)


# ---- completions, whole ------------------------------------------------------------------------

def test_chat_completion_is_deterministic_with_usage():
    app = make_app()
    body = {"model": MODEL, "max_tokens": 5, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what is  ray serve"}]}]}
    first = call(app, "POST", "/v1/chat/completions", json=body)
    assert first.status_code == 200, first.text
    assert first.headers["x-airfleet-engine"] == "engine-a"
    out = first.json()
    assert out["object"] == "chat.completion"
    assert out["model"] == MODEL
    assert out["system_fingerprint"] == "engine-a"
    assert out["id"].startswith("chatcmpl-")
    [choice] = out["choices"]
    # The last message's words, cycled, max_tokens of them.
    assert choice["message"] == {"role": "assistant", "content": "what is ray serve what"}
    assert choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}
    second = call(app, "POST", "/v1/chat/completions", json=body).json()
    assert second["choices"] == out["choices"] and second["id"] != out["id"]


def test_completion_default_max_tokens_and_stop():
    app = make_app()
    out = call(app, "POST", "/v1/completions", json={"model": MODEL, "prompt": "one two"}).json()
    assert out["object"] == "text_completion"
    [choice] = out["choices"]
    assert choice["text"] == " ".join(["one", "two"] * 8)  # 16 tokens by default
    assert (choice["finish_reason"], out["usage"]["completion_tokens"]) == ("length", 16)

    stopped = call(app, "POST", "/v1/completions",
                   json={"model": MODEL, "prompt": "a b STOP c", "stop": ["STOP"]}).json()
    assert stopped["choices"][0]["text"] == "a b"
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}

    ids = call(app, "POST", "/v1/completions",
               json={"model": MODEL, "prompt": [[11, 12, 13]], "max_tokens": 4}).json()
    assert ids["choices"][0]["text"] == "11 12 13 11"


# ---- completions, streamed ---------------------------------------------------------------------

def test_chat_stream_role_first_then_deltas_then_done():
    app = make_app(served_model_names=("chat",))
    response = call(app, "POST", "/v1/chat/completions", json={
        "model": "chat", "stream": True, "max_tokens": 4,
        "messages": [{"role": "user", "content": "hello mock world"}]})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-airfleet-engine"] == "engine-a"
    events = sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "chat"
               and c["system_fingerprint"] == "engine-a" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "hello mock world hello"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["length"]


def test_completion_stream_with_usage_chunk():
    app = make_app()
    response = call(app, "POST", "/v1/completions", json={
        "model": MODEL, "prompt": "x y z", "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    events = sse(response.text)
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "x y z"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks)  # as OpenAI: null until the last chunk
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("extra", [{}, {"stop": "c"}, {"max_tokens": 1}])
def test_fast_path_and_timed_path_answer_the_same(stream, extra):
    """At zero latency the engine answers at once (no per-token generator); with latency it
    generates token by token: both must give the same text, finish_reason and usage."""
    body = {"model": MODEL, "stream": stream, "max_tokens": 7,
            "messages": [{"role": "user", "content": "a b c d"}], **extra}
    if stream:
        body["stream_options"] = {"include_usage": True}

    def answer(app):
        response = call(app, "POST", "/v1/chat/completions", json=body)
        if not stream:
            out = response.json()
            return out["choices"][0]["message"]["content"], \
                out["choices"][0]["finish_reason"], out["usage"]
        events = sse(response.text)[:-1]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        return text, events[-2]["choices"][0]["finish_reason"], events[-1]["usage"]

    fast, timed = make_app(), make_app(token_latency_ms=1, first_token_latency_ms=1)
    assert answer(fast) == answer(timed)
    assert metrics(fast) == metrics(timed)
    expected = {(): "a b c d a b c", ("c",): "a b", (1,): "a"}[tuple(extra.values())]
    assert answer(fast)[0] == expected


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, status, param, message", [
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
     404, "model", "The model `nope` does not exist."),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "messages"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "   "}, 400, "prompt", "empty"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens",
     "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stream_options": {}}, 400,
     "stream_options", "stream=True"),
    ("/v1/completions", {"model": MODEL, "prompt": " ".join(["w"] * 40)}, 400, "prompt",
     "maximum context length is 32 tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a b", "max_tokens": 31}, 400, "max_tokens",
     "maximum context length is 32 tokens"),
])
def test_errors_have_openai_shape(path, body, status, param, message):
    response = call(make_app(max_model_len=32), "POST", path, json=body)
    assert response.status_code == status, response.text
    assert response.headers["x-airfleet-engine"] == "engine-a"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    assert (error["param"], error["code"]) == (param, status)
    assert message in error["message"]


def test_malformed_json_and_unknown_route():
    app = make_app()
    bad = call(app, "POST", "/v1/chat/completions", content=b'{"model": ',
               headers={"content-type": "application/json"})
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "BadRequestError"
    assert "not valid JSON" in bad.json()["error"]["message"]
    not_object = call(app, "POST", "/v1/completions", json=["prompt"])
    assert not_object.status_code == 400
    missing = call(app, "GET", "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404


# ---- scheduling and metrics --------------------------------------------------------------------

def test_metrics_use_vllm_names_types_and_labels():
    app = make_app()
    call(app, "POST", "/v1/completions", json={"model": MODEL, "prompt": "a b c",
                                               "max_tokens": 4})
    response = call(app, "GET", "/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    for line in ("# TYPE vllm:num_requests_running gauge",
                 "# TYPE vllm:num_requests_waiting gauge",
                 "# TYPE vllm:kv_cache_usage_perc gauge",
                 "# TYPE vllm:prompt_tokens counter",
                 "# TYPE vllm:generation_tokens counter",
                 "# TYPE vllm:request_success counter"):
        assert line in response.text.splitlines()
    assert metrics(app) == {
        f"vllm:num_requests_running{{{LABELS}}}": 0.0,
        f"vllm:num_requests_waiting{{{LABELS}}}": 0.0,
        f"vllm:kv_cache_usage_perc{{{LABELS}}}": 0.0,
        f"vllm:prompt_tokens_total{{{LABELS}}}": 3.0,
        f"vllm:generation_tokens_total{{{LABELS}}}": 4.0,
        f'vllm:request_success_total{{{LABELS},finished_reason="stop"}}': 0.0,
        f'vllm:request_success_total{{{LABELS},finished_reason="length"}}': 1.0,
        f'vllm:request_success_total{{{LABELS},finished_reason="abort"}}': 0.0,
    }


def test_max_num_seqs_queues_the_rest_and_metrics_show_it():
    app = make_app(max_num_seqs=1, first_token_latency_ms=400, max_model_len=100)
    body = {"model": MODEL, "prompt": "a b c d e", "max_tokens": 2}

    async def scenario(client):
        started = time.monotonic()
        first = asyncio.create_task(client.post("/v1/completions", json=body))
        second = asyncio.create_task(client.post("/v1/completions", json=body))
        await asyncio.sleep(0.2)
        during = (await client.get("/metrics")).text
        answers = await asyncio.gather(first, second)
        return during, answers, time.monotonic() - started

    during, answers, elapsed = run(app, scenario)
    assert [a.status_code for a in answers] == [200, 200]
    assert f"vllm:num_requests_running{{{LABELS}}} 1.0" in during
    assert f"vllm:num_requests_waiting{{{LABELS}}} 1.0" in during
    # One running sequence: 5 prompt tokens of a 1 x 100 token cache.
    assert f"vllm:kv_cache_usage_perc{{{LABELS}}} 0.05" in during
    assert elapsed >= 0.8  # one after the other, not side by side
    after = metrics(app)
    assert after[f"vllm:num_requests_running{{{LABELS}}}"] == 0
    assert after[f"vllm:num_requests_waiting{{{LABELS}}}"] == 0
    assert after[f'vllm:request_success_total{{{LABELS},finished_reason="length"}}'] == 2


def test_queue_is_first_come_first_served():
    engine = Engine(EngineConfig(model=MODEL, max_num_seqs=1, token_latency_ms=1))
    order = []

    async def one(name):
        seq = _Sequence(prompt_tokens=1, words=("w",), max_tokens=2)
        async for _ in engine.generate(seq):
            pass
        order.append(name)

    async def main():
        tasks = []
        for name in "abcde":
            tasks.append(asyncio.create_task(one(name)))
            await asyncio.sleep(0)  # arrive in this order
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert order == list("abcde")
    assert (engine.running, len(engine.waiting), engine.kv_tokens) == (0, 0, 0)


async def post_then_leave(app, path: str, body: dict, leave_after: int) -> list[dict]:
    """POST ``body`` straight to the ASGI app; the client disconnects once it has received
    ``leave_after`` messages. Returns the messages the app sent."""
    sent, gone = [], asyncio.Event()
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if len(sent) >= leave_after:
            gone.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    await asyncio.wait_for(app(scope, receive, send), 5)
    return sent


def test_client_disconnect_aborts_and_frees_the_slot():
    """A client that goes away mid-stream: the sequence stops, its slot is given back and it
    counts as finished_reason="abort" (vLLM aborts such requests too). One that goes away
    while queued leaves the queue."""
    app = make_app(max_num_seqs=1, token_latency_ms=50)
    body = {"model": MODEL, "prompt": "a b", "max_tokens": 100, "stream": True}

    async def main():
        running = asyncio.create_task(post_then_leave(app, "/v1/completions", body, 4))
        await asyncio.sleep(0.01)
        queued = await post_then_leave(app, "/v1/completions", body, 1)
        waiting = len(app.state.engine.waiting)
        return await running, queued, waiting

    running, queued, waiting_after_queued_left = asyncio.run(main())
    assert running[0]["status"] == 200
    assert 4 <= len(running) < 10  # start + a few tokens, not the 100
    assert [m["type"] for m in queued] == ["http.response.start"]
    assert waiting_after_queued_left == 0
    after = metrics(app)
    assert after[f'vllm:request_success_total{{{LABELS},finished_reason="abort"}}'] == 1
    assert after[f"vllm:num_requests_running{{{LABELS}}}"] == 0
    assert after[f"vllm:kv_cache_usage_perc{{{LABELS}}}"] == 0
    # The slot is free again: a new request is served at once.
    done = call(app, "POST", "/v1/completions", json={**body, "stream": False, "max_tokens": 2})
    assert done.json()["choices"][0]["text"] == "a b"


# ---- the CLI ------------------------------------------------------------------------------------

def test_cli_refuses_unknown_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--model", "m", "--gpu-memory-utilization", "0.9"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --gpu-memory-utilization" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--model", "m", "--max-num-seqs", "0"])
    assert "--max-num-seqs: must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--port", "8000"])  # --model is required
    assert "--model" in capsys.readouterr().err


def test_cli_serves_and_streams_over_loopback(tmp_path):
    port = free_port()
    log = open(tmp_path / "engine.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "airfleet_mock_engine", "--host", "127.0.0.1",
         "--port", str(port), "--model", MODEL, "--served-model-name", "chat", "chat-b",
         "--engine-id", "cli-1", "--first-token-latency-ms", "100", "--token-latency-ms", "100",
         "--uvicorn-log-level", "warning"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "include")})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", ok=lambda r: r.status_code == 200, proc=proc)
        names = [m["id"] for m in httpx.get(f"{url}/v1/models", trust_env=False).json()["data"]]
        assert names == ["chat", "chat-b"]
        arrivals, lines = [], []
        body = {"model": "chat-b", "stream": True, "max_tokens": 4,
                "messages": [{"role": "user", "content": "stream me please"}]}
        with httpx.Client(trust_env=False, timeout=10) as client:
            started = time.monotonic()
            with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                assert response.headers["x-airfleet-engine"] == "cli-1"
                for line in response.iter_lines():
                    if line:
                        arrivals.append(time.monotonic() - started)
                        lines.append(line)
        events = sse("".join(f"{line}\n\n" for line in lines))
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert text == "stream me please stream"
        assert {e["system_fingerprint"] for e in events[:-1]} == {"cli-1"}
        # Streamed as generated: the first token after ~0.1 s, the last after ~0.4 s.
        token_arrivals = arrivals[1:5]
        assert token_arrivals[0] < 0.35, arrivals
        assert token_arrivals[-1] - token_arrivals[0] >= 0.25, arrivals
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    # A graceful stop: uvicorn shuts down, then re-raises the SIGTERM it caught.
    output = (tmp_path / "engine.log").read_text()
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output and "ERROR" not in output, output


# ---- Ray Serve ----------------------------------------------------------------------------------

def test_serve_app_builder_builds_the_application():
    from airfleet_mock_engine.serve import DEPLOYMENT_NAME, app_builder, config_kwargs
    from ray.serve import Application

    app = app_builder({"model": MODEL, "served_model_name": "chat", "token_latency_ms": "20",
                       "max-num-seqs": 8})
    assert isinstance(app, Application)
    deployment = app._bound_deployment
    assert deployment.name == DEPLOYMENT_NAME
    assert deployment.init_args == ({"model": MODEL, "served_model_names": ("chat",),
                                     "token_latency_ms": 20.0, "max_num_seqs": 8},)
    # The replica builds the very app the CLI serves.
    replica = SimpleNamespace(_config={**deployment.init_args[0], "engine_id": "replica-1"})
    replica_app = deployment.func_or_class.__serve_build_asgi_app__(replica)
    out = call(replica_app, "POST", "/v1/completions",
               json={"model": "chat", "prompt": "p q", "max_tokens": 2}).json()
    assert (out["choices"][0]["text"], out["system_fingerprint"]) == ("p q", "replica-1")

    for bad, match in (({}, "args.model: required"),
                       ({"model": MODEL, "num_replicas": 2}, "args.num_replicas: unknown"),
                       ({"model": MODEL, "max_num_seqs": "many"}, "args.max_num_seqs"),
                       ({"model": MODEL, "max_num_seqs": 0}, "max_num_seqs")):
        with pytest.raises(ValueError, match=match):
            config_kwargs(bad)


# A local Ray of its own (address="local", its own temp dir and namespace), the mock engine
# deployed by app_builder with the package shipped as py_modules, as a static-nodes cluster
# does. It prints READY, serves until its stdin closes, then shuts down what it started
# (ray.shutdown stops the processes of the cluster this driver started, and only those).
_RAY_DRIVER = """
import sys
import ray
from ray import serve

temp_dir, package, http_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, package.rsplit("/", 1)[0])
from airfleet_mock_engine.serve import app_builder

ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir,
         namespace="airfleet-mock-engine-test", runtime_env={"py_modules": [package]},
         log_to_driver=False)
try:
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    serve.run(app_builder({"model": "m", "served_model_name": "chat", "engine_id": "ray-1",
                           "token_latency_ms": 50, "first_token_latency_ms": 50}),
              name="chat-v1", route_prefix="/chat-v1")
    print("READY", flush=True)
    sys.stdin.read()
finally:
    serve.shutdown()
    ray.shutdown()
print("STOPPED", flush=True)
"""


@pytest.mark.integration
def test_serve_application_streams_on_a_local_ray(tmp_path):
    # Ray's socket paths must stay short (AF_UNIX limit): not under pytest's deep tmp_path.
    import tempfile
    temp_dir = tempfile.mkdtemp(prefix="amock-ray-", dir="/tmp")
    port = free_port()
    log = open(tmp_path / "driver.log", "wb")  # noqa: SIM115 (closed below)
    driver = subprocess.Popen(
        [sys.executable, "-c", _RAY_DRIVER, temp_dir,
         str(ROOT / "include" / "airfleet_mock_engine"), str(port)],
        cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
        start_new_session=True)  # its own process group: Ray's processes join it
    try:
        # Up in 15-50 s on a busy 2-core machine; a hung start fails here, not at pytest's
        # timeout.
        up, _, _ = select.select([driver.stdout], [], [], 180)
        ready = driver.stdout.readline() if up else "(nothing within 180 s)"
        assert ready.strip() == "READY", (tmp_path / "driver.log").read_text()[-3000:]
        url = f"http://127.0.0.1:{port}/chat-v1"
        body = {"model": "chat", "stream": True, "max_tokens": 3,
                "messages": [{"role": "user", "content": "through ray serve"}]}
        arrivals, lines = [], []
        with httpx.Client(trust_env=False, timeout=30) as client:
            assert client.get(f"{url}/v1/models").json()["data"][0]["id"] == "chat"
            started = time.monotonic()
            with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                assert response.headers["x-airfleet-engine"] == "ray-1"
                for line in response.iter_lines():
                    if line:
                        arrivals.append(time.monotonic() - started)
                        lines.append(line)
        events = sse("".join(f"{line}\n\n" for line in lines))
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["delta"].get("content", "")
                       for e in events[:-1]) == "through ray serve"
        assert arrivals[-1] - arrivals[1] >= 0.08, arrivals  # chunk by chunk, not at once
    finally:
        if driver.poll() is None:
            driver.stdin.close()
            try:
                driver.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
                driver.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    # Ray's own lines may come first (the raylet's, through the driver's stdout).
    assert driver.stdout.read().strip().endswith("STOPPED"), \
        (tmp_path / "driver.log").read_text()[-3000:]
