"""The remote command builders (airfleet.backends.ssh.commands): exact strings, quoting,
validation, the spec hash, and the shell snippets executed by a real ``sh`` against fake
``docker`` / ``podman`` / ``ps`` programs."""

from __future__ import annotations

import inspect
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from airfleet.backends.ssh import commands as c
from airfleet.backends.ssh.commands import Mount, RayContainer, RayStart
from airfleet.resources import ModelCache, SSHConfig

IMAGE = "rayproject/ray:2.60.0"
CACHE = (Mount("/data/models", "/models/hf"),)
HF = {"HF_HOME": "/models/hf"}
HOSTILE_PATH = "/data/my models;rm -rf /"
HOSTILE_VALUE = """it's "quoted" $(touch /tmp/pwned) `id` \\ ; | &"""
NODE_ID = "3f2a" * 14

EXISTS = ("names=$({rt} container ls -a --format '{{{{.Names}}}}') || exit 1; "
          "printf '%s\\n' \"$names\" | grep -qxF -- airfleet-ray-llm-a || exit {code}; ")


def container(runtime="docker", *, head=True, gpus=0, mounts=(), env=None, image=IMAGE,
              shm="16g", cluster="llm-a") -> RayContainer:
    start = RayStart("10.0.0.1", num_gpus=gpus) if head else \
        RayStart("10.0.0.2", "10.0.0.1", num_gpus=gpus)
    return RayContainer(runtime, cluster, image, start, shm, mounts, env or {})


# ---- ray start, host processes (container_runtime: none) ---------------------------------------

def test_ray_start_head_and_worker_as_host_processes():
    assert c.ray_start_head("10.0.0.1") == (
        "ray start --head --node-ip-address=10.0.0.1 --port=6379 --dashboard-host=127.0.0.1 "
        "--dashboard-port=8265 --num-gpus=0 --disable-usage-stats")
    assert c.ray_start_worker("10.0.0.2", "10.0.0.1") == (
        "ray start --address=10.0.0.1:6379 --node-ip-address=10.0.0.2 --num-gpus=0")


def test_ray_start_with_gpus_cache_env_temp_dir_and_own_executable():
    assert c.ray_start_head(
        "10.0.0.1", gcs_port=6380, dashboard_port=8266, num_gpus=4,
        executable="/opt/ray/bin/ray", temp_dir="/var/tmp/ray",
        env={"HF_HOME": "/data/models", "B": "x y"}) == (
        "env 'B=x y' HF_HOME=/data/models /opt/ray/bin/ray start --head "
        "--node-ip-address=10.0.0.1 --port=6380 --dashboard-host=127.0.0.1 --dashboard-port=8266 "
        "--num-gpus=4 --disable-usage-stats --temp-dir=/var/tmp/ray")
    assert c.ray_start_worker("10.0.0.2", "10.0.0.1", gcs_port=6380, num_gpus=8,
                              env={"HF_HOME": "/data/models"}) == (
        "env HF_HOME=/data/models ray start --address=10.0.0.1:6380 --node-ip-address=10.0.0.2 "
        "--num-gpus=8")


def test_ipv6_head_address_is_bracketed():
    assert c.ray_start_worker("fd00::2", "fd00::1", num_gpus=1) == (
        "ray start '--address=[fd00::1]:6379' --node-ip-address=fd00::2 --num-gpus=1")


def test_an_executable_that_env_would_read_as_an_assignment_is_refused():
    with pytest.raises(ValueError, match="must not contain '='"):
        c.ray_start_head("10.0.0.1", executable="/opt/a=b/ray", env=HF)
    with pytest.raises(ValueError, match="not starting with '-'"):
        c.ray_start_head("10.0.0.1", executable="--help")


# ---- containers ------------------------------------------------------------------------------

