"""The mock engine as a Ray Serve application.

A Serve config deploys it with::

    applications:
      - name: chat-v1
        route_prefix: /chat-v1
        import_path: airfleet_mock_engine.serve:app_builder
        args: {model: Qwen/Qwen2.5-0.5B-Instruct, served_model_name: chat, token_latency_ms: 20}
        deployments:
          - name: MockEngine
            num_replicas: 2
            ray_actor_options: {num_cpus: 1}

``app_builder`` follows Serve's application-builder convention (a function of the ``args``
dict returning an ``Application``). Each replica runs the same Starlette app as the CLI
through ``@serve.ingress`` (any ASGI app; a streamed response reaches the client chunk by
chunk through Serve's proxy). ``num_replicas`` and ``ray_actor_options`` belong to the Serve
config, not to ``args``. Ray is imported only when a function here runs, so the rest of the
package works without it.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airfleet_mock_engine.engine import EngineConfig, build_app

if TYPE_CHECKING:
    from ray.serve import Application

DEPLOYMENT_NAME = "MockEngine"

# args key -> EngineConfig field and how to read it (Serve's CLI gives every value as a string).
_ARGS = {
    "model": ("model", str),
    "served_model_name": ("served_model_names", None),
    "engine_id": ("engine_id", str),
    "token_latency_ms": ("token_latency_ms", float),
    "first_token_latency_ms": ("first_token_latency_ms", float),
    "max_num_seqs": ("max_num_seqs", int),
    "max_model_len": ("max_model_len", int),
}


def config_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
    """``EngineConfig`` keywords from Serve ``args`` (``served-model-name`` and
    ``served_model_name`` alike); raises ValueError naming an unknown or malformed one."""
    out: dict[str, Any] = {}
    for key, value in args.items():
        name = str(key).replace("-", "_")
        if name not in _ARGS:
            raise ValueError(f"args.{key}: unknown; the mock engine takes "
                             f"{', '.join(sorted(_ARGS))}")
        field, convert = _ARGS[name]
        if value is None:
            continue
        if name == "served_model_name":
            value = (value,) if isinstance(value, str) else tuple(value)
        else:
            try:
                value = convert(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"args.{key}: {value!r} is not a {convert.__name__}") from e
        out[field] = value
    if "model" not in out:
        raise ValueError("args.model: required (the model the engine pretends to serve)")
    EngineConfig(**{**out, "engine_id": out.get("engine_id") or "check"})  # validate now
    return out


def _replica_engine_id() -> str:
    """``<host>-<replica id>``: unique per replica, even for several on one node."""
    from ray import serve

    try:
        unique = serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica: the host name alone
        return socket.gethostname()
    return f"{socket.gethostname()}-{unique}"


@functools.cache
def _deployment():
    from ray import serve

    @serve.deployment(name=DEPLOYMENT_NAME)
    @serve.ingress()
    class MockEngine:
        """One engine per replica; the app is built on the replica, after ``__init__``."""

        def __init__(self, config: dict[str, Any]) -> None:
            self._config = config

        def __serve_build_asgi_app__(self):
            config = dict(self._config)
            config["engine_id"] = config.get("engine_id") or _replica_engine_id()
            return build_app(EngineConfig(**config))

    return MockEngine


def app_builder(args: dict[str, Any]) -> Application:
    """The Serve application of the mock engine configured by ``args`` (keys: model,
    served_model_name, engine_id, token_latency_ms, first_token_latency_ms, max_num_seqs,
    max_model_len; only model is required). Raises ValueError on a bad one."""
    return _deployment().bind(config_kwargs(args))
