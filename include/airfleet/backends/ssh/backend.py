"""The static-nodes backend: SSH-reachable hosts, each running one Ray node.

Set-up order (``apply``): registry CA and login, model cache directories, then the head, which
must answer ``/api/gcs_healthz`` before any worker starts; then every worker concurrently
(bounded, inside this one task: a mapped task per node would pay ~4 s of task start-up per
node and open a new SSH connection each time), then a wait until every node is ALIVE in
``/api/v0/nodes``. Each node's progress is reported as it happens. A node that fails does not
stop the others: the observation names it, the cluster ends Failed, and a re-run touches only
what is missing or wrong (a Ray node that is ALIVE, or a container whose spec hash matches, is
adopted, never restarted).

The dashboard answers on the head's loopback only: each verb reaches it through an SSH
forward over the head's command connection, as its clients say (``clients["dashboard"]``; see
:mod:`.dashboard` and :mod:`.tunnel`).

Endpoints are Ray Serve applications, one per version, deployed through the same tunnel with
Serve's declarative REST API (:class:`_Serve`; the config and its choices: :mod:`.serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from airfleet.accelerators import cluster_totals, detect, probe_command
from airfleet.backends import Backend, BackendContext, EndpointObservation, Observation
from airfleet.backends.ssh import commands, dashboard, serve
from airfleet.backends.ssh.remote import CommandResult, Remote, RemoteCommandError, run_sync
from airfleet.endpoints import EndpointSpec, EndpointVersion, Engine
from airfleet.errors import InvalidRequest
from airfleet.resources import Cluster, ClusterSpec, NodeStatus, SSHConfig

HEAD_READY_SECONDS = 90
NODES_ALIVE_SECONDS = 120
START_TIMEOUT = 180  # one `ray start` (pull excluded)
PULL_TIMEOUT = 1800
STOP_GRACE_SECONDS = 10
PROBE_REACH_TIMEOUT = 5
LEFTOVER_SETTLE_SECONDS = 10
# A deploy's wait for its engines, in all: a vLLM replica's first start downloads the weights.
ENDPOINT_READY_SECONDS = 900
ENDPOINT_GONE_SECONDS = 60  # Serve stops a deleted application's replicas gracefully (20 s)


@dataclass(frozen=True)
class Node:
    address: str
    role: str  # head | worker

    def status(self, phase: str, message: str = "", ray_node_id: str | None = None) -> NodeStatus:
        return NodeStatus(name=self.address, address=self.address, role=self.role, phase=phase,
                          message=message, ray_node_id=ray_node_id)


def nodes_of(cfg: SSHConfig) -> list[Node]:
    return [Node(cfg.head, "head"), *(Node(w, "worker") for w in cfg.workers)]


def _summary(statuses: list[NodeStatus]) -> Observation:
    """Healthy when every node runs; the message names each node that does not, and why."""
    bad = [s for s in statuses if s.phase != "Running"]
    if not bad:
        return Observation(True, f"all {len(statuses)} nodes ALIVE", nodes=statuses)
    return Observation(False, "; ".join(f"{s.role} {s.address}: {s.message}" for s in bad),
                       nodes=statuses)


@contextlib.asynccontextmanager
async def head_dashboard(cluster: Cluster, clients: Mapping[str, Any],
                         remote: Remote | None = None) -> AsyncIterator[dashboard.DashboardAccess]:
    """The head's dashboard as ``clients`` reach it (``clients["dashboard"]``: a tunnel over
    ``remote``, or over an SSH session of its own from ``clients["ssh"]``), closed on exit."""
    reach: dashboard.Reach | None = clients.get("dashboard")
    if reach is None:
        raise dashboard.NoDashboardAccess("no way to reach the Ray dashboard was given "
                                          "(clients['dashboard'])")
    cfg: SSHConfig = cluster.spec.config.ssh
    async with contextlib.AsyncExitStack() as stack:
        if remote is None and clients.get("ssh") is not None:
            remote = await stack.enter_async_context(Remote(clients["ssh"]))
        access = reach(remote, cfg.head, cfg.ray.dashboard_port)
        stack.push_async_callback(access.aclose)
        yield access


class SSHBackend(Backend):
    cluster_type = "ssh"
    clients = ("ssh", "registry", "dashboard")

    def validate_endpoint(self, cluster: Cluster, spec: EndpointSpec) -> None:
        why = serve.unsupported_engine(spec)
        if why:
            raise InvalidRequest(f"endpoint.spec.engine: {why}")

    def validate_update(self, recorded: Cluster, desired: ClusterSpec) -> None:
        before, after = recorded.spec.config.ssh.head, desired.config.ssh.head
        if before != after:
            raise InvalidRequest(
                f"cluster.spec.config.ssh.head: the head cannot change (it is {before}, the "
                f"request says {after}); delete the cluster and create it with the new head")

    def apply(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        return run_sync(_Run(cluster, ctx).apply())

    def query(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        return run_sync(_Run(cluster, ctx).observe(report=True))

    def health(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        return run_sync(_Run(cluster, ctx).observe(report=False))

    async def health_async(self, cluster: Cluster, ctx: BackendContext) -> Observation:
        return await _Run(cluster, ctx).observe(report=False)

    def detect_accelerators(self, cluster: Cluster, ctx: BackendContext) -> dict[str, Any]:
        return run_sync(_Run(cluster, ctx).detect_accelerators())

    def drain_nodes(self, cluster: Cluster, ctx: BackendContext) -> dict[str, Any]:
        return run_sync(_Run(cluster, ctx).drain())

    def stop_nodes(self, cluster: Cluster, ctx: BackendContext, *, forced: list[str]) -> None:
        run_sync(_Run(cluster, ctx).stop_removed(forced))

    def teardown(self, cluster: Cluster, ctx: BackendContext, *, force: bool = False) -> list[str]:
        return run_sync(_Run(cluster, ctx).teardown())  # force: the flow records what is left

    # ---- endpoints: Ray Serve applications ------------------------------------------------

    def deploy_endpoint(self, cluster: Cluster, endpoint: EndpointVersion,
                        versions: list[EndpointVersion], ctx: BackendContext) -> None:
        run_sync(_Serve(cluster, ctx).deploy(endpoint, versions))

    def endpoint_ready(self, cluster: Cluster, endpoint: EndpointVersion,
                       ctx: BackendContext) -> EndpointObservation:
        return run_sync(_Serve(cluster, ctx).ready(endpoint))

    def endpoint_ready_timeout(self, cluster: Cluster) -> float:
        return float(ENDPOINT_READY_SECONDS)

    def delete_endpoint(self, cluster: Cluster, endpoints: list[EndpointVersion],
                        remaining: list[EndpointVersion], ctx: BackendContext) -> list[str]:
        return run_sync(_Serve(cluster, ctx).delete(endpoints))


class _Serve:
    """The endpoint verbs on one cluster: its Serve applications, through the head's
    dashboard (one SSH tunnel per verb). Every change reads the applications first and PUTs
    the whole set back with only this run's versions changed (:func:`.serve.deploy_config`);
    the cluster's lease keeps Airfleet's own flows from racing each other there."""

    def __init__(self, cluster: Cluster, ctx: BackendContext):
        self.cluster, self.ctx = cluster, ctx

    def log(self, endpoint: EndpointVersion, msg: str, *args: Any) -> None:
        self.ctx.log.info("endpoint %s %s on cluster %s: " + msg, endpoint.name,
                          endpoint.spec.version, self.cluster.name, *args)

    def _dashboard(self):
        return head_dashboard(self.cluster, self.ctx.clients)

    async def deploy(self, endpoint: EndpointVersion, versions: list[EndpointVersion]) -> None:
        """Create or update the version's application; a live one already on this spec is
        left as it is (a failed one is deployed again: Serve retries it)."""
        serve.application(self.cluster, endpoint)  # an engine Serve cannot run: refused now
        split = {v.spec.version: v.spec.traffic_weight for v in versions
                 if v.name == endpoint.name}
        if len(split) > 1:
            self.log(endpoint, "traffic weights %s are applied by the Kubernetes router only; "
                     "on static nodes each version has its own URL", split)
        async with self._dashboard() as dash:
            current = await dash.serve_applications()
            py_modules = []
            if endpoint.spec.engine is Engine.MOCK:
                package = serve.mock_engine_package()
                if await dash.package_exists(package.http_path):
                    self.log(endpoint, "package %s already in the cluster", package.uri)
                else:
                    await dash.upload_package(package.http_path, package.data)
                    self.log(endpoint, "package %s uploaded (%d bytes)", package.uri,
                             len(package.data))
                py_modules.append(package.uri)
            app = serve.application(self.cluster, endpoint, py_modules=py_modules)
            live = serve.live_application(current, app["name"])
            serve.refuse_foreign(live, self.cluster.name, endpoint)
            if live is not None and live.get("deployed_app_config") == app and \
                    live.get("status") not in serve.FAILED_APP:
                self.log(endpoint, "Serve application %s already runs this spec (%s): "
                         "unchanged", app["name"], live.get("status"))
                return
            await dash.put_serve_applications(serve.deploy_config(current, put=[app]))
            self.log(endpoint, "Serve application %s %s: %d replica(s), route %s, via %s",
                     app["name"], "updated" if live else "created", endpoint.spec.replicas,
                     app["route_prefix"], dash.where)

    async def ready(self, endpoint: EndpointVersion) -> EndpointObservation:
        """Read-only: the version's readiness as Serve reports it (:func:`.serve.observe`); a
        dashboard that cannot be reached is "not ready" with the reason, not an error."""
        py_modules = [serve.mock_engine_package().uri] if endpoint.spec.engine is Engine.MOCK \
            else []
        desired = serve.application(self.cluster, endpoint, py_modules=py_modules)
        try:
            async with self._dashboard() as dash:
                current = await dash.serve_applications()
        except (httpx.HTTPError, RemoteCommandError, dashboard.NoDashboardAccess,
                dashboard.ServeRefused) as exc:
            return EndpointObservation(
                False, f"cannot ask Ray Serve on head {self.cluster.spec.config.ssh.head}: "
                f"{exc}", 0, endpoint.spec.replicas)
        return serve.observe(current, self.cluster, endpoint, desired)

    async def delete(self, endpoints: list[EndpointVersion]) -> list[str]:
        """Remove the versions' applications (one PUT without them), then wait until Serve
        no longer lists them. Already gone is done; an application of that name that is not
        ours is left alone and reported. Returns what is left, each item naming its
        version."""
        left: dict[str, str] = {}
        async with self._dashboard() as dash:
            current = await dash.serve_applications()
            doomed = {}
            for endpoint in endpoints:
                name = serve.app_name(endpoint)
                live = (current.get("applications") or {}).get(name)
                if live is None:
                    self.log(endpoint, "Serve application %s already gone", name)
                elif not serve.is_ours(live.get("deployed_app_config"), self.cluster.name,
                                       endpoint):
                    left[name] = (f"{endpoint.spec.version}: Serve application {name} is not "
                                  f"endpoint {endpoint.name}'s; left alone")
                else:
                    doomed[name] = endpoint
            if any(serve.live_application(current, name) for name in doomed):
                await dash.put_serve_applications(serve.deploy_config(current,
                                                                      remove=doomed))
            deadline = time.monotonic() + ENDPOINT_GONE_SECONDS
            while doomed:
                apps = (await dash.serve_applications()).get("applications") or {}
                for name in [n for n in doomed if n not in apps]:
                    self.log(doomed.pop(name), "Serve application %s is gone", name)
                if not doomed or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1)
            for name, endpoint in doomed.items():
                status = apps[name].get("status")
                left[name] = (f"{endpoint.spec.version}: Serve application {name} still "
                              f"{status} after {ENDPOINT_GONE_SECONDS} s")
        for item in left.values():
            self.ctx.log.warning("cluster %s: left behind: %s", self.cluster.name, item)
        return list(left.values())


class _Run:
    """One verb on one cluster: the spec, the SSH connections and the reporting."""

    def __init__(self, cluster: Cluster, ctx: BackendContext):
        self.cluster, self.ctx = cluster, ctx
        self.cfg: SSHConfig = cluster.spec.config.ssh
        self.runtime = self.cfg.container_runtime
        self.head = Node(self.cfg.head, "head")
        self.workers = [Node(w, "worker") for w in self.cfg.workers]
        self.remote: Remote | None = None  # inside session(): the verb's SSH connections
        self.dash: dashboard.DashboardAccess | None = None  # ... and the head's dashboard

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Remote | None]:
        """The verb's SSH connections (one per node, reused by every command) and the head's
        dashboard, reached through the head's connection."""
        access = self.ctx.clients.get("ssh")
        async with contextlib.AsyncExitStack() as stack:
            self.remote = await stack.enter_async_context(Remote(access)) if access else None
            self.dash = await stack.enter_async_context(
                head_dashboard(self.cluster, self.ctx.clients, self.remote))
            try:
                yield self.remote
            finally:
                self.remote = self.dash = None

    def log(self, msg: str, *args: Any) -> None:
        self.ctx.log.info("cluster %s: " + msg, self.cluster.name, *args)

    def report(self, node: Node, phase: str, message: str = "", ray_node_id: str | None = None):
        nodes = nodes_of(self.cfg)  # "node 2/3": where this line stands in the whole
        where = f"node {nodes.index(node) + 1}/{len(nodes)} " if node in nodes else ""
        self.log("%s%s %s: %s %s", where, node.role, node.address, phase, message)
        self.ctx.report_node(node.status(phase, message, ray_node_id))

    # ---- apply ------------------------------------------------------------------------

    async def apply(self) -> Observation:
        async with self.session() as remote:
            failed: dict[Node, str] = {}
            alive = await self._alive()
            try:
                await self._start(remote, self.head, alive)
                await self._wait_head()
            except Exception as exc:  # nothing else starts without a head
                self.report(self.head, "Failed", str(exc))
                return Observation(False, f"head {self.head.address}: {exc}",
                                   nodes=[self.head.status("Failed", str(exc))])
            alive = await self._alive()
            results = await asyncio.gather(
                *(self._start(remote, w, alive) for w in self.workers), return_exceptions=True)
            for worker, outcome in zip(self.workers, results, strict=True):
                if isinstance(outcome, Exception):
                    failed[worker] = str(outcome)
                    self.report(worker, "Failed", str(outcome))
            statuses = await self._wait_alive([n for n in nodes_of(self.cfg) if n not in failed])
            try:  # drained and stopped by the update flow already; this converges a re-run
                await self._stop_removed(remote, forced=[])
            except Exception as exc:  # noqa: BLE001 - reported per node; the desired nodes run
                self.log("a removed worker could not be stopped: %s", exc)
        return _summary(statuses + [n.status("Failed", why) for n, why in failed.items()])

    async def _start(self, remote: Remote, node: Node, alive: dict[str, dashboard.RayNode]):
        """Prepare the host, then start its Ray node unless a matching one runs."""
        await self._prepare_host(remote, node)
        if self.runtime == "none":
            if node.address in alive:
                self.report(node, "Running", "adopted: Ray node already ALIVE",
                            alive[node.address].node_id)
                return
            self.report(node, "Starting", "ray start")
            # Ray that runs but is not ALIVE in this cluster (a stale session) is stopped
            # first; asking costs a `ps`, while `ray stop` costs ~2 s of CLI start-up.
            stale = await remote.run(node.address, commands.leftovers("none", self.cluster.name))
            if stale.stdout.strip():
                await remote.run(node.address, commands.ray_stop(
                    "none", self.cluster.name, executable=self.cfg.ray.executable, force=True))
            await remote.run(node.address, self._host_start(node), timeout=START_TIMEOUT)
            return
        await self._start_container(remote, node)

    async def _prepare_host(self, remote: Remote, node: Node) -> None:
        for mount in commands.cache_mounts(self.cluster.spec.model_caches):
            await remote.run(node.address, commands.ensure_directory(mount.host_path))
        login = self.ctx.clients.get("registry")
        if self.runtime == "none" or not login:
            return
        if login.get("ca_pem"):  # before any pull, so the pull trusts the registry
            await remote.run(node.address, commands.write_registry_ca(self.runtime, login["url"]),
                             stdin=login["ca_pem"].encode())
        if login.get("password"):
            await remote.run(node.address,
                             commands.registry_login(self.runtime, login["url"], login["username"]),
                             stdin=login["password"].encode(), redact=[login["password"]])

    def _gpus(self, node: Node) -> int:
        nodes = self.cluster.status.accelerators.get("nodes", {})
        return int(nodes.get(node.address, {}).get("count", 0) or 0)

    def _ray_start(self, node: Node) -> commands.RayStart:
        ray = self.cfg.ray
        head_ip = None if node.role == "head" else self.cfg.head
        return commands.RayStart(node.address, head_ip, ray.gcs_port, ray.dashboard_port,
                                 self._gpus(node))

    def _host_start(self, node: Node) -> str:
        ray, env = self.cfg.ray, commands.model_cache_env(self.cluster.spec.model_caches, "none")
        start = self._ray_start(node)
        if node.role == "head":
            return commands.ray_start_head(node.address, gcs_port=ray.gcs_port,
                                           dashboard_port=ray.dashboard_port,
                                           num_gpus=start.num_gpus, executable=ray.executable,
                                           env=env)
        return commands.ray_start_worker(node.address, self.cfg.head, gcs_port=ray.gcs_port,
                                         num_gpus=start.num_gpus, executable=ray.executable,
                                         env=env)

    async def _start_container(self, remote: Remote, node: Node) -> None:
        meminfo = await remote.run(node.address, "grep MemTotal /proc/meminfo")
        mem_bytes = int(meminfo.stdout.split()[1]) * 1024
        container = commands.RayContainer(
            self.runtime, self.cluster.name, self.cfg.ray.image, self._ray_start(node),
            commands.shm_size_for(mem_bytes),
            commands.cache_mounts(self.cluster.spec.model_caches),
            commands.model_cache_env(self.cluster.spec.model_caches, self.runtime))
        seen = await remote.run(node.address,
                                commands.container_inspect(self.runtime, self.cluster.name),
                                check=False)
        state = commands.parse_container_inspect(seen.stdout) if seen.ok else None
        if seen.exit_status not in (0, commands.EXIT_ABSENT):
            raise RuntimeError(f"{self.runtime} cannot list containers: {seen.stderr.strip()}")
        if state and state.running and state.spec_hash == container.spec_hash:
            self.report(node, "Running", "adopted: container already runs this spec")
            return
        if state:
            self.report(node, "Starting", f"replacing container ({state.status}, spec changed)")
            await remote.run(node.address, commands.container_remove(self.runtime,
                                                                     self.cluster.name))
        self.report(node, "Starting", f"pulling {self.cfg.ray.image}")
        await remote.run(node.address, commands.image_pull(self.runtime, self.cfg.ray.image),
                         timeout=PULL_TIMEOUT)
        await remote.run(node.address, commands.container_run(container), timeout=START_TIMEOUT)

    async def _wait_head(self) -> None:
        deadline = time.monotonic() + HEAD_READY_SECONDS
        while not await self.dash.gcs_healthy():
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray GCS not healthy at {self.dash.where} after "
                                   f"{HEAD_READY_SECONDS} s")
            await asyncio.sleep(1)

    async def _alive(self) -> dict[str, dashboard.RayNode]:
        try:
            return dashboard.alive_by_ip(await self.dash.list_nodes())
        except Exception:  # no head yet (or no way to it): nothing is alive
            return {}

    async def _wait_alive(self, nodes: list[Node]) -> list[NodeStatus]:
        deadline = time.monotonic() + NODES_ALIVE_SECONDS
        alive = await self._alive()
        while any(n.address not in alive for n in nodes) and time.monotonic() < deadline:
            await asyncio.sleep(1)
            alive = await self._alive()
        statuses = []
        for n in nodes:
            if n.address in alive:
                statuses.append(n.status("Running", "ALIVE", alive[n.address].node_id))
            else:
                statuses.append(n.status("Failed", f"not ALIVE after {NODES_ALIVE_SECONDS} s"))
            self.report(n, statuses[-1].phase, statuses[-1].message, statuses[-1].ray_node_id)
        return statuses

    def removed(self) -> list[Node]:
        """Workers recorded before but no longer in the spec."""
        wanted = {n.address for n in nodes_of(self.cfg)}
        return [Node(n.address, "worker") for n in self.cluster.status.nodes
                if n.role == "worker" and n.address not in wanted]

    async def drain(self) -> dict[str, Any]:
        """``ray drain-node`` (on the head) for each removed worker that is ALIVE: running
        work finishes, nothing new is scheduled there, then Ray marks it DEAD."""
        removed, deadline = self.removed(), self.cfg.drain_deadline_seconds
        ticket = {"removed": [n.address for n in removed], "nodes": {},
                  "deadline_seconds": deadline}
        if not removed:
            return ticket
        message = f"removed from the spec by Airfleet run {self.ctx.run_id}"
        async with self.session() as remote:
            try:  # not "nothing is ALIVE": that would stop busy workers without a drain
                alive = dashboard.alive_by_ip(await self.dash.list_nodes())
            except (httpx.HTTPError, RemoteCommandError) as exc:
                raise RemoteCommandError(
                    self.head.address, "GET /api/v0/nodes", message=(
                        f"head {self.head.address}: cannot tell which removed workers are "
                        f"ALIVE, so none was drained: the Ray dashboard ({self.dash.where}) "
                        f"did not answer: {exc}")) from None
            for node in removed:
                if node.address not in alive:
                    self.report(node, "Draining", "not ALIVE in Ray: nothing to drain")
                    continue
                node_id = alive[node.address].node_id
                await remote.run(self.head.address, commands.ray_drain_node(
                    self.runtime, self.cluster.name, head_ip=self.cfg.head,
                    gcs_port=self.cfg.ray.gcs_port, node_id=node_id, message=message,
                    deadline_seconds=deadline, executable=self.cfg.ray.executable))
                self.report(node, "Draining", f"ray drain-node, deadline {deadline} s", node_id)
                ticket["nodes"][node.address] = node_id
        return ticket

    async def stop_removed(self, forced: list[str]) -> None:
        """Stop the removed workers' Ray: gracefully once drained, by force for those still
        busy at the drain deadline (recorded as such)."""
        if not self.removed():
            return
        async with Remote(self.ctx.clients["ssh"]) as remote:
            await self._stop_removed(remote, forced)

    async def _stop_removed(self, remote: Remote, forced: list[str]) -> None:
        removed = self.removed()
        if not removed:
            return
        results = await remote.run_all(
            [n.address for n in removed], lambda a: self._stop(force=a in forced),
            timeout=START_TIMEOUT)
        for node in removed:
            outcome = results[node.address]
            if isinstance(outcome, Exception):
                self.report(node, "Failed", f"could not stop Ray: {outcome}")
                raise outcome
            forced_stop = node.address in forced
            how = (f"forced stop: still busy at the drain deadline of "
                   f"{self.cfg.drain_deadline_seconds} s" if forced_stop
                   else "drained, then stopped")
            self.report(node, "Removed", how)
            self.ctx.record_event("NodeForceStopped" if forced_stop else "NodeRemoved",
                                  f"worker {node.address}: {how}",
                                  "Warning" if forced_stop else "Normal")

    def _stop(self, force: bool) -> str:
        return commands.ray_stop(self.runtime, self.cluster.name,
                                 executable=self.cfg.ray.executable, force=force,
                                 grace_seconds=STOP_GRACE_SECONDS)

    # ---- observe (onboard, health) -----------------------------------------------------

    async def observe(self, report: bool) -> Observation:
        """Which desired nodes are ALIVE; for the others, whether their host answers SSH."""
        try:
            async with self.session():
                return await self._observe(report)
        except (RemoteCommandError, dashboard.NoDashboardAccess) as exc:  # no way there
            why = f"cannot reach the Ray dashboard: {exc}"
            return Observation(False, f"head {self.head.address}: {why}",
                               nodes=[self.head.status("Failed", why)])

    async def _observe(self, report: bool) -> Observation:
        if not await self.dash.gcs_healthy():
            reach = (await self.dash.why_silent()
                     or (await self._reachability([self.head]))[self.head.address])
            why = f"Ray GCS not answering at the dashboard ({self.dash.where}; {reach})"
            return Observation(False, f"head {self.head.address}: {why}",
                               nodes=[self.head.status("Failed", why)])
        alive = await self._alive()
        missing = [n for n in nodes_of(self.cfg) if n.address not in alive]
        reach = await self._reachability(missing) if missing else {}
        statuses = []
        for n in nodes_of(self.cfg):
            if n.address in alive:
                statuses.append(n.status("Running", "ALIVE", alive[n.address].node_id))
            else:
                statuses.append(n.status("Failed", f"Ray node not ALIVE; {reach[n.address]}"))
            if report:
                self.report(n, statuses[-1].phase, statuses[-1].message, statuses[-1].ray_node_id)
        return _summary(statuses)

    async def _reachability(self, nodes: list[Node]) -> dict[str, str]:
        if self.remote is None:
            return {n.address: "host not probed" for n in nodes}
        results = await self.remote.run_all([n.address for n in nodes], lambda _: "true",
                                            timeout=PROBE_REACH_TIMEOUT)
        return {addr: "host reachable over SSH" if isinstance(r, CommandResult)
                else f"host unreachable: {r}" for addr, r in results.items()}

    # ---- accelerators ------------------------------------------------------------------

    async def detect_accelerators(self) -> dict[str, Any]:
        async with Remote(self.ctx.clients["ssh"]) as remote:
            results = await remote.run_all([n.address for n in nodes_of(self.cfg)],
                                           lambda _: probe_command(), check=False)
        per_node = {}
        for address, result in results.items():
            if isinstance(result, Exception):
                per_node[address] = {"count": 0, "error": str(result)}
                self.log("node %s: accelerator probe failed: %s", address, result)
                continue
            found = detect(result.stdout)
            per_node[address] = found.to_dict()
            for stage in found.stages:
                self.log("node %s: %s %s: %s", address, stage.name,
                         {True: "ok", False: "FAILED", None: "n/a"}[stage.ok], stage.message)
        return cluster_totals(per_node)

    # ---- teardown ----------------------------------------------------------------------

    async def _leftovers(self, remote: Remote) -> dict[str, CommandResult | Exception]:
        """What is left on each node; asked again for a few seconds while something is,
        because Ray's processes take a moment to exit after `ray stop` returns."""
        check = commands.leftovers(self.runtime, self.cluster.name)
        deadline = time.monotonic() + LEFTOVER_SETTLE_SECONDS
        while True:
            found = await remote.run_all([n.address for n in nodes_of(self.cfg)],
                                         lambda _: check)
            clean = all(isinstance(r, CommandResult) and not r.stdout.strip()
                        for r in found.values())
            if clean or time.monotonic() > deadline:
                return found
            await asyncio.sleep(1)

    async def teardown(self) -> list[str]:
        """Workers first, then the head; then look for anything left on every node. What is
        left is returned, each item."""
        async with Remote(self.ctx.clients["ssh"]) as remote:
            stop = self._stop(force=False)
            workers = await remote.run_all([w.address for w in self.workers], lambda _: stop,
                                           timeout=START_TIMEOUT)
            head = await remote.run_all([self.head.address], lambda _: stop,
                                        timeout=START_TIMEOUT)
            left = []
            for address, outcome in {**workers, **head}.items():
                if isinstance(outcome, Exception):
                    left.append(f"{address}: could not stop Ray: {outcome}")
            for address, outcome in (await self._leftovers(remote)).items():
                if isinstance(outcome, Exception):
                    left.append(f"{address}: cannot check for leftovers: {outcome}")
                else:
                    left += [f"{address}: {line}" for line in outcome.stdout.splitlines()
                             if line.strip()]
        for line in left:
            self.log("left behind: %s", line)
        return left
