"""The mock engine: its configuration, its scheduler and the OpenAI-compatible ASGI app.

Everything a request touches is here, built for a lean request path: raw Starlette routes,
``json`` from the standard library, one small :class:`_Sequence` per request, SSE chunks from
pre-rendered templates. The package imports only the standard library, ``starlette`` and
``uvicorn``: it is uploaded as-is to Ray nodes and runs as a container command.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

OWNER = "airfleet-mock"
DEFAULT_MAX_TOKENS = 16
ENGINE_HEADER = "x-airfleet-engine"
# Which vLLM engine core the metrics describe: vLLM labels every metric with model_name and
# engine (the engine core's index, "0" for a single one); the mock has one.
ENGINE_INDEX = "0"
FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class EngineConfig:
    """What ``python -m airfleet_mock_engine`` flags and Serve ``args`` set.

    :param model: the model it pretends to serve (``root`` in ``/v1/models``).
    :param served_model_names: the names clients send as ``"model"`` (default: ``model``).
    :param engine_id: told in each response's ``X-Airfleet-Engine`` header and
        ``system_fingerprint`` (default: the host name).
    :param token_latency_ms: sleep before each token after the first (0: no sleep at all).
    :param first_token_latency_ms: sleep before the first token (0: no sleep at all).
    :param max_num_seqs: sequences generating at once; more wait, first come first served.
    :param max_model_len: longest prompt + completion, in whitespace-separated tokens.
    """

    model: str
    served_model_names: tuple[str, ...] = ()
    engine_id: str = ""
    token_latency_ms: float = 0.0
    first_token_latency_ms: float = 0.0
    max_num_seqs: int = 256
    max_model_len: int = 4096

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model: a non-empty name is required")
        names = self.served_model_names
        if isinstance(names, str):
            names = (names,)
        names = tuple(names) or (self.model,)
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"served_model_names: non-empty names are required, not {names!r}")
        object.__setattr__(self, "served_model_names", names)
        # In a pod both name the pod; $HOSTNAME first, as a shell would (and as tests' pods,
        # processes of one host, are told apart).
        object.__setattr__(self, "engine_id", self.engine_id or os.environ.get("HOSTNAME")
                           or socket.gethostname())
        for name in ("token_latency_ms", "first_token_latency_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name}: a number of milliseconds >= 0, not {value!r}")
        for name in ("max_num_seqs", "max_model_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: an integer >= 1, not {value!r}")

    @property
    def kv_cache_capacity(self) -> int:
        """Tokens the modelled KV cache holds: a full batch of full-length sequences."""
        return self.max_num_seqs * self.max_model_len


class RequestError(Exception):
    """A request the engine refuses; rendered in OpenAI's (and vLLM's) error shape."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 type_: str = "BadRequestError") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type_


@dataclass(eq=False)
class _Sequence:
    """One request inside the engine."""

    prompt_tokens: int
    words: Sequence[str]
    max_tokens: int
    stop: tuple[str, ...] = ()
    completion_tokens: int = 0
    finish_reason: str | None = None
    text: list[str] = field(default_factory=list)