# The spec hashes are pinned on purpose: a change here changes every node's hash, so every
# running Ray container in the fleet is replaced on the next apply. Make that change knowingly.
def test_docker_head_and_worker_without_gpus_or_caches():
    assert c.container_run(container()) == (
        "docker run -d --name airfleet-ray-llm-a --label airfleet.io/cluster=llm-a "
        "--label airfleet.io/spec-hash=6419070a90e5 --init --network host --restart no "
        "--shm-size=16g rayproject/ray:2.60.0 ray start --head --node-ip-address=10.0.0.1 "
        "--port=6379 --dashboard-host=127.0.0.1 --dashboard-port=8265 --num-gpus=0 "
        "--disable-usage-stats --block")
    assert c.container_run(container(head=False)) == (
        "docker run -d --name airfleet-ray-llm-a --label airfleet.io/cluster=llm-a "
        "--label airfleet.io/spec-hash=992b538bf946 --init --network host --restart no "
        "--shm-size=16g rayproject/ray:2.60.0 ray start --address=10.0.0.1:6379 "
        "--node-ip-address=10.0.0.2 --num-gpus=0 --block")


def test_docker_head_and_worker_with_gpus_and_a_cache():
    assert c.container_run(container(gpus=8, mounts=CACHE, env=HF)) == (
        "docker run -d --name airfleet-ray-llm-a --label airfleet.io/cluster=llm-a "
        "--label airfleet.io/spec-hash=0166f2a16759 --init --network host --restart no "
        "--shm-size=16g --gpus all -v /data/models:/models/hf -e HF_HOME=/models/hf "
        "rayproject/ray:2.60.0 ray start --head --node-ip-address=10.0.0.1 --port=6379 "
        "--dashboard-host=127.0.0.1 --dashboard-port=8265 --num-gpus=8 --disable-usage-stats "
        "--block")
    assert c.container_run(container(head=False, gpus=8, mounts=CACHE, env=HF)) == (
        "docker run -d --name airfleet-ray-llm-a --label airfleet.io/cluster=llm-a "
        "--label airfleet.io/spec-hash=0d4882f9bbf3 --init --network host --restart no "
        "--shm-size=16g --gpus all -v /data/models:/models/hf -e HF_HOME=/models/hf "
        "rayproject/ray:2.60.0 ray start --address=10.0.0.1:6379 --node-ip-address=10.0.0.2 "
        "--num-gpus=8 --block")


def test_podman_head_and_worker_with_and_without_gpus():
    assert c.container_run(container("podman")) == (
        "podman run -d --name airfleet-ray-llm-a --label airfleet.io/cluster=llm-a "
        "--label airfleet.io/spec-hash=32efde53bf18 --init --network host --restart no "
        "--shm-size=16g rayproject/ray:2.60.0 ray start --head --node-ip-address=10.0.0.1 "
        "--port=6379 --dashboard-host=127.0.0.1 --dashboard-port=8265 --num-gpus=0 "
        "--disable-usage-stats --block")
    assert c.container_run(container("podman", head=False, gpus=8, mounts=CACHE, env=HF)) == (
        "podman run -d --name airfleet-ray-llm-a --label airfleet.io/cluster=llm-a "
        "--label airfleet.io/spec-hash=6879c0398dc0 --init --network host --restart no "
        "--shm-size=16g --device nvidia.com/gpu=all -v /data/models:/models/hf "
        "-e HF_HOME=/models/hf rayproject/ray:2.60.0 ray start --address=10.0.0.1:6379 "
        "--node-ip-address=10.0.0.2 --num-gpus=8 --block")


