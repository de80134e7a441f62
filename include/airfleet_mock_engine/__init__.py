"""A mock OpenAI-compatible inference engine (``engine: mock``): a stand-in for vLLM and
SGLang on CPU-only machines and in tests.

Self-contained on purpose: it imports only the standard library, ``starlette`` and ``uvicorn``
(``ray`` only inside :mod:`airfleet_mock_engine.serve`), because this directory is uploaded
as-is to Ray nodes (runtime_env ``py_modules``) and runs as a container command. See README.md
beside this file.
"""

from airfleet_mock_engine.engine import Engine, EngineConfig, RequestError, build_app

__all__ = ["Engine", "EngineConfig", "RequestError", "build_app"]
__version__ = "0.1.0"
