"""Traffic weights between the versions of a model, from the ConfigMap ``airfleet-routes``.

The ConfigMap lives in the router's namespace; its key ``routes.json`` holds::

    {"models": {"<served model>": {"<version>": <weight 0..100>, ...}, ...}}

The router lists, then watches, that one ConfigMap (``fieldSelector=metadata.name=...``) with
the same reflector as the pods, so a change applies within a second and without a restart.
No ConfigMap (or a ConfigMap without ``routes.json``) means no weights: every ready pod of a
model is equal. A ConfigMap that does not parse, or whose weights are not integers from 0 to
100, is logged and the last good weights stay in force.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import httpx

from airfleet_router.config import RouterConfig
from airfleet_router.discovery import Reflector

log = logging.getLogger(__name__)

ROUTES_CONFIGMAP = "airfleet-routes"
ROUTES_KEY = "routes.json"
MAX_WEIGHT = 100

# model -> version -> weight
Weights = dict[str, dict[str, int]]


class RoutesError(ValueError):
    """``routes.json`` is not of the documented shape."""


def parse_routes(text: str) -> Weights:
    """The weights of ``routes.json``; raises :class:`RoutesError` naming what is wrong."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise RoutesError(f"{ROUTES_KEY} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models", {}), dict):
        raise RoutesError(f'{ROUTES_KEY} must be an object {{"models": {{...}}}}')
    out: Weights = {}
    for model, versions in (doc.get("models") or {}).items():
        if not isinstance(versions, dict):
            raise RoutesError(f"{ROUTES_KEY}: models.{model} must map versions to weights")
        weights = {}
        for version, weight in versions.items():
            if isinstance(weight, bool) or not isinstance(weight, int) \
                    or not 0 <= weight <= MAX_WEIGHT:
                raise RoutesError(f"{ROUTES_KEY}: models.{model}.{version} must be an integer "
                                  f"from 0 to {MAX_WEIGHT}, got {weight!r}")
            weights[str(version)] = weight
        out[str(model)] = weights
    return out


class RoutesWatcher(Reflector):
    """List then watch the ConfigMap ``airfleet-routes``; ``on_change(weights)`` gets each new
    set of weights (``{}`` when the ConfigMap is absent)."""

    resource = "configmaps"
    what = "routes"

    def __init__(self, config: RouterConfig, client: httpx.AsyncClient,
                 on_change: Callable[[Weights], None],
                 on_invalid: Callable[[], None] = lambda: None,
                 on_restart: Callable[[str], None] = lambda reason: None) -> None:
        super().__init__(config, client, on_restart)
        self.on_change = on_change
        self.on_invalid = on_invalid
        self.weights: Weights = {}
        self.config_error: str | None = None

    def health(self) -> dict[str, Any]:
        return {**super().health(), "models": len(self.weights),
                "config_error": self.config_error}

    def selector(self) -> dict[str, str]:
        return {"fieldSelector": f"metadata.name={ROUTES_CONFIGMAP}"}

    def replace(self, items: list[dict[str, Any]]) -> None:
        mine = [i for i in items if (i.get("metadata") or {}).get("name") == ROUTES_CONFIGMAP]
        if mine:
            self._load(mine[0])
        else:
            self._set({}, f"no ConfigMap {ROUTES_CONFIGMAP}: no weights")

    def apply(self, event_type: str, obj: dict[str, Any]) -> None:
        if (obj.get("metadata") or {}).get("name") != ROUTES_CONFIGMAP:
            return
        if event_type == "DELETED":
            self._set({}, f"ConfigMap {ROUTES_CONFIGMAP} deleted: no weights")
        else:
            self._load(obj)

    def _load(self, configmap: dict[str, Any]) -> None:
        text = (configmap.get("data") or {}).get(ROUTES_KEY)
        if text is None:
            self._set({}, f"ConfigMap {ROUTES_CONFIGMAP} has no {ROUTES_KEY}: no weights")
            return
        try:
            weights = parse_routes(text)
        except RoutesError as e:
            self.config_error = str(e)
            self.on_invalid()
            log.error("ConfigMap %s: %s; keeping the last good weights", ROUTES_CONFIGMAP, e)
            return
        self._set(weights, f"weights from ConfigMap {ROUTES_CONFIGMAP}: {weights}")

    def _set(self, weights: Weights, message: str) -> None:
        self.config_error = None
        if weights != self.weights or not self.synced:
            log.info("%s", message)
        self.weights = weights
        self.on_change(weights)