def test_ray_container_from_the_cluster_spec():
    ssh = SSHConfig(head="10.0.0.1", workers=["10.0.0.2"], credential={"airflow_conn_id": "s"},
                    container_runtime="podman", ray={"image": "reg.example:5000/ray:2.60.0-gpu"})
    caches = [ModelCache(name="hf", host_path={"path": "/data/models"}),
              ModelCache(name="extra", mount_path="/weights", host_path={"path": "/srv/w"})]
    worker = c.ray_container("llm-a", ssh, caches, c.node_start(ssh, "10.0.0.2", 2),
                             shm_size=c.shm_size_for(64 * 2**30))
    assert c.container_run(worker) == (
        "podman run -d --name airfleet-ray-llm-a --label airfleet.io/cluster=llm-a "
        f"--label airfleet.io/spec-hash={worker.spec_hash} --init --network host --restart no "
        "--shm-size=21626m --device nvidia.com/gpu=all -v /data/models:/models/hf "
        "-v /srv/w:/weights -e HF_HOME=/models/hf reg.example:5000/ray:2.60.0-gpu ray start "
        "--address=10.0.0.1:6379 --node-ip-address=10.0.0.2 --num-gpus=2 --block")
    assert c.node_start(ssh, "10.0.0.1").is_head
    with pytest.raises(ValueError, match="host processes"):
        c.ray_container("llm-a", ssh.model_copy(update={"container_runtime": "none"}), caches,
                        c.node_start(ssh, "10.0.0.1"), shm_size="1g")


def test_model_caches_become_mounts_and_hf_home():
    caches = [ModelCache(name="hf", host_path={"path": "/data/models"}),
              ModelCache(name="b", mount_path="/b", host_path={"path": "/srv/b"})]
    assert c.cache_mounts(caches) == (Mount("/data/models", "/models/hf"), Mount("/srv/b", "/b"))
    assert c.model_cache_env(caches, "docker") == {"HF_HOME": "/models/hf"}
    assert c.model_cache_env(caches, "none") == {"HF_HOME": "/data/models"}
    assert c.model_cache_env([], "docker") == {}
    with pytest.raises(ValueError, match="host_path caches only"):
        c.cache_mounts([ModelCache(name="n", nfs={"server": "nfs.example", "path": "/x"})])


def test_shm_size_follows_the_ray_launcher_rule_from_total_memory():
    assert c.shm_size_for(24 * 2**30) == "8110m"           # 33 % of 24 GiB
    assert c.shm_size_for(2 * 10**12) == "190734m"         # capped at 200 GB
    assert c.shm_size_for(10**6) == "64m"                  # never below docker's default
    with pytest.raises(ValueError, match="shm_size"):
        container(shm="16 g")


def test_container_inspect_remove_stop_and_pull():
    assert c.container_inspect("docker", "llm-a") == EXISTS.format(rt="docker", code=3) + (
        "docker container inspect --format 'status={{.State.Status}} "
        "cluster={{index .Config.Labels \"airfleet.io/cluster\"}} "
        "spec_hash={{index .Config.Labels \"airfleet.io/spec-hash\"}}' airfleet-ray-llm-a")
    assert c.container_remove("podman", "llm-a") == (
        EXISTS.format(rt="podman", code=0) + "podman rm -f airfleet-ray-llm-a")
    assert c.ray_stop("docker", "llm-a") == EXISTS.format(rt="docker", code=0) + (
        "docker stop -t 30 airfleet-ray-llm-a && docker rm -f airfleet-ray-llm-a")
    assert c.ray_stop("podman", "llm-a", grace_seconds=5) == EXISTS.format(rt="podman", code=0) + (
        "podman stop -t 5 airfleet-ray-llm-a && podman rm -f airfleet-ray-llm-a")
    assert c.ray_stop("docker", "llm-a", force=True) == c.container_remove("docker", "llm-a")
    assert c.image_pull("docker", IMAGE) == "docker pull rayproject/ray:2.60.0"


def test_ray_stop_as_host_processes():
    assert c.ray_stop("none", "llm-a") == "ray stop --grace-period=30"
    assert c.ray_stop("none", "llm-a", force=True, executable="/opt/ray/bin/ray") == (
        "/opt/ray/bin/ray stop --force")


def test_parse_container_inspect():
    state = c.parse_container_inspect("status=running cluster=llm-a spec_hash=8164ef749df3\n")
    assert state == c.ContainerState("running", "llm-a", "8164ef749df3") and state.running
    foreign = c.parse_container_inspect("status=exited cluster= spec_hash=<no value>\n")
    assert foreign == c.ContainerState("exited", "", "") and not foreign.running


