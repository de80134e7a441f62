"""Which ready pod gets the next request: least outstanding requests, ties broken round-robin.

Inference requests differ in cost by orders of magnitude (a 10-token completion next to a
4,000-token stream), so plain round-robin piles new requests on a pod that is still busy with
long ones. Counting the requests in flight per endpoint (until the last byte of the response
has been relayed) sends each request to the least busy pod; when several are equally busy (the
common case at low load) a per-model turn rotates among them, so sequential requests spread
evenly. The counts are this router replica's only: replicas do not share state.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from airfleet_router.discovery import Endpoint


class Balancer:
    def __init__(self) -> None:
        self._outstanding: dict[Endpoint, int] = {}
        self._turn: dict[str, int] = {}

    def pick(self, model: str, endpoints: Sequence[Endpoint],
             exclude: Collection[Endpoint] = ()) -> Endpoint | None:
        """The endpoint for the next request of ``model`` (None when all are excluded)."""
        candidates = [e for e in endpoints if e not in exclude] if exclude else endpoints
        if not candidates:
            return None
        start = self._turn.get(model, 0)
        self._turn[model] = (start + 1) % (1 << 30)
        n = len(candidates)
        best, best_load = None, 0
        for i in range(n):
            endpoint = candidates[(start + i) % n]
            load = self._outstanding.get(endpoint, 0)
            if best is None or load < best_load:
                best, best_load = endpoint, load
                if load == 0:
                    break
        return best

    def acquire(self, endpoint: Endpoint) -> None:
        self._outstanding[endpoint] = self._outstanding.get(endpoint, 0) + 1

    def release(self, endpoint: Endpoint) -> None:
        left = self._outstanding.get(endpoint, 0) - 1
        if left > 0:
            self._outstanding[endpoint] = left
        else:
            self._outstanding.pop(endpoint, None)

    def outstanding(self, endpoint: Endpoint) -> int:
        return self._outstanding.get(endpoint, 0)
