"""Endpoints on static nodes as Ray Serve applications: the Serve config, built by pure
functions (no I/O), and the verdict on what Serve reports.

Each endpoint version is one application of the cluster's Serve instance, deployed through
the dashboard's Serve REST API (``PUT /api/serve/applications/``, Ray's ``ServeDeploySchema``)
over the SSH tunnel to the head (:mod:`.tunnel`). That API is declarative: a PUT replaces the
whole set of applications, so every change starts from what runs (``GET``), keeps every other
application as Serve recorded it (``deployed_app_config``), and replaces or drops only ours
(:func:`deploy_config`).

Choices, each a constant here:

- Application ``<endpoint>-<version>`` (Serve's name), route prefix ``/<endpoint>/<version>``:
  names and versions hold no ``/``, so two versions never share a prefix even where their
  application names could (``a-b`` + ``c`` and ``a`` + ``b-c``); the owner env vars below tell
  those apart.
- Serve's HTTP proxy listens on ``0.0.0.0:8000`` (:data:`SERVE_HTTP_HOST`,
  :data:`SERVE_HTTP_PORT`) on every node that runs a replica, and always on the head (Serve's
  controller runs there): the endpoint's URL is ``http://<head>:8000/<endpoint>/<version>/v1``
  (OpenAI's API under it). A Serve instance that already runs keeps its own HTTP options
  (Serve cannot change them while it runs); one that listens on loopback only is refused.
- Ownership: the application's ``runtime_env.env_vars`` carry ``AIRFLEET_CLUSTER``,
  ``AIRFLEET_ENDPOINT`` and ``AIRFLEET_VERSION``; an application of the same name without them
  is someone else's and is left alone.
- Engines: ``mock`` is ``airfleet_mock_engine.serve:app_builder``, its package uploaded to the
  cluster's GCS by the dashboard's package API exactly as Ray's job and Serve SDKs upload a
  ``py_modules`` directory (:func:`mock_engine_package`); ``vllm`` is Ray Serve LLM's
  ``ray.serve.llm:build_openai_app`` (the nodes need ``ray[llm]`` and vLLM installed; GPUs per
  replica become vLLM's tensor parallelism); ``sglang`` is refused: Ray 2.60 serves SGLang only
  through an internal class (``ray.llm._internal...SGLangServer``, "early development" in Ray's
  own guide).
- Traffic weights are applied by the Kubernetes router only. On static nodes each version is
  its own application with its own URL; the weight is recorded, and the readiness message
  says it is not applied.
- The model cache the spec names is the engine's ``HF_HOME`` (``runtime_env.env_vars``), and
  vLLM's ``download_dir``: its host path when Ray runs as host processes, its mount path in
  the Ray containers otherwise.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airfleet.backends import EndpointObservation, NotSupported
from airfleet.backends.ssh import commands
from airfleet.endpoints import EndpointSpec, EndpointVersion, Engine
from airfleet.errors import AirfleetError
from airfleet.resources import Cluster

SERVE_HTTP_HOST = "0.0.0.0"
SERVE_HTTP_PORT = 8000
PROXY_LOCATION = "EveryNode"
MOCK_IMPORT_PATH = "airfleet_mock_engine.serve:app_builder"
MOCK_DEPLOYMENT = "MockEngine"  # airfleet_mock_engine.serve.DEPLOYMENT_NAME (no import: no Ray)
LLM_IMPORT_PATH = "ray.serve.llm:build_openai_app"
LLM_DEPLOYMENT_PREFIX = "LLMServer:"  # Ray Serve LLM names its engine deployments so
OWNER_ENV = ("AIRFLEET_CLUSTER", "AIRFLEET_ENDPOINT", "AIRFLEET_VERSION")
# What the package holds of the mock engine's directory: the sources, no byte code.
PACKAGE_EXCLUDES = ("__pycache__", ".pyc")
RAY_PKG_PREFIX = "_ray_pkg_"  # ray._private.runtime_env.packaging.RAY_PKG_PREFIX

FAILED_APP = ("DEPLOY_FAILED", "UNHEALTHY")
GONE_APP = ("DELETING",)
_LOOPBACK = re.compile(r"^(127\.|localhost$|::1$)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10,
          "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


class ServeConflict(AirfleetError):
    """What runs on the cluster's Serve stops Airfleet from changing it safely (an
    application of ours by name that is someone else's, a Serve that clients cannot reach)."""