class Engine:
    """The scheduler and the counters behind ``/metrics``.

    At most ``max_num_seqs`` sequences run; the others wait in a FIFO queue, and a finishing
    sequence hands its slot straight to the first waiter (so a newcomer cannot overtake it).
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.running = 0
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.kv_tokens = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success = dict.fromkeys(FINISH_REASONS, 0)
        self._first_delay = config.first_token_latency_ms / 1000
        self._token_delay = config.token_latency_ms / 1000

    @property
    def has_latency(self) -> bool:
        return bool(self._first_delay or self._token_delay)

    # ---- slots -------------------------------------------------------------------------------

    def try_admit(self) -> bool:
        """Take a slot now if one is free and nobody waits for it."""
        if self.running < self.config.max_num_seqs and not self.waiting:
            self.running += 1
            return True
        return False

    async def admit(self) -> None:
        if self.try_admit():
            return
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            else:
                self.waiting.remove(waiter)
            raise

    def release(self) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: running stays the same
                return
        self.running -= 1

    # ---- generation --------------------------------------------------------------------------

    def generate_now(self, seq: _Sequence) -> list[str]:
        """:meth:`generate` when there is nothing to wait for (no latency, and a slot taken
        with :meth:`try_admit`, which this gives back): the same words and counts, at once,
        without an async generator's cost per token. Returns the words (no spaces)."""
        try:
            words, n, limit = seq.words, len(seq.words), seq.max_tokens
            if seq.stop:
                out, reason = [], "length"
                for i in range(limit):
                    word = words[i % n]
                    if any(s in word for s in seq.stop):
                        reason = "stop"
                        break
                    out.append(word)
            else:
                out, reason = (list(words) * (limit // n + 1))[:limit], "length"
            seq.completion_tokens, seq.finish_reason = len(out), reason
            self.prompt_tokens_total += seq.prompt_tokens
            self.generation_tokens_total += len(out)
            self.success[reason] += 1
        finally:
            self.release()
        return out

    async def generate(self, seq: _Sequence) -> AsyncIterator[str]:
        """Yield ``seq``'s tokens (the prompt's words, cycled; each after the first with a
        leading space), sleeping as configured; sets ``seq.finish_reason``. Waits for a slot
        first and always gives it back, also when cancelled or closed early (use it under
        ``contextlib.aclosing``)."""
        await self.admit()
        self.prompt_tokens_total += seq.prompt_tokens
        self.kv_tokens += seq.prompt_tokens
        held, reason = seq.prompt_tokens, "abort"
        words, stop = seq.words, seq.stop
        n = len(words)
        try:
            for i in range(seq.max_tokens):
                delay = self._token_delay if i else self._first_delay
                if delay:
                    await asyncio.sleep(delay)
                word = words[i % n]
                if stop and any(s in word for s in stop):
                    reason = "stop"
                    break
                self.kv_tokens += 1
                held += 1
                self.generation_tokens_total += 1
                seq.completion_tokens += 1
                yield " " + word if i else word
            else:
                reason = "length"
            seq.finish_reason = reason
        finally:
            self.kv_tokens -= held
            self.success[reason] += 1
            self.release()

    # ---- metrics -----------------------------------------------------------------------------

    def metrics(self) -> str:
        """Prometheus text format (0.0.4) with vLLM's names, types and labels.

        Checked against vLLM's V1 ``PrometheusStatLogger`` (vllm/v1/metrics/loggers.py) and its
        "Production Metrics" docs (docs.vllm.ai/en/stable/usage/metrics/): gauges
        ``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and
        ``vllm:kv_cache_usage_perc`` (0..1; it replaced ``vllm:gpu_cache_usage_perc`` in 0.9);
        counters ``vllm:prompt_tokens``, ``vllm:generation_tokens`` and
        ``vllm:request_success`` (the latter also labelled ``finished_reason``: stop, length,
        abort), which prometheus_client exposes with the ``_total`` suffix. Every series is
        labelled ``model_name`` (the first served name) and ``engine`` (the engine core's
        index), in that order, as vLLM does.
        """
        labels = f'model_name="{_label(self.config.served_model_names[0])}",engine="{ENGINE_INDEX}"'
        usage = min(self.kv_tokens / self.config.kv_cache_capacity, 1.0)
        out = []
        for name, kind, doc, value in (
            ("vllm:num_requests_running", "gauge",
             "Number of requests in model execution batches.", self.running),
            ("vllm:num_requests_waiting", "gauge",
             "Number of requests waiting to be processed.", len(self.waiting)),
            ("vllm:kv_cache_usage_perc", "gauge",
             "KV-cache usage. 1 means 100 percent usage.", usage),
            ("vllm:prompt_tokens", "counter",
             "Number of prefill tokens processed.", self.prompt_tokens_total),
            ("vllm:generation_tokens", "counter",
             "Number of generation tokens processed.", self.generation_tokens_total),
        ):
            series = f"{name}_total" if kind == "counter" else name
            out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"
                       f"{series}{{{labels}}} {float(value)!r}\n")
        out.append("# HELP vllm:request_success Count of successfully processed requests.\n"
                   "# TYPE vllm:request_success counter\n")
        for reason in FINISH_REASONS:
            out.append(f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} '
                       f"{float(self.success[reason])!r}\n")
        return "".join(out)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# ---- requests ----------------------------------------------------------------------------------