def test_ray_drain_node_on_the_host_and_in_the_head_container():
    args = dict(head_ip="10.0.0.1", gcs_port=6379, node_id=NODE_ID,
                message="scale down: it's time", deadline_seconds=600)
    tail = (f"drain-node --address 10.0.0.1:6379 --node-id {NODE_ID} "
            "--reason DRAIN_NODE_REASON_PREEMPTION --reason-message "
            "'scale down: it'\"'\"'s time' --deadline-remaining-seconds 600")
    assert c.ray_drain_node("none", "llm-a", **args) == "ray " + tail
    assert c.ray_drain_node("docker", "llm-a", **args) == (
        "docker exec airfleet-ray-llm-a ray " + tail)
    assert c.ray_drain_node("podman", "llm-a", **args) == (
        "podman exec airfleet-ray-llm-a ray " + tail)
    with pytest.raises(ValueError, match="not a Ray node id"):
        c.ray_drain_node("none", "llm-a", **{**args, "node_id": "abc; reboot"})


def test_registry_login_reads_the_password_from_stdin_and_takes_no_password():
    assert c.registry_login("docker", "https://registry.example:5000/team", "robot$ci") == (
        "docker login --username 'robot$ci' --password-stdin registry.example:5000")
    assert c.registry_login("podman", "registry.example", "robot") == (
        "podman login --username robot --password-stdin "
        "--authfile \"$HOME\"/.config/containers/auth.json registry.example")
    params = inspect.signature(c.registry_login).parameters
    assert list(params) == ["runtime", "registry", "username"]
    assert not [p for p in params if "pass" in p or "secret" in p or "token" in p]
    with pytest.raises(ValueError):
        c.registry_login("none", "registry.example", "robot")


def test_write_registry_ca():
    assert c.write_registry_ca("docker", "registry.example:5000") == (
        "mkdir -p -- /etc/docker/certs.d/registry.example:5000 && "
        "tmp=$(mktemp /etc/docker/certs.d/registry.example:5000/.ca.crt.XXXXXX) && "
        "{ cat >\"$tmp\" && grep -q 'BEGIN CERTIFICATE' \"$tmp\" && chmod 0644 \"$tmp\" && "
        "mv -f \"$tmp\" /etc/docker/certs.d/registry.example:5000/ca.crt || "
        "{ rm -f \"$tmp\"; exit 1; }; }")
    assert c.write_registry_ca("podman", "https://registry.example/v2").startswith(
        "mkdir -p -- /etc/containers/certs.d/registry.example && ")


@pytest.mark.parametrize("url", ["..", "registry.example/../../etc", "a b", "reg;rm", "-x", ""])
def test_a_registry_host_that_is_not_a_plain_host_is_refused(url):
    # it becomes a directory name: quoting would not stop "..".
    if url == "registry.example/../../etc":  # the path is dropped: the host is fine
        assert c.registry_host(url) == "registry.example"
        return
    with pytest.raises(ValueError, match="is not a registry host"):
        c.write_registry_ca("docker", url)


def test_ensure_directory_and_leftovers():
    assert c.ensure_directory("/data/models") == "mkdir -p -- /data/models"
    assert c.leftovers("docker", "llm-a") == (
        "docker container ls -a --filter label=airfleet.io/cluster=llm-a "
        "--format 'container {{.Names}}'")
    assert c.leftovers("podman", "llm-a").startswith("podman container ls -a --filter ")
    assert c.leftovers("none", "llm-a").startswith(
        "out=$(ps -eo pid=,args=) || exit 1; printf '%s\\n' \"$out\" | awk '$2 ~ ")
    with pytest.raises(ValueError, match="absolute"):
        c.ensure_directory("relative/dir")


# ---- quoting and validation ------------------------------------------------------------------

