"""Where the router finds the Kubernetes API, its credentials and namespace, and how it serves.

In a pod (the default) everything comes from the service account: the API at
``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT``, the bearer token, CA bundle and
namespace from ``/var/run/secrets/kubernetes.io/serviceaccount/``. For tests and development,
``--kubeconfig PATH`` (server, CA, token or tokenFile, namespace of the current context) and the
``AIRFLEET_ROUTER_*`` variables override it; a variable wins over the kubeconfig, which wins
over the service account.

The bearer token is never held in the configuration: :class:`TokenSource` reads it from its
file and reads it again when the file changes (projected service-account tokens are rotated
by the kubelet about every hour), so a long-running router never presents an expired token.
"""

from __future__ import annotations

import base64
import logging
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_PORT = 8080
DEFAULT_HOST = "0.0.0.0"
# Between two bytes of an upstream response. A non-streamed completion sends nothing until
# the whole generation is done, so this bounds the longest non-streamed request.
DEFAULT_UPSTREAM_TIMEOUT = 300.0
# Asked of the API server for each pod watch; it ends the stream after this long and the
# router watches again from where it was (client-go picks 5 to 10 minutes).
DEFAULT_WATCH_TIMEOUT = 300
ENV_PREFIX = "AIRFLEET_ROUTER_"
DEFAULT_SESSION_HEADER = "X-Session-ID"
AFFINITY_MODES = ("messages", "off")
DEFAULT_LOAD_FACTOR = 1.25
DEFAULT_SCRAPE_INTERVAL = 2.0


class ConfigError(ValueError):
    """The environment or kubeconfig does not say where or how to run."""


class TokenSource:
    """A bearer token: a static value (inline in a kubeconfig) or a file, re-read when its
    modification time, size or inode change. The value is never logged or shown in ``repr``."""

    def __init__(self, path: Path | None = None, value: str | None = None) -> None:
        self.path = path
        self._value = value
        self._stamp: tuple[int, int, int] | None = None

    def __repr__(self) -> str:
        return f"TokenSource(path={str(self.path) if self.path else None!r})"

    def get(self) -> str | None:
        if self.path is None:
            return self._value
        try:
            st = self.path.stat()
        except OSError as e:
            log.warning("cannot read the API token file %s: %s", self.path, e.strerror)
            return self._value
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            try:
                self._value = self.path.read_text().strip() or None
            except OSError as e:
                log.warning("cannot read the API token file %s: %s", self.path, e.strerror)
                return self._value
            if self._stamp is not None:
                log.info("API token file %s changed; using the new token", self.path)
            self._stamp = stamp
        return self._value

    def invalidate(self) -> None:
        """Re-read the file at the next :meth:`get` (after the API answered 401)."""
        self._stamp = None


@dataclass(frozen=True)
class RouterConfig:
    api_url: str
    namespace: str
    token: TokenSource
    # CA bundle for an https API; None means the system trust store (or plain http).
    ca_file: Path | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    watch_timeout: int = DEFAULT_WATCH_TIMEOUT
    log_level: str = "info"
    access_log: bool = False
    # Sticky sessions: the header holding a session key; without it, "messages" keys a
    # request by its first user messages, "off" leaves it unkeyed.
    session_header: str = DEFAULT_SESSION_HEADER
    affinity: str = "messages"
    load_factor: float = DEFAULT_LOAD_FACTOR  # c of consistent hashing with bounded loads
    scrape_interval: float = DEFAULT_SCRAPE_INTERVAL  # seconds between engine /metrics reads

    def api_verify(self) -> ssl.SSLContext | bool:
        """What httpx's ``verify=`` gets for the API client."""
        if not self.api_url.startswith("https://"):
            return False
        if self.ca_file is None:
            return ssl.create_default_context()
        return ssl.create_default_context(cafile=str(self.ca_file))


