"""``python -m airfleet_mock_engine``: serve the mock engine with uvicorn.

The flags are a subset of ``vllm serve``'s with the same names (``--served-model-name``,
``--max-num-seqs``, ``--max-model-len``, ``--uvicorn-log-level``), plus the mock's latencies
and ``--engine-id``. An unknown flag is an error, as it is for vLLM.
"""

from __future__ import annotations

import argparse
import sys

from airfleet_mock_engine.engine import EngineConfig, build_app

# vLLM's default (VLLM_HTTP_TIMEOUT_KEEP_ALIVE): seconds an idle keep-alive connection stays open.
TIMEOUT_KEEP_ALIVE = 5


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, not {value}")
        return value
    return parse


def _milliseconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of milliseconds >= 0, not {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m airfleet_mock_engine", allow_abbrev=False,
        description="A mock OpenAI-compatible inference engine (a stand-in for vLLM/SGLang).")
    p.add_argument("--host", default="0.0.0.0", help="listen address (default: %(default)s)")
    p.add_argument("--port", type=_at_least(0), default=8000,
                   help="listen port (default: %(default)s)")
    p.add_argument("--model", required=True, help="the model it pretends to serve")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME", default=None,
                   help='the names clients send as "model" (default: --model)')
    p.add_argument("--engine-id", default=None,
                   help="told in X-Airfleet-Engine and system_fingerprint "
                        "(default: $HOSTNAME, else the host name)")
    p.add_argument("--token-latency-ms", type=_milliseconds, default=0.0,
                   help="sleep before each token after the first (default: 0, no sleep)")
    p.add_argument("--first-token-latency-ms", type=_milliseconds, default=0.0,
                   help="sleep before the first token (default: 0, no sleep)")
    p.add_argument("--max-num-seqs", type=_at_least(1), default=256,
                   help="requests generating at once; more wait in a FIFO queue "
                        "(default: %(default)s)")
    p.add_argument("--max-model-len", type=_at_least(1), default=4096,
                   help="longest prompt + completion in whitespace-separated tokens "
                        "(default: %(default)s)")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level (default: %(default)s); no access log either way")
    return p


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, served_model_names=tuple(args.served_model_name or ()),
        engine_id=args.engine_id or "", token_latency_ms=args.token_latency_ms,
        first_token_latency_ms=args.first_token_latency_ms, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = parser()
    args = p.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        p.error(str(e))
    # loop/http "auto": uvloop and httptools when installed. No access log: a line per request
    # costs throughput (vLLM's --disable-uvicorn-access-log, on by default here).
    uvicorn.run(build_app(config), host=args.host, port=args.port,
                log_level=args.uvicorn_log_level, access_log=False, loop="auto", http="auto",
                timeout_keep_alive=TIMEOUT_KEEP_ALIVE)


if __name__ == "__main__":
    sys.exit(main())