# ---- names -----------------------------------------------------------------------------------

def app_name(endpoint: EndpointVersion) -> str:
    return f"{endpoint.name}-{endpoint.spec.version}"


def route_prefix(endpoint: EndpointVersion) -> str:
    return f"/{endpoint.name}/{endpoint.spec.version}"


def endpoint_url(head: str, port: int, endpoint: EndpointVersion) -> str:
    """Where clients reach the version's OpenAI API: through the head's Serve proxy."""
    return f"http://{commands.host_port(head, port)}{route_prefix(endpoint)}/v1"


def owner(cluster: str, endpoint: EndpointVersion) -> dict[str, str]:
    return dict(zip(OWNER_ENV, (cluster, endpoint.name, endpoint.spec.version), strict=True))


def is_ours(app_config: Mapping[str, Any] | None, cluster: str,
            endpoint: EndpointVersion) -> bool:
    env = ((app_config or {}).get("runtime_env") or {}).get("env_vars") or {}
    return all(env.get(k) == v for k, v in owner(cluster, endpoint).items())


# ---- the mock engine's package ---------------------------------------------------------------

@dataclass(frozen=True)
class Package:
    """A ``py_modules`` package: ``gcs://_ray_pkg_<hash>.zip`` and the zip's bytes."""

    uri: str
    data: bytes

    @property
    def http_path(self) -> str:
        """Where the dashboard's package API keeps it: ``/api/packages/gcs/<name>``."""
        protocol, _, name = self.uri.partition("://")
        return f"/api/packages/{protocol}/{name}"


def _package_paths(root: Path) -> list[Path]:
    """Every directory and file under ``root`` (``root`` itself first), sources only."""
    out = [root]
    for path in sorted(root.iterdir()):
        if path.name in PACKAGE_EXCLUDES or path.suffix in PACKAGE_EXCLUDES:
            continue
        out += _package_paths(path) if path.is_dir() else [path]
    return out


def directory_package(root: Path) -> Package:
    """``root`` as Ray's SDKs upload a ``py_modules`` directory: the zip holds ``<root
    name>/...``; the URI is content-addressed as ``get_uri_for_directory`` makes it (the XOR
    of SHA-1(relative path + content) over every path, 8 bytes), so the same sources always
    give the same URI (an upload is needed once) and a change gives a new one."""
    root = root.resolve()
    digest = b"0" * 8
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in _package_paths(root):
            sha1 = hashlib.sha1(str(path.relative_to(root)).encode())
            if path.is_file():
                content = path.read_bytes()
                sha1.update(content)
                info = zipfile.ZipInfo(f"{root.name}/{path.relative_to(root)}",
                                       date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, content)
            digest = bytes(a ^ b for a, b in zip(digest, sha1.digest(), strict=False))
    return Package(f"gcs://{RAY_PKG_PREFIX}{digest.hex()}.zip", buffer.getvalue())


def mock_engine_package() -> Package:
    """The ``airfleet_mock_engine`` package of this installation."""
    import airfleet_mock_engine

    return directory_package(Path(airfleet_mock_engine.__file__).parent)


# ---- one application -------------------------------------------------------------------------

def cache_path(cluster: Cluster, name: str | None) -> str | None:
    """Where Ray's processes see the model cache ``name`` on the nodes (None: no such cache)."""
    cache = next((c for c in cluster.spec.model_caches if c.name == name), None)
    if cache is None:
        return None
    mount = commands.cache_mount(cache)
    runtime = cluster.spec.config.ssh.container_runtime
    return mount.host_path if runtime == "none" else mount.mount_path


