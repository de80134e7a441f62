"""The command line of each inference engine, built from an endpoint's spec (pure).

Each engine serves OpenAI's API, ``/health`` and Prometheus ``/metrics`` on one port:

- vLLM: ``vllm serve <model>`` (https://docs.vllm.ai/en/latest/cli/serve.html): metrics are
  always on, under the API port.
- SGLang: ``python3 -m sglang.launch_server --model-path <model>`` (server arguments:
  https://docs.sglang.ai/advanced_features/server_arguments.html): metrics need
  ``--enable-metrics``; its own default port (30000) and host (127.0.0.1) are overridden.
- mock: ``python -m airfleet_mock_engine`` (include/airfleet_mock_engine), the CPU stand-in
  for tests and machines without GPUs; it takes vLLM's flag names.

Every value is a separate argv item (no shell), so nothing needs quoting; secrets never appear
here (airfleet.endpoints refuses secret-looking engine_args).
"""

from __future__ import annotations

from airfleet.endpoints import EndpointSpec, Engine

PORT = 8000
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"

# The flag each engine uses for what the spec says; None: the engine has no such flag.
_FLAGS = {
    Engine.VLLM: {"served": "--served-model-name", "revision": "--revision",
                  "max_len": "--max-model-len", "parallel": "--tensor-parallel-size",
                  "download": "--download-dir"},
    Engine.SGLANG: {"served": "--served-model-name", "revision": "--revision",
                    "max_len": "--context-length", "parallel": "--tp-size",
                    "download": "--download-dir"},
    Engine.MOCK: {"served": "--served-model-name", "revision": None,
                  "max_len": "--max-model-len", "parallel": None, "download": None},
}


def command(spec: EndpointSpec, *, cache_dir: str | None = None,
            host: str = "0.0.0.0", port: int = PORT) -> list[str]:
    """The engine's argv for one replica: the model, where to listen, the served name, the
    revision, max_model_len (airfleet.endpoints' rule), GPUs as tensor parallelism, the model
    cache as download directory, then ``engine_args`` in their given order."""
    flags = _FLAGS[spec.engine]
    model = spec.model
    if spec.engine is Engine.VLLM:
        argv = ["vllm", "serve", model.name]
    elif spec.engine is Engine.SGLANG:
        argv = ["python3", "-m", "sglang.launch_server", "--model-path", model.name,
                "--enable-metrics"]
    else:
        argv = ["python", "-m", "airfleet_mock_engine", "--model", model.name]
    argv += ["--host", host, "--port", str(port), flags["served"], model.served]
    wanted = {"revision": model.revision, "max_len": spec.effective_max_model_len,
              "parallel": spec.resources.gpu if spec.resources.gpu > 1 else None,
              "download": cache_dir}
    for key, value in wanted.items():
        if value is not None and flags[key]:
            argv += [flags[key], str(value)]
    return argv + engine_args(spec.engine_args)


def engine_args(args: dict[str, str | int | float | bool | None]) -> list[str]:
    """``{"enforce-eager": true, "dtype": "half", "x": null}`` -> ``--enforce-eager --dtype
    half``: true is a bare flag, false and null leave the flag out."""
    out: list[str] = []
    for key, value in args.items():
        if value is None or value is False:
            continue
        out.append(f"--{key}")
        if value is not True:
            out.append(str(value))
    return out