def _words_of_content(content: object) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return content.split()
    if isinstance(content, list):  # [{"type": "text", "text": "..."}, {"type": "image_url"}]
        words = []
        for part in content:
            if not isinstance(part, dict):
                raise RequestError("messages: a content part must be an object", param="messages")
            if isinstance(part.get("text"), str):
                words.extend(part["text"].split())
        return words
    raise RequestError("messages: content must be a string, a list of parts or null",
                       param="messages")


def _chat_prompt(body: dict) -> tuple[int, list[str]]:
    """(prompt tokens, words to generate from): every message's words count; generation
    repeats the last message that has any."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: a non-empty list of messages is required",
                           param="messages")
    count, last = 0, []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError('messages: each message must be an object with a string "role"',
                               param="messages")
        words = _words_of_content(message.get("content"))
        count += len(words)
        last = words or last
    return count, last


def _completion_prompt(body: dict) -> tuple[int, list[str]]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        words = prompt.split()
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        words = [str(t) for t in prompt]  # token ids
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise RequestError("prompt: the mock engine takes one prompt per request, not a batch",
                           param="prompt")
    else:
        raise RequestError("prompt: a string (or a list of token ids) is required",
                           param="prompt")
    if not words:
        raise RequestError("prompt: the prompt is empty", param="prompt")
    return len(words), words


def _positive_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"{name}: an integer >= 1, not {value!r}", param=name)
    return value


def _sequence(body: dict, chat: bool, max_model_len: int) -> _Sequence:
    prompt_tokens, words = _chat_prompt(body) if chat else _completion_prompt(body)
    where = "messages" if chat else "prompt"
    if prompt_tokens >= max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens (max-model-len). "
            f"However, your request has {prompt_tokens} input tokens. Please reduce the length "
            f"of the input {where}.", param=where)
    limit = "max_completion_tokens" if chat and body.get("max_completion_tokens") else "max_tokens"
    max_tokens = _positive_int(body, limit)
    room = max_model_len - prompt_tokens
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    elif max_tokens > room:
        raise RequestError(
            f"'{limit}' is too large: {max_tokens}. This model's maximum context length is "
            f"{max_model_len} tokens (max-model-len) and your request has {prompt_tokens} input "
            f"tokens ({max_tokens} > {max_model_len} - {prompt_tokens}).", param=limit)
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError("n: the mock engine generates one choice per request (n=1)",
                           param="n")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(s for s in stop if s)
    else:
        raise RequestError("stop: a string or a list of strings", param="stop")
    return _Sequence(prompt_tokens, words or ("mock",), max_tokens, stop)


# ---- the ASGI app ------------------------------------------------------------------------------

class _MockEngineApp:
    """Route handlers over one :class:`Engine`."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.engine = Engine(config)
        self.names = frozenset(config.served_model_names)
        self.headers = {ENGINE_HEADER: config.engine_id}
        self.sse_headers = {ENGINE_HEADER: config.engine_id, "cache-control": "no-cache"}
        self.created = int(time.time())
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.urandom(6).hex()}"
        self._fingerprint = json.dumps(config.engine_id)

    # ---- plain endpoints ---------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return Response(status_code=200, headers=self.headers)

    async def models(self, request: Request) -> Response:
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": OWNER,
                 "root": self.config.model, "parent": None,
                 "max_model_len": self.config.max_model_len}
                for name in self.config.served_model_names]
        return self._json({"object": "list", "data": data})

    async def metrics(self, request: Request) -> Response:
        return Response(self.engine.metrics(), headers=self.headers,
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    def _json(self, payload: dict, status: int = 200) -> Response:
        return Response(json.dumps(payload, separators=(",", ":")), status_code=status,
                        headers=self.headers, media_type="application/json")

    def error(self, e: RequestError) -> Response:
        return self._json({"error": {"message": e.message, "type": e.type, "param": e.param,
                                     "code": e.status}}, e.status)

    # ---- completions -------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            return self.error(RequestError(f"the request body is not valid JSON: {e}"))
        if not isinstance(body, dict):
            return self.error(RequestError("the request body must be a JSON object"))
        try:
            model = body.get("model")
            if model is None:
                model = self.config.served_model_names[0]  # as vLLM: the first served name
            elif model not in self.names:
                raise RequestError(f"The model `{model}` does not exist.", param="model",
                                   status=404, type_="NotFoundError")
            seq = _sequence(body, chat, self.config.max_model_len)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise RequestError("stream: true or false", param="stream")
            options = body.get("stream_options")
            if options is not None and not stream:
                raise RequestError("Stream options can only be defined when `stream=True`.",
                                   param="stream_options")
            if options is not None and not isinstance(options, dict):
                raise RequestError("stream_options: an object", param="stream_options")
        except RequestError as e:
            return self.error(e)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{self._id_prefix}{next(self._ids):x}"
        if stream:
            usage = bool(options and options.get("include_usage"))
            return _SSEResponse(self, seq, chat, rid, model, usage)
        return await self._whole(request, seq, chat, rid, model)

    async def _whole(self, request: Request, seq: _Sequence, chat: bool, rid: str,
                     model: str) -> Response:
        engine = self.engine

        async def run() -> None:
            async with aclosing(engine.generate(seq)) as tokens:
                async for token in tokens:
                    seq.text.append(token)

        if not engine.has_latency and engine.try_admit():  # nothing to wait for
            text = " ".join(engine.generate_now(seq))
        elif await _until_disconnect(request.receive, run):
            text = "".join(seq.text)
        else:
            return Response(status_code=499, headers=self.headers)  # nobody is listening
        choice: dict = ({"index": 0, "message": {"role": "assistant", "content": text}}
                        if chat else {"index": 0, "text": text})
        choice.update(logprobs=None, finish_reason=seq.finish_reason)
        return self._json({
            "id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model,
            "system_fingerprint": self.config.engine_id, "choices": [choice],
            "usage": _usage(seq)})


def _usage(seq: _Sequence) -> dict:
    return {"prompt_tokens": seq.prompt_tokens, "completion_tokens": seq.completion_tokens,
            "total_tokens": seq.prompt_tokens + seq.completion_tokens}


async def _until_disconnect(receive, work: Callable[[], object]) -> bool:
    """Run ``work()`` (a coroutine function) unless the client disconnects first; True when it
    ran to the end. vLLM aborts a request whose client went away; so does the mock, which
    frees the request's slot and counts it as ``finished_reason="abort"``."""
    task = asyncio.current_task()
    state = {"done": False, "aborted": False}

    async def watch() -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a server whose receive fails after the body: no watching then
            return
        if not state["done"]:
            state["aborted"] = True
            task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        await work()
        state["done"] = True
        return True
    except asyncio.CancelledError:
        if not state["aborted"]:
            raise
        task.uncancel()
        return False
    finally:
        state["done"] = True
        watcher.cancel()


class _SSEResponse(Response):
    """The streamed answer: ``data: {chunk}\\n\\n`` per token, then ``data: [DONE]\\n\\n``.

    Written to the ASGI ``send`` directly: Starlette's StreamingResponse runs a task group
    and a disconnect listener for each response under ASGI spec < 2.4 (uvicorn speaks 2.3);
    here a listener runs only when the stream can wait (latency, or a full batch).
    """

    media_type = "text/event-stream"

    def __init__(self, app: _MockEngineApp, seq: _Sequence, chat: bool, rid: str, model: str,
                 include_usage: bool) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(app.sse_headers)
        self.app, self.seq, self.chat, self.include_usage = app, seq, chat, include_usage
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = (f'{{"id":"{rid}","object":"{kind}","created":{created},'
                f'"model":{json.dumps(model)},"system_fingerprint":{app._fingerprint},'
                f'"choices":[')
        self.head = head
        self.tail = ']' + (',"usage":null' if include_usage else '') + '}'
        if chat:
            self.token_open = '{"index":0,"delta":{"content":'
            self.token_close = '},"logprobs":null,"finish_reason":null}'
        else:
            self.token_open = '{"index":0,"text":'
            self.token_close = ',"logprobs":null,"finish_reason":null}'

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": self.raw_headers})
        engine = self.app.engine
        pending: list[bytes] = []
        if not engine.has_latency and engine.try_admit():  # nothing to wait for: all at once
            words = engine.generate_now(self.seq)
            self._start(pending)
            opening, closing = self._token_frame()
            dumps = json.dumps
            pending.extend(f"{opening}{dumps(w if i == 0 else ' ' + w)}{closing}".encode()
                           for i, w in enumerate(words))
            self._finish(pending)
        elif not await _until_disconnect(receive, lambda: self._stream(send, pending)):
            return  # the client is gone: nothing more to send
        await send({"type": "http.response.body", "body": b"".join(pending),
                    "more_body": False})

    async def _stream(self, send, pending: list[bytes]) -> None:
        """Send each event as soon as the engine waits after it; events made with no wait in
        between (all of them at zero latency) go out together, in one write, and what is left
        at the end stays in ``pending`` for the last message. The bytes are the same either
        way: only the number of writes changes, which is most of the cost of a stream."""
        engine = self.app.engine
        dumps = json.dumps

        async def flush() -> None:
            await send({"type": "http.response.body", "body": b"".join(pending),
                        "more_body": True})
            pending.clear()

        self._start(pending)
        if pending and engine.has_latency:
            await flush()
        each = bool(engine._token_delay)
        opening, closing = self._token_frame()
        # aclosing: a cancelled send must still give the sequence's slot back at once.
        async with aclosing(engine.generate(self.seq)) as tokens:
            async for token in tokens:
                pending.append(f"{opening}{dumps(token)}{closing}".encode())
                if each:
                    await flush()
        self._finish(pending)

    def _start(self, pending: list[bytes]) -> None:
        if self.chat:  # the first chunk carries the role, as vLLM and OpenAI do
            pending.append(f'data: {self.head}{{"index":0,"delta":{{"role":"assistant",'
                           f'"content":""}},"logprobs":null,"finish_reason":null}}{self.tail}'
                           '\n\n'.encode())

    def _token_frame(self) -> tuple[str, str]:
        return "data: " + self.head + self.token_open, self.token_close + self.tail + "\n\n"

    def _finish(self, pending: list[bytes]) -> None:
        """The chunk with finish_reason, the usage chunk when asked for, and [DONE]."""
        head, seq = self.head, self.seq
        last = ('{"index":0,"delta":{},' if self.chat else '{"index":0,"text":"",')
        pending.append(f'data: {head}{last}"logprobs":null,'
                       f'"finish_reason":"{seq.finish_reason}"}}{self.tail}\n\n'.encode())
        if self.include_usage:
            usage = json.dumps(_usage(seq), separators=(",", ":"))
            pending.append(f'data: {head}],"usage":{usage}}}\n\n'.encode())
        pending.append(b"data: [DONE]\n\n")


def build_app(config: EngineConfig) -> Starlette:
    """The engine's ASGI app. ``app.state.engine`` is its :class:`Engine` (tests read it)."""
    handlers = _MockEngineApp(config)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(status,
                                                                        "InternalServerError")
        detail = getattr(exc, "detail", None) or "internal error"
        return handlers.error(RequestError(f"{request.method} {request.url.path}: {detail}",
                                           status=status, type_=kind))

    app = Starlette(
        routes=[
            Route("/health", handlers.health, methods=["GET"]),
            Route("/v1/models", handlers.models, methods=["GET"]),
            Route("/metrics", handlers.metrics, methods=["GET"]),
            Route("/v1/chat/completions", handlers.chat_completions, methods=["POST"]),
            Route("/v1/completions", handlers.completions, methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: http_error},
    )
    app.state.engine = handlers.engine
    app.state.config = config
    return app