def quantity(text: str) -> float:
    """``500m`` -> 0.5, ``32Gi`` -> 34359738368 (Kubernetes' quantity suffixes)."""
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a quantity")
    return float(match.group(1)) * _UNITS[match.group(2)]


def actor_options(endpoint: EndpointVersion) -> dict[str, Any]:
    """``ray_actor_options`` of one replica: its GPUs, and CPU / memory when the spec gives
    them (Serve's defaults otherwise: 1 CPU, no memory reservation)."""
    res = endpoint.spec.resources
    options: dict[str, Any] = {"num_gpus": res.gpu}
    if res.cpu is not None:
        options["num_cpus"] = quantity(res.cpu)
    if res.memory is not None:
        options["memory"] = int(quantity(res.memory))
    return options


def _engine_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
    """``engine_args`` as keyword arguments: ``max-num-seqs`` -> ``max_num_seqs``; null and
    false leave the argument out (as they leave the flag out on Kubernetes)."""
    return {k.replace("-", "_"): v for k, v in args.items() if v is not None and v is not False}


def application(cluster: Cluster, endpoint: EndpointVersion, *,
                py_modules: Iterable[str] = ()) -> dict[str, Any]:
    """The Serve application (``ServeApplicationSchema``) of one endpoint version.

    :param py_modules: package URIs the engine needs on the nodes (the mock engine's).
    :raises NotSupported: for an engine Serve cannot run here (sglang).
    """
    spec = endpoint.spec
    cache = cache_path(cluster, spec.model.cache)
    env = owner(cluster.name, endpoint)
    if cache:
        env["HF_HOME"] = cache
    runtime_env: dict[str, Any] = {"env_vars": env}
    if py_modules:
        runtime_env["py_modules"] = list(py_modules)
    app: dict[str, Any] = {"name": app_name(endpoint), "route_prefix": route_prefix(endpoint),
                           "runtime_env": runtime_env}
    if spec.engine is Engine.MOCK:
        args = {"model": spec.model.name, "served_model_name": spec.model.served}
        if spec.effective_max_model_len:
            args["max_model_len"] = spec.effective_max_model_len
        args.update(_engine_kwargs(spec.engine_args))
        app.update(import_path=MOCK_IMPORT_PATH, args=args, deployments=[
            {"name": MOCK_DEPLOYMENT, "num_replicas": spec.replicas,
             "ray_actor_options": actor_options(endpoint)}])
        return app
    if spec.engine is Engine.VLLM:
        engine = {"tensor_parallel_size": spec.resources.gpu}
        for key, value in (("revision", spec.model.revision),
                           ("max_model_len", spec.effective_max_model_len),
                           ("download_dir", cache)):
            if value is not None:
                engine[key] = value
        engine.update(_engine_kwargs(spec.engine_args))
        deployment: dict[str, Any] = {"num_replicas": spec.replicas}
        cpu_memory = {k: v for k, v in actor_options(endpoint).items() if k != "num_gpus"}
        if cpu_memory:  # the engine's GPUs come from its placement group (tensor parallelism)
            deployment["ray_actor_options"] = cpu_memory
        app.update(import_path=LLM_IMPORT_PATH, args={"llm_configs": [{
            "model_loading_config": {"model_id": spec.model.served,
                                     "model_source": spec.model.name},
            "engine_kwargs": engine, "deployment_config": deployment}]})
        return app
    raise NotSupported(unsupported_engine(spec) or f"engine {spec.engine.value}")


def unsupported_engine(spec: EndpointSpec) -> str | None:
    """Why Serve cannot run ``spec``'s engine on static nodes (None: it can)."""
    if spec.engine in (Engine.MOCK, Engine.VLLM):
        return None
    return (f"engine {spec.engine.value} cannot run on static nodes: Ray 2.60 serves SGLang "
            "only through an internal class (ray.llm._internal...SGLangServer, in early "
            "development), which Airfleet does not build on; use engine vllm here, or a "
            "Kubernetes cluster")


