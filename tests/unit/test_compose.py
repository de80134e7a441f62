"""Structure of the deployment files: docker-compose.yaml, Dockerfile, .env.example, .gitignore.

The files are read as text and YAML only: no Docker engine runs here, and `docker compose config`
is not needed (PyYAML resolves the `x-airflow-common` anchors and merge keys the same way).
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

INFRA_SERVICES = ("postgres", "redis")
AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
)
LONG_RUNNING = tuple(name for name in AIRFLOW_SERVICES if name != "airflow-init")
COMMANDS = {
    "airflow-apiserver": "airflow api-server",
    "airflow-scheduler": "airflow scheduler",
    "airflow-dag-processor": "airflow dag-processor",
    "airflow-triggerer": "airflow triggerer",
    "airflow-worker": "airflow celery worker",
}
MOUNTS = {
    "/opt/airflow/dags": "./dags",
    "/opt/airflow/plugins": "./plugins",
    "/opt/airflow/include": "./include",
    "/opt/airflow/policies": "./policies",
    "/opt/airflow/keys": "airfleet-keys",
}
SECRET_WORDS = {"PASSWORD", "SECRET", "FERNET", "TOKEN", "KEY"}
REQUIRED_INTERPOLATION = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]+\}")
URL_USERINFO = re.compile(r"://[^/:@\s]+:(?P<password>[^@\s]+)@")
AIRFLOW_VERSION = "3.3.2"


@cache
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def service(name: str) -> dict:
    services = compose()["services"]
    assert name in services, f"docker-compose.yaml has no service {name!r}"
    return services[name]


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def env_files(svc: dict) -> list[str]:
    files = svc.get("env_file", [])
    files = [files] if isinstance(files, str | dict) else files
    return [entry["path"] if isinstance(entry, dict) else entry for entry in files]


def mounts(svc: dict) -> dict[str, tuple[str, str]]:
    """Target -> (source, "ro" | "rw") for each volume entry, short or long syntax."""
    result = {}
    for entry in svc.get("volumes", []):
        if isinstance(entry, dict):
            mode = "ro" if entry.get("read_only") else "rw"
            result[entry["target"]] = (entry.get("source", ""), mode)
        else:
            source, target, *mode = entry.split(":")
            result[target] = (source, "ro" if "ro" in mode[:1] else "rw")
    return result


def pip_install_paths(command: str) -> list[str]:
    """Local paths a `pip install` in a shell command installs (requirement files excluded)."""
    paths = []
    for segment in re.split(r"&&|;|\|\|", command):
        words = segment.split()
        if words[:2] != ["pip", "install"]:
            continue
        skip_next = False
        for word in words[2:]:
            if skip_next:
                skip_next = False
            elif word in ("-r", "-c", "--requirement", "--constraint"):
                skip_next = True
            elif not word.startswith("-") and ("/" in word or word == "."):
                paths.append(word)
    return paths


def command_text(svc: dict) -> str:
    command = svc.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def is_secret_name(name: str) -> bool:
    return bool(SECRET_WORDS & set(name.upper().split("_")))


def strings(node: object) -> list[str]:
    """Every string in a parsed YAML tree (keys and values; comments are already gone)."""
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in strings(key) + strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


def referenced_variables(text: str) -> set[str]:
    """Variables Compose interpolates: `${VAR...}` and `$VAR`, but not the `$$` escape."""
    text = text.replace("$$", "")
    return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))


def env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not a NAME=value line: {line!r}"
            values[name.strip()] = value.strip()
    return values


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            result.append((instruction.upper(), " ".join(args.split())))
    return result


# -- docker-compose.yaml ------------------------------------------------------------------------


@pytest.mark.parametrize("name", INFRA_SERVICES + AIRFLOW_SERVICES)
def test_required_service_exists(name: str) -> None:
    service(name)


def test_every_image_is_pinned() -> None:
    for name, svc in compose()["services"].items():
        image = svc.get("image")
        assert image, f"service {name!r} has no image: (a build-only service has no pinned name)"
        image = image.split("@sha256:")[0]  # a digest pins; the tag is still required (readable)
        repo, sep, tag = image.rpartition(":")
        assert sep and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} uses the floating tag 'latest'"
    for name in INFRA_SERVICES:
        tag = service(name)["image"].rpartition(":")[2]
        assert re.fullmatch(r"\d+(\.\d+)+", tag), (
            f"{name}: image tag {tag!r} is not a full version (like 16.4 or 7.4.1)"
        )


def test_airflow_image_is_built_here_and_versioned_like_the_package() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name in AIRFLOW_SERVICES:
        svc = service(name)
        assert svc.get("build") == ".", f"{name}: must be built from ./Dockerfile (build: .)"
        assert svc.get("image") == f"airfleet:{version}", (
            f"{name}: image {svc.get('image')!r} should be airfleet:{version} (pyproject version)"
        )


def test_postgres_and_redis_have_healthchecks() -> None:
    assert "pg_isready" in str(service("postgres").get("healthcheck", {}).get("test")), (
        "postgres healthcheck must run pg_isready"
    )
    assert "ping" in str(service("redis").get("healthcheck", {}).get("test")), (
        "redis healthcheck must run redis-cli ping"
    )
    assert "postgres-data" in mounts(service("postgres")).get("/var/lib/postgresql/data", ("",))[0]
    assert "postgres-data" in compose().get("volumes", {}), "named volume postgres-data missing"


def test_airfleet_database_is_created_by_an_init_sql() -> None:
    sources = {source for source, _ in mounts(service("postgres")).values()}
    init = [t for t, (s, _) in mounts(service("postgres")).items() if "postgres-init.sql" in s]
    assert "./deploy/postgres-init.sql" in sources, "postgres must mount ./deploy/postgres-init.sql"
    assert init and init[0].startswith("/docker-entrypoint-initdb.d/"), (
        "postgres-init.sql must be mounted into /docker-entrypoint-initdb.d/"
    )
    sql = (ROOT / "deploy" / "postgres-init.sql").read_text()
    assert re.search(r"CREATE DATABASE\s+airfleet\b", sql, re.IGNORECASE), (
        "deploy/postgres-init.sql must create the database 'airfleet'"
    )


def shared_settings(svc: dict) -> dict[str, str]:
    """The KEY=VALUE lines of the checked-in env files a service reads (.env is the user's)."""
    settings = {}
    for path in env_files(svc):
        if path == ".env":
            continue
        for line in (ROOT / path).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, value = line.split("=", 1)
                settings[key] = value
    return settings


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_airflow_environment(name: str) -> None:
    # compose: `environment` wins over `env_file`.
    env = {**shared_settings(service(name)), **environment(service(name))}
    expected = {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "false",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "http://airflow-apiserver:8080/execution/",
        "AIRFLEET_KEYS_DIR": "/opt/airflow/keys",
    }
    for key, value in expected.items():
        assert env.get(key) == value, f"{name}: {key} is {env.get(key)!r}, expected {value!r}"
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND"):
        assert "@postgres:" in env.get(key, ""), f"{name}: {key} must point at postgres"
    assert env.get("AIRFLOW__CELERY__BROKER_URL", "").startswith("redis://redis:"), (
        f"{name}: AIRFLOW__CELERY__BROKER_URL must point at redis"
    )
    airfleet_url = env.get("AIRFLEET_DATABASE_URL", "")
    assert airfleet_url.startswith("postgresql+psycopg://") and airfleet_url.endswith(
        "@postgres:5432/airfleet"
    ), f"{name}: AIRFLEET_DATABASE_URL must be the 'airfleet' database via psycopg 3"
    assert ".env" in env_files(service(name)), f"{name}: must read its secrets from env_file .env"


def test_secrets_are_interpolated_never_literal() -> None:
    for name, svc in compose()["services"].items():
        for key, value in environment(svc).items():
            if is_secret_name(key):
                assert REQUIRED_INTERPOLATION.fullmatch(value), (
                    f"{name}: {key} must be a required interpolation ${{{key}:?...}} "
                    f"from .env, not {value!r}"
                )
            for match in URL_USERINFO.finditer(value):
                assert REQUIRED_INTERPOLATION.fullmatch(match["password"]), (
                    f"{name}: {key} embeds a literal password; interpolate it from .env"
                )


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_airflow_mounts(name: str) -> None:
    found = mounts(service(name))
    for target, source in MOUNTS.items():
        assert found.get(target, ("",))[0] == source, (
            f"{name}: expected {source} mounted at {target}, found {found.get(target)}"
        )
    for target in (t for t in MOUNTS if t != "/opt/airflow/keys"):
        assert found[target][1] == "ro", f"{name}: {target} should be mounted read-only"
    assert "airfleet-keys" in compose().get("volumes", {}), "named volume airfleet-keys missing"


def test_only_airflow_init_writes_the_keys() -> None:
    assert mounts(service("airflow-init"))["/opt/airflow/keys"][1] == "rw", (
        "airflow-init creates the vault keys: it needs the keys volume read-write"
    )


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_airflow_waits_for_healthy_postgres_and_redis(name: str) -> None:
    depends = service(name).get("depends_on", {})
    for dependency in INFRA_SERVICES:
        assert depends.get(dependency, {}).get("condition") == "service_healthy", (
            f"{name}: must depend on {dependency} with condition service_healthy"
        )


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_airflow_waits_for_airflow_init(name: str) -> None:
    condition = service(name).get("depends_on", {}).get("airflow-init", {}).get("condition")
    assert condition == "service_completed_successfully", (
        f"{name}: must depend on airflow-init with condition service_completed_successfully"
    )


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_airflow_commands(name: str) -> None:
    command = command_text(service(name))
    assert COMMANDS[name] in command, f"{name}: command {command!r} should run {COMMANDS[name]!r}"
    assert service(name).get("healthcheck", {}).get("test"), f"{name}: has no healthcheck"


def test_airflow_init_migrates_and_creates_keys_once() -> None:
    script = command_text(service("airflow-init"))
    steps = ["airflow db migrate", "airfleet db migrate", "airfleet keys init"]
    positions = [script.find(step) for step in steps]
    assert -1 not in positions, f"airflow-init must run {steps}; its command is {script!r}"
    assert positions == sorted(positions), f"airflow-init must run {steps} in this order"
    guard = re.search(r"\[\s+-f\s+\S*AIRFLEET_KEYS_DIR\S*\s+\]", script[: positions[2]])
    assert guard, "`airfleet keys init` must be guarded by a test for the existing public key file"


def test_apiserver_port_and_health() -> None:
    apiserver = service("airflow-apiserver")
    assert any(str(port).endswith("8080:8080") for port in apiserver.get("ports", [])), (
        "airflow-apiserver must publish port 8080"
    )
    assert "http://localhost:8080/api/v2/monitor/health" in str(apiserver["healthcheck"]["test"])


# -- .env.example and .gitignore ----------------------------------------------------------------


def test_env_example_lists_every_interpolated_variable() -> None:
    referenced = set().union(*(referenced_variables(s) for s in strings(compose())))
    missing = referenced - set(env_example())
    assert referenced, "docker-compose.yaml references no variables: secrets cannot come from .env"
    assert not missing, f".env.example is missing {sorted(missing)}"


def test_env_example_holds_no_secret_values() -> None:
    filled = {
        name: value for name, value in env_example().items() if is_secret_name(name) and value
    }
    assert not filled, f".env.example must leave secrets empty, found values for {sorted(filled)}"


def test_env_is_git_ignored_and_env_example_is_not() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    assert ".env" in patterns, ".gitignore must list .env"
    ignoring = [p for p in patterns if fnmatch.fnmatch(".env.example", p.lstrip("/"))]
    assert not ignoring, f".gitignore pattern(s) {ignoring} would hide .env.example"


# -- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_base_image_is_pinned_to_airflow() -> None:
    froms = [args for instruction, args in dockerfile_instructions() if instruction == "FROM"]
    assert froms, "Dockerfile has no FROM"
    assert froms[-1].startswith(f"apache/airflow:{AIRFLOW_VERSION}"), (
        f"Dockerfile must build FROM apache/airflow:{AIRFLOW_VERSION}..., not {froms[-1]!r}"
    )
    for pins in ("requirements.txt", "constraints.txt"):
        text = (ROOT / pins).read_text()
        assert re.search(rf"^apache-airflow=={re.escape(AIRFLOW_VERSION)}$", text, re.M), (
            f"{pins} must pin apache-airflow=={AIRFLOW_VERSION}, the base image's version"
        )


def test_dockerfile_installs_pins_and_package_as_airflow_user() -> None:
    user = "airflow"  # the base image's default
    installs = []
    for instruction, args in dockerfile_instructions():
        if instruction == "USER":
            user = args.split(":")[0]
        elif instruction == "RUN" and "pip install" in args:
            assert user in ("airflow", "50000"), f"pip runs as {user!r}, not airflow: {args!r}"
            installs.append(args)
    assert any(
        re.search(r"-r \S*requirements\.txt", cmd) and re.search(r"-c \S*constraints\.txt", cmd)
        for cmd in installs
    ), "Dockerfile must `pip install -r requirements.txt -c constraints.txt`"
    copied = " ".join(
        args for instruction, args in dockerfile_instructions() if instruction == "COPY"
    )
    for needed in ("requirements.txt", "constraints.txt", "pyproject.toml", "include"):
        assert needed in copied, f"Dockerfile must COPY {needed}"
    assert any(pip_install_paths(cmd) for cmd in installs), (
        "Dockerfile must pip install the airfleet package itself (from the copied pyproject.toml)"
    )


def test_dockerfile_bakes_no_mounted_code_and_no_secrets() -> None:
    for instruction, args in dockerfile_instructions():
        if instruction in ("COPY", "ADD"):
            sources = args.split()[:-1]
            for folder in ("dags", "plugins", "policies"):
                assert not any(s.rstrip("/") in (folder, f"./{folder}") for s in sources), (
                    f"{folder}/ is mounted at run time and must not be baked into the image"
                )
        if instruction in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args)
            secret = [n for n in names if is_secret_name(n)]
            assert not secret, f"Dockerfile must not set secrets ({secret}) in {instruction}"
