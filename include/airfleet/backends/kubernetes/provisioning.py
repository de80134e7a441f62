"""What the EKS and AKS provisioners share: the callbacks that record each resource as it
comes to exist, and the in-process loops over reconcile passes (library use and tests; the
flows wait in Airflow's triggerer instead)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from airfleet.backends import Wait
from airfleet.errors import AirfleetError


@dataclass
class ProvisionResult:
    """What :meth:`Provisioner.ensure` created and what it found and adopted, named as
    ``on_created`` names them; the cluster's API endpoint (EKS: its URL and CA, AKS: its
    FQDN)."""

    created: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    endpoint: str | None = None
    ca_data: str | None = None


class Provisioner:
    """A managed cluster and its node pools, reconciled pass by pass.

    Subclasses give :meth:`reconcile` and :meth:`teardown_step` (each one pass, returning the
    :class:`~airfleet.backends.Wait` of what is still in progress, or None), and
    :meth:`_wait_inline` (wait for one such Wait in this process).

    :param client: the cloud's API client (built by the hook that owns the connection).
    :param cfg: the cluster's ``eks`` / ``aks`` config block.
    :param cluster_name: the Airfleet cluster name, used as the cloud cluster's name.
    :param log: where progress goes (never a credential).
    :param on_created: called with a resource's name (``cluster llm-a``) as soon as a
        resource this run created exists; ``on_adopted``: one it found.
    :param wait_seconds: budget of each wait.
    :param poll_seconds: pause between looks while waiting in-process.
    """

    WAIT_SECONDS: float
    POLL_SECONDS: float
    error: type[AirfleetError]

    def __init__(self, client: Any, cfg: Any, cluster_name: str, *,
                 log: logging.Logger | None = None,
                 on_created: Callable[[str], None] = lambda what: None,
                 on_adopted: Callable[[str], None] = lambda what: None,
                 wait_seconds: float | None = None, poll_seconds: float | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.client, self.cfg, self.name = client, cfg, cluster_name
        self.log = log or logging.getLogger(type(self).__module__)
        self.on_created, self.on_adopted = on_created, on_adopted
        self.wait_seconds = self.WAIT_SECONDS if wait_seconds is None else wait_seconds
        self.poll_seconds = self.POLL_SECONDS if poll_seconds is None else poll_seconds
        self.sleep = sleep
        self.changes: list[str] = []  # what the passes changed, for the update flow's log

    def reconcile(self, *, create: bool = True, prune: bool = False) -> Wait | None:
        raise NotImplementedError

    def teardown_step(self, only: Collection[str] | None = None) -> Wait | None:
        raise NotImplementedError

    def exists(self) -> bool:
        raise NotImplementedError

    # ---- in-process loops -------------------------------------------------------------------

    def ensure(self) -> ProvisionResult:
        """The cluster and every node pool of the spec ready, waiting in-process. Pools the
        spec does not list are left alone (:meth:`scale` removes them)."""
        result = ProvisionResult()
        created, adopted = self.on_created, self.on_adopted

        def note_created(what: str) -> None:
            result.created.append(what)
            created(what)

        def note_adopted(what: str) -> None:
            if what not in result.created and what not in result.adopted:
                result.adopted.append(what)
            adopted(what)

        self.on_created, self.on_adopted = note_created, note_adopted
        try:
            self._loop(self.reconcile)
        finally:
            self.on_created, self.on_adopted = created, adopted
        result.endpoint, result.ca_data = self.endpoint()
        return result

    def scale(self) -> list[str]:
        """Node pools to the spec (converge, create the missing, delete the ones of ours the
        spec dropped), waiting in-process. Returns what changed."""
        self.changes = []
        self._loop(lambda: self.reconcile(create=False, prune=True))
        return self.changes

    def teardown(self, only: Collection[str] | None = None) -> list[str]:
        """Delete the node pools, then the cluster (``only``: just these resources), waiting
        in-process; "already gone" is success. Returns what is left (empty when clean).

        :raises AirfleetError: the cluster exists and is not Airfleet's (nothing is deleted).
        """
        try:
            self._loop(lambda: self.teardown_step(only))
        except self.error as exc:
            if "is not Airfleet's" in str(exc):
                raise
            left = self._leftovers(only) or [str(exc)]
            self.log.error("cluster %s: teardown incomplete (%s); left: %s; manual cleanup "
                           "may be required", self.name, exc, ", ".join(left))
            return left
        return []

    def endpoint(self) -> tuple[str | None, str | None]:
        raise NotImplementedError

    def _leftovers(self, only: Collection[str] | None) -> list[str]:
        return []

    def _loop(self, step: Callable[[], Wait | None]) -> None:
        deadline = time.monotonic() + self.wait_seconds
        while (wait := step()) is not None:
            if time.monotonic() > deadline:
                raise self.error(f"{wait.what}: still in progress after "
                                 f"{self.wait_seconds:g}s")
            self._wait_inline(wait)

    def _wait_inline(self, wait: Wait) -> None:
        """Wait for ``wait`` in this process (the flows defer instead)."""
        self.sleep(self.poll_seconds)