# ---- the whole config ------------------------------------------------------------------------

def deploy_config(current: Mapping[str, Any], put: Iterable[Mapping[str, Any]] = (),
                  remove: Iterable[str] = ()) -> dict[str, Any]:
    """The ``PUT /api/serve/applications/`` body (``ServeDeploySchema``) that changes only
    what is asked: ``current`` (the ``GET`` answer) with the applications ``put`` added or
    replaced (in place) and the ones named in ``remove`` dropped. Every other application
    stays exactly as Serve recorded it; one being deleted stays deleted. A Serve that runs
    keeps its HTTP and gRPC options (it ignores new ones), ours otherwise.

    :raises ServeConflict: an application that only the imperative API knows (no recorded
        config: a declarative PUT would delete it), or a running Serve whose proxy listens on
        loopback (clients could not reach the endpoints).
    """
    put = {app["name"]: dict(app) for app in put}
    drop = set(remove)
    http = dict(current.get("http_options") or {"host": SERVE_HTTP_HOST,
                                                 "port": SERVE_HTTP_PORT})
    if _LOOPBACK.match(str(http.get("host", ""))):
        raise ServeConflict(
            f"Ray Serve on this cluster already runs with its HTTP proxy on {http['host']}, "
            "where clients cannot reach endpoints; Serve cannot change that while it runs: "
            "shut it down (`serve shutdown`) and deploy again")
    body: dict[str, Any] = {"proxy_location": current.get("proxy_location") or PROXY_LOCATION,
                            "http_options": http, "applications": []}
    if current.get("grpc_options"):
        body["grpc_options"] = dict(current["grpc_options"])
    if current.get("target_capacity") is not None:
        body["target_capacity"] = current["target_capacity"]
    for name, live in (current.get("applications") or {}).items():
        if name in drop or live.get("status") in GONE_APP:
            continue
        if name in put:
            body["applications"].append(put.pop(name))
            continue
        if not live.get("deployed_app_config"):
            raise ServeConflict(
                f"Serve application {name} was deployed with Serve's imperative API "
                "(serve.run), which Serve's declarative config cannot keep; a config "
                "deployment would delete it. Deploy it from a config file or move it off this "
                "cluster first")
        body["applications"].append(dict(live["deployed_app_config"]))
    body["applications"] += put.values()
    return body


def live_application(current: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The application ``name`` as Serve reports it; None when absent or being deleted."""
    app = (current.get("applications") or {}).get(name)
    return None if app is None or app.get("status") in GONE_APP else app


def refuse_foreign(live: Mapping[str, Any] | None, cluster: str,
                   endpoint: EndpointVersion) -> None:
    """An application of the version's name that is not this endpoint's is left alone."""
    if live is not None and not is_ours(live.get("deployed_app_config"), cluster, endpoint):
        raise ServeConflict(
            f"Serve application {app_name(endpoint)} exists and is not endpoint "
            f"{endpoint.name}'s (version {endpoint.spec.version}) on cluster {cluster}; "
            "rename the endpoint or remove that application")


# ---- what Serve reports ----------------------------------------------------------------------

def serve_message(text: str, limit: int = 600) -> str:
    """Serve's message, short: a traceback becomes its first line and its last (the
    exception), colour codes dropped."""
    lines = [line.strip() for line in _ANSI.sub("", text or "").splitlines() if line.strip()]
    if not lines:
        return ""
    if any(line.startswith("Traceback") for line in lines) and len(lines) > 2:
        lines = [lines[0], lines[-1]]
    short = " ".join(lines)
    return short if len(short) <= limit else short[:limit - 3] + "..."


def engine_deployments(app: Mapping[str, Any], engine: Engine) -> list[dict[str, Any]]:
    """The deployments whose replicas are the version's engines (not an ingress)."""
    deployments = list((app.get("deployments") or {}).values())
    if engine is Engine.MOCK:
        wanted = [d for d in deployments if d.get("name") == MOCK_DEPLOYMENT]
    else:
        wanted = [d for d in deployments if str(d.get("name", "")).startswith(
            LLM_DEPLOYMENT_PREFIX)]
    return wanted or deployments