def load(env: Mapping[str, str] | None = None, kubeconfig: str | None = None,
         service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> RouterConfig:
    """Resolve the configuration: ``AIRFLEET_ROUTER_*`` variables, then the kubeconfig (if
    given), then the pod's service account. Raises :class:`ConfigError` naming what is missing."""
    env = os.environ if env is None else env
    kube = _read_kubeconfig(Path(kubeconfig)) if kubeconfig else {}
    in_cluster = _in_cluster(env, service_account_dir)

    api_url = env.get(ENV_PREFIX + "API_URL") or kube.get("server") or in_cluster.get("server")
    if not api_url:
        raise ConfigError(
            "no Kubernetes API: set AIRFLEET_ROUTER_API_URL, pass --kubeconfig, or run in a pod "
            "(KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT)")
    if not api_url.startswith(("http://", "https://")):
        raise ConfigError(f"AIRFLEET_ROUTER_API_URL must start with http:// or https://, "
                          f"got {api_url!r}")

    namespace = (env.get(ENV_PREFIX + "NAMESPACE") or kube.get("namespace")
                 or in_cluster.get("namespace"))
    if not namespace:
        raise ConfigError(
            f"no namespace: set AIRFLEET_ROUTER_NAMESPACE or provide "
            f"{service_account_dir / 'namespace'}")

    if env.get(ENV_PREFIX + "TOKEN_FILE"):
        token = TokenSource(path=Path(env[ENV_PREFIX + "TOKEN_FILE"]))
    elif kube.get("token_file") or kube.get("token"):
        token = TokenSource(path=kube.get("token_file"), value=kube.get("token"))
    else:
        token = TokenSource(path=in_cluster.get("token_file"))

    ca_file = _ca_file(env, kube, in_cluster)
    return RouterConfig(
        api_url=api_url.rstrip("/"),
        namespace=namespace,
        token=token,
        ca_file=ca_file,
        host=env.get(ENV_PREFIX + "HOST") or DEFAULT_HOST,
        port=_number(env, "PORT", DEFAULT_PORT, int, 1, 65535),
        upstream_timeout=_number(env, "UPSTREAM_TIMEOUT", DEFAULT_UPSTREAM_TIMEOUT, float,
                                 0.001, None),
        watch_timeout=_number(env, "WATCH_TIMEOUT", DEFAULT_WATCH_TIMEOUT, int, 1, 3600),
        log_level=_log_level(env),
        access_log=_flag(env, "ACCESS_LOG", False),
        session_header=_session_header(env),
        affinity=_affinity(env),
        load_factor=_number(env, "LOAD_FACTOR", DEFAULT_LOAD_FACTOR, float, 1.0, 100.0),
        scrape_interval=_number(env, "SCRAPE_INTERVAL", DEFAULT_SCRAPE_INTERVAL, float,
                                0.05, 3600.0),
    )


def _session_header(env: Mapping[str, str]) -> str:
    name = (env.get(ENV_PREFIX + "SESSION_HEADER") or DEFAULT_SESSION_HEADER).strip()
    if not name or any(c in name for c in " \t:()<>@,;\\\"/[]?={}"):
        raise ConfigError(f"{ENV_PREFIX}SESSION_HEADER must be an HTTP header name, "
                          f"got {name!r}")
    return name


def _affinity(env: Mapping[str, str]) -> str:
    mode = (env.get(ENV_PREFIX + "AFFINITY") or "messages").strip().lower()
    if mode not in AFFINITY_MODES:
        raise ConfigError(f"{ENV_PREFIX}AFFINITY must be one of {', '.join(AFFINITY_MODES)}, "
                          f"got {mode!r}")
    return mode


def _ca_file(env: Mapping[str, str], kube: dict, in_cluster: dict) -> Path | None:
    raw = env.get(ENV_PREFIX + "CA_FILE")
    if raw is not None:
        # "" or "none": no CA bundle (plain http, or the system trust store for https).
        return None if raw.strip().lower() in ("", "none") else Path(raw)
    if "ca_file" in kube:
        return kube["ca_file"]
    return in_cluster.get("ca_file")


def _log_level(env: Mapping[str, str]) -> str:
    level = (env.get(ENV_PREFIX + "LOG_LEVEL") or "info").strip().lower()
    if level not in ("critical", "error", "warning", "info", "debug"):
        raise ConfigError(f"{ENV_PREFIX}LOG_LEVEL must be one of critical, error, warning, "
                          f"info, debug; got {level!r}")
    return level


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(ENV_PREFIX + name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{ENV_PREFIX}{name} must be true or false, got {raw!r}")


def _number(env: Mapping[str, str], name: str, default, kind, low, high):
    raw = env.get(ENV_PREFIX + name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name} must be a number, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{ENV_PREFIX}{name} must be {bounds}, got {raw!r}")
    return value


def _in_cluster(env: Mapping[str, str], sa_dir: Path) -> dict:
    found: dict = {}
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if host and port:
        found["server"] = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    if (sa_dir / "namespace").is_file():
        found["namespace"] = (sa_dir / "namespace").read_text().strip()
    if (sa_dir / "token").exists():
        found["token_file"] = sa_dir / "token"
    if (sa_dir / "ca.crt").is_file():
        found["ca_file"] = sa_dir / "ca.crt"
    return found


def _read_kubeconfig(path: Path) -> dict:
    """Server, CA, token (or tokenFile) and namespace of the kubeconfig's current context.
    Client certificates and exec plugins are not supported: the router runs with a service
    account, the kubeconfig path is for development."""
    import yaml  # only with --kubeconfig

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read kubeconfig {path}: {e}") from None

    def named(section: str, name: str | None) -> dict:
        for entry in doc.get(section) or []:
            if entry.get("name") == name:
                return entry.get(section[:-1]) or {}
        raise ConfigError(f"kubeconfig {path}: no {section[:-1]} named {name!r}")

    current = doc.get("current-context")
    if not current and len(doc.get("contexts") or []) == 1:
        current = doc["contexts"][0].get("name")
    context = named("contexts", current)
    cluster = named("clusters", context.get("cluster"))
    user = named("users", context.get("user")) if context.get("user") else {}
    if user.get("exec") or user.get("client-certificate") or user.get("client-certificate-data"):
        raise ConfigError(f"kubeconfig {path}: only token and tokenFile users are supported")

    found: dict = {"server": cluster.get("server")}
    if context.get("namespace"):
        found["namespace"] = context["namespace"]
    base = path.parent
    if user.get("tokenFile"):
        found["token_file"] = base / user["tokenFile"]
    elif user.get("token"):
        found["token"] = user["token"]
    if cluster.get("certificate-authority"):
        found["ca_file"] = base / cluster["certificate-authority"]
    elif cluster.get("certificate-authority-data"):
        ca = tempfile.NamedTemporaryFile("wb", prefix="airfleet-router-ca-", suffix=".crt",
                                         delete=False)
        with ca:
            ca.write(base64.b64decode(cluster["certificate-authority-data"]))
        found["ca_file"] = Path(ca.name)
    if cluster.get("insecure-skip-tls-verify"):
        raise ConfigError(f"kubeconfig {path}: insecure-skip-tls-verify is not supported; "
                          f"give the cluster's CA")
    return found