def test_hostile_values_stay_one_argument():
    hostile = container(mounts=(Mount(HOSTILE_PATH, "/models/x y"),),
                        env={"HF_HOME": "/models/x y", "NOTE": HOSTILE_VALUE})
    argv = shlex.split(c.container_run(hostile))
    assert f"{HOSTILE_PATH}:/models/x y" in argv
    assert f"NOTE={HOSTILE_VALUE}" in argv and "HF_HOME=/models/x y" in argv
    assert argv[argv.index(f"NOTE={HOSTILE_VALUE}") - 1] == "-e"

    host = shlex.split(c.ray_start_head("10.0.0.1", env={"HF_HOME": HOSTILE_PATH},
                                        temp_dir="/tmp/ray dir"))
    assert host[:3] == ["env", f"HF_HOME={HOSTILE_PATH}", "ray"]
    assert "--temp-dir=/tmp/ray dir" in host
    assert shlex.split(c.ensure_directory(HOSTILE_PATH)) == ["mkdir", "-p", "--", HOSTILE_PATH]

    drain = shlex.split(c.ray_drain_node("docker", "llm-a", head_ip="10.0.0.1", gcs_port=6379,
                                         node_id=NODE_ID, message=HOSTILE_VALUE,
                                         deadline_seconds=1))
    assert drain[drain.index("--reason-message") + 1] == HOSTILE_VALUE
    login = shlex.split(c.registry_login("docker", "registry.example", HOSTILE_VALUE))
    assert login[login.index("--username") + 1] == HOSTILE_VALUE


