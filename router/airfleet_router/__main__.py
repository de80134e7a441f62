"""``python -m airfleet_router [--kubeconfig PATH]``: serve until SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import gc
import logging
import sys

import uvicorn
from prometheus_client import disable_created_metrics

from airfleet_router import __version__, config
from airfleet_router.app import create_app
from airfleet_router.server import http_protocol

# Longer than the idle timeout of common load balancers (60 s on AWS ALB / GCP): the balancer
# must be the side that closes an idle connection, or it may send a request on a connection
# we are closing and answer 502.
CLIENT_KEEPALIVE = 75


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="airfleet_router", description="Route OpenAI-compatible inference requests to "
        "the ready pods of each model (see router/README.md for the environment variables).")
    parser.add_argument("--kubeconfig", metavar="PATH",
                        help="take the API server, CA, token and namespace from this "
                             "kubeconfig's current context instead of the service account")
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)
    try:
        cfg = config.load(kubeconfig=args.kubeconfig)
    except config.ConfigError as e:
        print(f"airfleet_router: {e}", file=sys.stderr)
        return 2

    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request (method and URL) at INFO: one line per proxied request.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)

    # Counters' *_created series double the scrape for no use (Prometheus ignores them).
    disable_created_metrics()
    app = create_app(cfg)
    # What exists now (modules, the app) lives as long as the process: frozen, the collector
    # stops scanning it at each full collection, pauses that showed in the latency tail.
    gc.freeze()
    server = uvicorn.Server(uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_config=None, http=http_protocol(),
        log_level=cfg.log_level, lifespan="on", proxy_headers=False,
        # Off by default: a line per request costs about a third of the router's throughput,
        # and airfleet_router_requests_total counts requests by model and status anyway.
        access_log=cfg.access_log,
        timeout_keep_alive=CLIENT_KEEPALIVE))
    server.run()
    return 0 if server.started else 1  # not started: the port is taken, say (uvicorn logged it)


if __name__ == "__main__":
    sys.exit(main())