def _running(deployment: Mapping[str, Any]) -> int:
    return sum(r.get("state") == "RUNNING" for r in deployment.get("replicas") or [])


def _head_proxy(current: Mapping[str, Any], head: str) -> str | None:
    for proxy in (current.get("proxies") or {}).values():
        if proxy.get("node_ip") == head:
            return proxy.get("status")
    return None


def observe(current: Mapping[str, Any], cluster: Cluster, endpoint: EndpointVersion,
            desired: Mapping[str, Any]) -> EndpointObservation:
    """The version's readiness from the ``GET /api/serve/applications/`` answer: its
    application runs ``desired`` (the latest spec), is RUNNING, every deployment HEALTHY with
    exactly its target of replicas RUNNING, the engines' target is ``spec.replicas``, and the
    head's proxy is HEALTHY. DEPLOY_FAILED and UNHEALTHY are failures, named with Serve's
    message."""
    name, spec, head = app_name(endpoint), endpoint.spec, cluster.spec.config.ssh.head
    port = int((current.get("http_options") or {}).get("port") or SERVE_HTTP_PORT)
    url, wanted = endpoint_url(head, port, endpoint), spec.replicas
    app = live_application(current, name)
    if app is None:
        return EndpointObservation(False, f"Serve application {name} is not deployed",
                                   0, wanted, url=url)
    if not is_ours(app.get("deployed_app_config"), cluster.name, endpoint):
        return EndpointObservation(False, f"Serve application {name} is not endpoint "
                                   f"{endpoint.name}'s", 0, wanted, failed=True, url=url)
    engines = engine_deployments(app, spec.engine)
    ready = sum(_running(d) for d in engines)
    status = app.get("status")
    if app.get("deployed_app_config") != desired:
        return EndpointObservation(False, f"Serve application {name} is {status} on an older "
                                   "spec; the latest is not deployed yet", ready, wanted,
                                   url=url)
    if status in FAILED_APP:
        why = [serve_message(app.get("message", ""))] + [
            f"deployment {d['name']} {d.get('status')}: {serve_message(d.get('message', ''))}"
            for d in app.get("deployments", {}).values() if d.get("status") != "HEALTHY"]
        return EndpointObservation(False, f"Serve application {name} {status}: "
                                   + "; ".join(w for w in why if w), ready, wanted,
                                   failed=True, url=url)
    waiting = [] if status == "RUNNING" else [f"application {status}"]
    for d in app.get("deployments", {}).values():
        target, live = d.get("target_num_replicas", 0), len(d.get("replicas") or [])
        if d.get("status") != "HEALTHY" or _running(d) != target or live != target:
            detail = serve_message(d.get("message", ""))
            waiting.append(f"deployment {d['name']} {d.get('status')}, {_running(d)}/{target} "
                           f"replicas RUNNING" + (f" ({live} live)" if live != target else "")
                           + (f": {detail}" if detail else ""))
    targets = sum(d.get("target_num_replicas", 0) for d in engines)
    if engines and targets != wanted:
        waiting.append(f"{targets} engine replicas targeted, {wanted} wanted")
    proxy = _head_proxy(current, head)
    if proxy != "HEALTHY":
        waiting.append(f"the head's HTTP proxy is {proxy or 'not started'}")
    if waiting:
        return EndpointObservation(False, f"Serve application {name}: " + "; ".join(waiting),
                                   ready, wanted, url=url)
    weight = "" if spec.traffic_weight == 100 else (
        f"; traffic_weight {spec.traffic_weight} not applied: on static nodes each version "
        "has its own URL")
    return EndpointObservation(True, f"{ready}/{wanted} replicas ready; model {spec.model.served}"
                               f" at {url}{weight}", ready, wanted, url=url)