def test_hostile_values_do_not_run_in_a_real_shell(tmp_path):
    marker = tmp_path / "pwned"
    value = f"$(touch {marker}); `touch {marker}`; touch {marker} #'\""
    cmd = c.ray_start_head("10.0.0.1", executable="printf", env={"X": value})
    # `env X=... printf start ...`: printf prints its format and exits; nothing is executed.
    done = subprocess.run(["sh", "-c", cmd.replace(" printf start", " printf %s\\\\n start")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()


@pytest.mark.parametrize("name", ["1A", "A-B", "A B", "", "A=B", "É", "A\n", "HF_HOME;id"])
def test_bad_environment_variable_names_are_refused(name):
    with pytest.raises(ValueError, match="not a valid environment variable name"):
        c.ray_start_head("10.0.0.1", env={name: "x"})
    with pytest.raises(ValueError, match="not a valid environment variable name"):
        container(env={name: "x"})


@pytest.mark.parametrize("path", ["/data/a:b", "relative", "/data/a\nb", ""])
def test_mount_paths_docker_cannot_parse_are_refused(path):
    with pytest.raises(ValueError, match="must be absolute, without ':'"):
        Mount(path, "/models/x")
    with pytest.raises(ValueError):
        Mount("/data", path)


@pytest.mark.parametrize("kwargs, match", [
    ({"cluster": "Bad_Name"}, "not a cluster name"),
    ({"cluster": "llm-a;id"}, "not a cluster name"),
    ({"image": "--privileged"}, "image must be"),
    ({"image": ""}, "image must be"),
])
def test_bad_container_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        container(**kwargs)


def test_bad_ray_start_values_are_refused():
    with pytest.raises(ValueError, match="not a hostname"):
        RayStart("10.0.0.1 --head")
    with pytest.raises(ValueError, match="not a TCP port"):
        RayStart("10.0.0.1", gcs_port=70000)
    with pytest.raises(ValueError, match="num_gpus"):
        RayStart("10.0.0.1", num_gpus=-1)
    with pytest.raises(ValueError, match="runtime"):
        c.container_inspect("lxc", "llm-a")
    with pytest.raises(ValueError, match="NUL"):
        c.q("a\x00b")


# ---- the spec hash ---------------------------------------------------------------------------

def test_spec_hash_changes_iff_what_the_container_runs_with_changes():
    base = container(gpus=2, mounts=CACHE, env=HF)
    assert len(base.spec_hash) == 12 and base.spec_hash == c.container_spec_hash(base)
    # Same spec, however it is spelled: equal hash (keep the running container).
    same = [
        container(gpus=2, mounts=CACHE, env=dict(HF)),
        container(gpus=2, mounts=CACHE + CACHE, env=HF),
    ]
    two = (Mount("/a", "/models/a"), Mount("/b", "/models/b"))
    assert container(mounts=two, env={"A": "1", "B": "2"}).spec_hash == \
        container(mounts=two[::-1], env={"B": "2", "A": "1"}).spec_hash
    assert {s.spec_hash for s in same} == {base.spec_hash}
    # Anything the container runs with differs: a different hash (replace it).
    changed = {
        "image": container(gpus=2, mounts=CACHE, env=HF, image="rayproject/ray:2.61.0"),
        "mounts": container(gpus=2, mounts=(Mount("/data/models", "/models/other"),), env=HF),
        "no mounts": container(gpus=2, env=HF),
        "env value": container(gpus=2, mounts=CACHE, env={"HF_HOME": "/models/other"}),
        "env added": container(gpus=2, mounts=CACHE, env={**HF, "X": "1"}),
        "no gpus": container(gpus=0, mounts=CACHE, env=HF),
        "gpu count": container(gpus=4, mounts=CACHE, env=HF),
        "runtime (gpu flags)": container("podman", gpus=2, mounts=CACHE, env=HF),
        "shm size": container(gpus=2, mounts=CACHE, env=HF, shm="32g"),
        "ray start args": container(head=False, gpus=2, mounts=CACHE, env=HF),
    }
    hashes = {what: s.spec_hash for what, s in changed.items()}
    assert base.spec_hash not in hashes.values()
    assert len(set(hashes.values())) == len(hashes), hashes


def test_the_run_command_carries_its_own_hash():
    spec = container(gpus=2, mounts=CACHE, env=HF)
    argv = shlex.split(c.container_run(spec))
    assert f"airfleet.io/spec-hash={spec.spec_hash}" in argv


# ---- the snippets run by a real sh against fake programs ---------------------------------------

FAKE_RUNTIME = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_LOG"
case "$1 $2" in
  "container ls")
    [ -n "$FAKE_DOWN" ] && { echo "Cannot connect to the Docker daemon" >&2; exit 1; }
    printf '%s\\n' $FAKE_NAMES; exit 0;;
  "container inspect") echo "status=running cluster=llm-a spec_hash=abc"; exit 0;;
