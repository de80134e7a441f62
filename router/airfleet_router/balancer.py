"""Which ready pod gets the next request: a version by weight, then a pod by load or by key.

**Version.** When the ConfigMap ``airfleet-routes`` gives weights for the model (see
:mod:`airfleet_router.routes`), a request first picks a version. Without a session key it is
nginx's smooth weighted round-robin: deterministic, and exact over any run of sum(weights)
requests (90/10 sends exactly 9 of every 10 requests to the first version, interleaved). With
a session key the key's hash picks a bucket 0..99 and the bucket a version by cumulative
weight, so a session stays on its version as long as the weights stay. Only versions with a
weight above 0 and a ready pod take part; versions of a mapped model that the map does not
name weigh 0. When no such version has a ready pod, every ready pod of the model is a
candidate (``on_fallback`` counts it): a canary gone bad must not black-hole the traffic.
A model the map does not name has no version split.

**Pod.** Without a key: the least loaded candidate, kv-cache usage breaking ties, then a
per-model turn (so idle pods take turns). A pod's load is what its engine last reported
(running + waiting requests, from all clients; see :mod:`airfleet_router.scraper`) plus the
requests this router sent it since that report, minus this router's requests that the
report counted and that have finished since; until a report arrives, or when the last scrape
failed, only this router's requests in flight. With a key: consistent hashing with
bounded loads (Mirrokni, Thorup, Zadimoghaddam 2016): the key's point on a ring of
``VIRTUAL_NODES`` points per pod names a pod, which takes the request only if its load is
below ``ceil(c * (total + 1) / n)``; else the next pod on the ring. So a session sticks to its
pod while loads are even and spills to the next one when its pod is overloaded.

The counts are this router replica's only: replicas do not share state.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Callable, Collection, Mapping, Sequence

from airfleet_router.discovery import Endpoint

VIRTUAL_NODES = 100  # points per pod on the hash ring
DEFAULT_LOAD_FACTOR = 1.25  # c of the bounded loads
BUCKETS = 100
RING_CACHE = 256  # rings kept (one per distinct candidate set)

Weights = Mapping[str, Mapping[str, int]]


def stable_hash(data: bytes) -> int:
    """64 bits, the same in every process and run (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class _Ring:
    """The hash ring of a set of endpoints: ``VIRTUAL_NODES`` points each."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        points = sorted((stable_hash(f"{ep}#{i}".encode()), ep)
                        for ep in endpoints for i in range(VIRTUAL_NODES))
        self.points = [p for p, _ in points]
        self.owners = [ep for _, ep in points]
        self.size = len(set(endpoints))

    def walk(self, point: int):
        """The distinct endpoints in ring order from ``point``."""
        start = bisect.bisect(self.points, point)
        seen: set[Endpoint] = set()
        n = len(self.owners)
        for i in range(n):
            ep = self.owners[(start + i) % n]
            if ep not in seen:
                seen.add(ep)
                yield ep
                if len(seen) == self.size:
                    return


class Balancer:
    def __init__(self, load_factor: float = DEFAULT_LOAD_FACTOR,
                 on_fallback: Callable[[str], None] = lambda model: None) -> None:
        self.load_factor = load_factor
        self.on_fallback = on_fallback
        self._outstanding: dict[Endpoint, int] = {}
        self._turn: dict[str, int] = {}
        self._weights: dict[str, dict[str, int]] = {}
        self._swrr: dict[str, tuple[tuple, dict[str, int]]] = {}
        self._rings: dict[tuple[Endpoint, ...], _Ring] = {}
        # Engine reports: running + waiting, kv-cache usage; and the requests sent since.
        self._reported: dict[Endpoint, tuple[float, float]] = {}
        self._since: dict[Endpoint, int] = {}
        self._epoch: dict[Endpoint, int] = {}

    # ---- weights ------------------------------------------------------------------------

    def set_weights(self, weights: Weights) -> None:
        self._weights = {m: dict(v) for m, v in weights.items()}
        self._swrr.clear()

    def weights(self, model: str) -> dict[str, int] | None:
        return self._weights.get(model)

    def _versioned(self, model: str, endpoints: Sequence[Endpoint],
                   versions: Mapping[Endpoint, str], key_hash: int | None,
                   prefer_version: str | None) -> Sequence[Endpoint]:
        """The candidates of the version this request goes to (see the module docstring)."""
        if prefer_version is not None:  # a retry: the same version if it has another pod
            same = [ep for ep in endpoints if versions.get(ep) == prefer_version]
            return same or endpoints
        weights = self._weights.get(model)
        if weights is None:
            return endpoints
        present = {versions.get(ep) for ep in endpoints}
        active = tuple((v, w) for v, w in sorted(weights.items()) if w > 0 and v in present)
        if not active:
            self.on_fallback(model)
            return endpoints
        if len(active) == 1:
            chosen = active[0][0]
        elif key_hash is None:
            chosen = self._smooth_round_robin(model, active)
        else:
            total = sum(w for _, w in active)
            point = (key_hash % BUCKETS) * total / BUCKETS
            chosen, upto = active[-1][0], 0
            for version, weight in active:
                upto += weight
                if point < upto:
                    chosen = version
                    break
        return [ep for ep in endpoints if versions.get(ep) == chosen]

    def _smooth_round_robin(self, model: str, active: tuple[tuple[str, int], ...]) -> str:
        """nginx's smooth weighted round-robin over ``active`` (version, weight) pairs."""
        state = self._swrr.get(model)
        if state is None or state[0] != active:
            state = self._swrr[model] = (active, {v: 0 for v, _ in active})
        current = state[1]
        total, best, best_value = 0, "", None
        for version, weight in active:
            current[version] += weight
            total += weight
            if best_value is None or current[version] > best_value:
                best, best_value = version, current[version]
        current[best] -= total
        return best

    # ---- the pick -----------------------------------------------------------------------

    def pick(self, model: str, endpoints: Sequence[Endpoint],
             exclude: Collection[Endpoint] = (), *, key: bytes | None = None,
             versions: Mapping[Endpoint, str] | None = None,
             prefer_version: str | None = None) -> Endpoint | None:
        """The endpoint for the next request of ``model`` (None when all are excluded).
        ``versions`` maps each endpoint to its version (for the weights); ``key`` is the
        request's session key; ``prefer_version`` is the version of a failed first try."""
        candidates = [e for e in endpoints if e not in exclude] if exclude else endpoints
        if not candidates:
            return None
        key_hash = stable_hash(key) if key is not None else None
        if versions is not None and (prefer_version is not None or model in self._weights):
            candidates = self._versioned(model, candidates, versions, key_hash,
                                         prefer_version)
        if len(candidates) == 1:
            return candidates[0]
        if key_hash is not None:
            return self._by_key(candidates, key_hash)
        return self._least_loaded(model, candidates)

    def _least_loaded(self, model: str, candidates: Sequence[Endpoint]) -> Endpoint:
        start = self._turn.get(model, 0)
        self._turn[model] = (start + 1) % (1 << 30)
        n = len(candidates)
        best, best_load, best_kv = None, 0.0, 0.0
        for i in range(n):
            endpoint = candidates[(start + i) % n]
            load = self.load(endpoint)
            kv = self._reported[endpoint][1] if endpoint in self._reported else 0.0
            if best is None or load < best_load or (load == best_load and kv < best_kv):
                best, best_load, best_kv = endpoint, load, kv
        return best

    def _by_key(self, candidates: Sequence[Endpoint], key_hash: int) -> Endpoint:
        ring_key = tuple(sorted(candidates))
        ring = self._rings.get(ring_key)
        if ring is None:
            if len(self._rings) >= RING_CACHE:
                self._rings.clear()
            ring = self._rings[ring_key] = _Ring(ring_key)
        loads = {ep: self.load(ep) for ep in ring_key}
        bound = math.ceil(self.load_factor * (sum(loads.values()) + 1) / len(ring_key))
        first = None
        for endpoint in ring.walk(key_hash):
            if first is None:
                first = endpoint
            if loads[endpoint] < bound:
                return endpoint
        return first  # unreachable: some pod is always below the bound

    # ---- load ---------------------------------------------------------------------------

    def load(self, endpoint: Endpoint) -> float:
        reported = self._reported.get(endpoint)
        if reported is None:
            return self._outstanding.get(endpoint, 0)
        return reported[0] + self._since.get(endpoint, 0)

    def report(self, endpoint: Endpoint, queued: float | None, kv_usage: float = 0.0) -> None:
        """The engine's own figures (running + waiting) from a scrape; ``None``: the scrape
        failed, count this router's requests in flight only."""
        self._epoch[endpoint] = self._epoch.get(endpoint, 0) + 1
        self._since.pop(endpoint, None)
        if queued is None:
            self._reported.pop(endpoint, None)
        else:
            self._reported[endpoint] = (queued, kv_usage)

    def forget(self, live: Collection[Endpoint]) -> None:
        """Drop the engine reports of endpoints no longer ready."""
        for endpoint in [ep for ep in self._reported if ep not in live]:
            self._reported.pop(endpoint, None)
            self._since.pop(endpoint, None)

    def acquire(self, endpoint: Endpoint) -> int:
        """Count a request sent to ``endpoint``; returns the token for :meth:`release`."""
        self._outstanding[endpoint] = self._outstanding.get(endpoint, 0) + 1
        self._since[endpoint] = self._since.get(endpoint, 0) + 1
        return self._epoch.get(endpoint, 0)

    def release(self, endpoint: Endpoint, token: int | None = None) -> None:
        left = self._outstanding.get(endpoint, 0) - 1
        if left > 0:
            self._outstanding[endpoint] = left
        else:
            self._outstanding.pop(endpoint, None)
        if token is None or token == self._epoch.get(endpoint, 0):
            # Sent since the last report and done before the next: no report counts it.
            since = self._since.get(endpoint, 0) - 1
            if since > 0:
                self._since[endpoint] = since
            else:
                self._since.pop(endpoint, None)
        elif endpoint in self._reported:
            # In flight at the last report, so counted in it, and done now: the engine is
            # less busy than it reported (else an idle pod would look busy until the next
            # scrape because one of our requests was running at that moment).
            queued, kv = self._reported[endpoint]
            self._reported[endpoint] = (max(0.0, queued - 1), kv)

    def outstanding(self, endpoint: Endpoint) -> int:
        return self._outstanding.get(endpoint, 0)