esac
exit 0
"""


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("docker", "podman"):
        (bin_dir / name).write_text(FAKE_RUNTIME)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def sh(cmd: str, bin_dir: Path, **env: str) -> tuple[int, str, list[str]]:
    log = bin_dir.parent / "calls.log"
    log.write_text("")
    done = subprocess.run(
        ["sh", "-c", cmd], capture_output=True, text=True,
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
             "FAKE_NAMES": "", **env})
    return done.returncode, done.stdout + done.stderr, log.read_text().splitlines()


@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_inspect_tells_absent_from_a_failing_runtime(fake_bin, runtime):
    cmd = c.container_inspect(runtime, "llm-a")
    code, out, calls = sh(cmd, fake_bin, FAKE_NAMES="other airfleet-ray-llm-a-2")
    assert code == c.EXIT_ABSENT and calls == [f"{runtime} container ls -a --format {{{{.Names}}}}"]
    code, out, calls = sh(cmd, fake_bin, FAKE_DOWN="1")
    assert code == 1 and "Cannot connect" in out
    code, out, calls = sh(cmd, fake_bin, FAKE_NAMES="other airfleet-ray-llm-a")
    assert code == 0 and c.parse_container_inspect(out).spec_hash == "abc"
    assert calls[1].startswith(f"{runtime} container inspect --format status=")


@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_remove_and_stop_treat_already_gone_as_success_but_not_a_failing_runtime(fake_bin,
                                                                                 runtime):
    for cmd, acts in ((c.container_remove(runtime, "llm-a"),
                       [f"{runtime} rm -f airfleet-ray-llm-a"]),
                      (c.ray_stop(runtime, "llm-a"),
                       [f"{runtime} stop -t 30 airfleet-ray-llm-a",
                        f"{runtime} rm -f airfleet-ray-llm-a"])):
        code, _, calls = sh(cmd, fake_bin)
        assert (code, calls[1:]) == (0, [])  # absent: nothing to do
        code, _, calls = sh(cmd, fake_bin, FAKE_DOWN="1")
        assert code == 1 and calls[1:] == []
        code, _, calls = sh(cmd, fake_bin, FAKE_NAMES="airfleet-ray-llm-a")
        assert (code, calls[1:]) == (0, acts)


FAKE_PS = """#!/bin/sh
cat <<'EOF'
    1 sshd: /usr/sbin/sshd -D -e
  101 /opt/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/s
  102 /opt/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray/l
  103 /opt/venv/bin/python /opt/venv/lib/python3.11/site-packages/ray/dashboard/dashboard.py --host=0.0.0.0
  104 ray::IDLE
  105 ray::ServeReplica:app:Model
  106 ray-dashboard-JobHead-0 (/opt/venv/bin/python -c "from multiprocessing.forkserver import main")
  107 /opt/venv/bin/python -c from multiprocessing.forkserver import main; main(25, 27, ['ray', 'ray.dashboard.subprocesses.module'])
  108 /opt/venv/bin/python -u /opt/venv/lib/python3.11/site-packages/ray/_private/log_monitor.py --session-dir=/tmp/ray/s
  109 /opt/venv/bin/python /opt/venv/bin/ray start --head --block
  200 /usr/bin/python3 /srv/array/dashboard.py
  201 vim raylet.txt
  202 sleep 60
EOF
echo "  300 sh -c $SELF"
echo "  301 awk $SELF"
"""


@pytest.mark.parametrize("awk", ["mawk", "gawk"])
def test_leftovers_of_host_processes_lists_ray_and_nothing_else(tmp_path, awk):
    if not shutil.which(awk):
        pytest.skip(f"{awk} is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ps").write_text(FAKE_PS)
    (bin_dir / "awk").symlink_to(shutil.which(awk))
    for path in bin_dir.iterdir():
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    cmd = c.leftovers("none", "llm-a")
    done = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "SELF": cmd})
    assert done.returncode == 0, done.stderr
    pids = [line.split()[1] for line in done.stdout.splitlines()]
    assert pids == [str(p) for p in range(101, 110)], done.stdout
    assert done.stdout.splitlines()[0] == (
        "process 101 /opt/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet "
        "--raylet_socket_name=/tmp/ray/s")
    (bin_dir / "ps").write_text("#!/bin/sh\necho 'ps: fatal' >&2\nexit 1\n")
    failed = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert failed.returncode == 1  # a broken ps is not "no leftovers"


def test_write_registry_ca_installs_atomically_and_keeps_the_old_one_on_bad_input(
        tmp_path, monkeypatch):
    monkeypatch.setitem(c.CERTS_DIRS, "docker", str(tmp_path / "certs.d"))
    cmd = c.write_registry_ca("docker", "registry.example:5000")
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    done = subprocess.run(["sh", "-c", cmd], input=pem, capture_output=True, text=True)
    target = tmp_path / "certs.d" / "registry.example:5000" / "ca.crt"
    assert done.returncode == 0, done.stderr
    assert target.read_text() == pem and stat.S_IMODE(target.stat().st_mode) == 0o644
    bad = subprocess.run(["sh", "-c", cmd], input="not a certificate", capture_output=True,
                         text=True)
    assert bad.returncode == 1 and target.read_text() == pem
    assert sorted(p.name for p in target.parent.iterdir()) == ["ca.crt"]  # no temp file left
