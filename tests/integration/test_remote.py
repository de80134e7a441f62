"""Remote (airfleet.backends.ssh.remote) against real OpenSSH servers: the NodeFarm's nodes
(tests/fakes/nodes.py), each an sshd in its own network/PID namespaces with its own host key.

One 2-node farm for the module. Processes "on the node" are read from the host through the
node's PID namespace (``Node.processes()``), i.e. what ``ps -eo args`` shows on the node.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from airfleet.backends.ssh import commands, remote
from airfleet.backends.ssh.remote import (
    AuthenticationFailed,
    CommandResult,
    HostKeyRejected,
    InvalidNodeAccess,
    NodeAccess,
    NodeUnreachable,
    Remote,
    RemoteCommandError,
    RemoteTimeout,
    run_sync,
)
from airfleet.backends.ssh.tunnel import SSHDashboardTunnel, through_ssh
from tests.fakes.nodes import NodeFarm
from tests.fakes.static_fleet import node_http_get, tcp_connect

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CANARY = "canary-7f3a9c-s3cr3t"


@pytest.fixture(scope="module")
def farm():
    with NodeFarm(2) as farm:
        yield farm


def access(farm: NodeFarm, **overrides) -> NodeAccess:
    fields = {"user": "root", "private_key": farm.private_key_text,
              "known_hosts": farm.known_hosts_text(), **overrides}
    return NodeAccess(**fields)


def accepted(node) -> int:
    """SSH logins the node's sshd has accepted so far (sshd -e logs each one)."""
    return node.log_path.read_text().count("Accepted publickey for root")


def session(farm_access: NodeAccess, body):
    """Run ``await body(remote)`` in a fresh Remote, from sync code."""
    async def main():
        async with Remote(farm_access) as r:
            return await body(r)
    return run_sync(main())


# ---- running commands ------------------------------------------------------------------------

def test_run_returns_stdout_stderr_and_exit_status(farm):
    node = farm.nodes[0].address

    async def body(r: Remote):
        ok = await r.run(node, "echo out; echo err >&2; hostname")
        failed = await r.run(node, "echo half; exit 5", check=False)
        posix = await r.run(node, "x=1; [ \"$x\" = 1 ] && printf '%s' \"$0\"")
        return ok, failed, posix

    ok, failed, posix = session(access(farm), body)
    assert ok == CommandResult(node, 0, f"out\n{farm.nodes[0].hostname}\n", "err\n")
    assert ok.ok and not failed.ok
    assert (failed.exit_status, failed.stdout) == (5, "half\n")
    assert posix.stdout == "sh"  # commands run under POSIX sh, whatever the login shell


def test_stdin_reaches_the_command_and_without_stdin_it_reads_eof(farm):
    node = farm.nodes[0].address
    data = b"line 1\n\x00\xffbinary\n" * 1000

    async def body(r: Remote):
        echoed = await r.run(node, "cat", stdin=data, timeout=10)
        empty = await r.run(node, "cat; echo eof", timeout=5)  # would hang without EOF
        text = await r.run(node, "wc -c", stdin="héllo")
        return echoed, empty, text

    echoed, empty, text = session(access(farm), body)
    assert len(echoed.stdout.splitlines()) == 2000  # bytes in, text out ("replace" decoding)
    assert echoed.stdout.count("\x00\ufffdbinary\n") == 1000
    assert empty.stdout == "eof\n"
    assert text.stdout.strip() == "6"


def test_a_failing_command_raises_with_node_exit_code_stderr_tail_and_redaction(farm, caplog):
    node = farm.nodes[0].address
    secret = "tok-4711'quoted"
    command = (f"echo {commands.q(secret)} >/dev/null; i=0; while [ $i -lt 30 ]; do "
               f"i=$((i+1)); echo \"line $i\" >&2; done; echo {commands.q(secret)} >&2; exit 3")
    caplog.set_level(logging.DEBUG, logger="airfleet")

    with pytest.raises(RemoteCommandError) as caught:
        session(access(farm), lambda r: r.run(node, command, redact=[secret]))

    err = caught.value
    assert type(err) is RemoteCommandError and not err.transient
    assert (err.node, err.exit_code) == (node, 3)
    assert str(err).startswith(f"node {node}: `echo *** >/dev/null; i=0;")
    assert "` exited with 3: line 12\nline 13\n" in str(err)
    assert err.stderr_tail.splitlines() == [f"line {i}" for i in range(12, 31)] + ["***"]
    for text in (str(err), err.command, err.stderr_tail, caplog.text):
        assert secret not in text and "tok-4711" not in text
    assert f"node {node}: run `echo *** >/dev/null" in caplog.text


def test_the_error_tail_is_bounded(farm):
    node = farm.nodes[0].address
    command = "head -c 5000 /dev/zero | tr '\\0' x >&2; exit 1"
    with pytest.raises(RemoteCommandError) as caught:
        session(access(farm), lambda r: r.run(node, command))
    assert len(caught.value.stderr_tail) == remote.STDERR_TAIL_CHARS
    assert caught.value.stderr_tail.startswith("...xxx")


# ---- host keys and authentication ---------------------------------------------------------

def test_a_wrong_pinned_host_key_is_refused_naming_the_node(farm):
    node0, node1 = farm.nodes
    wrong_known_hosts = f"{node0.address} {node1.host_key}\n"
    cases = {"known_hosts with another node's key": access(farm, known_hosts=wrong_known_hosts),
             "host_key of another node": access(farm, known_hosts=None, host_key=node1.host_key),
             "known_hosts without this node": access(farm, known_hosts=f"{node1.address} "
                                                                      f"{node1.host_key}\n")}
    before = accepted(node0)
    for case, wrong in cases.items():
        with pytest.raises(HostKeyRejected) as caught:
            session(wrong, lambda r: r.run(node0.address, "touch /tmp/should-not-exist"))
        message = str(caught.value)
        assert message.startswith(f"node {node0.address}: host key verification failed"), case
        assert "update the pinned known_hosts / host_key" in message, case
    assert accepted(node0) == before  # never logged in
    assert node0.run("test -e /tmp/should-not-exist", check=False).returncode == 1


def test_one_pinned_host_key_is_trusted_for_every_node_and_bare_base64_works(farm):
    node0 = farm.nodes[0]
    for pin in (node0.host_key, node0.host_key.split()[1]):
        pinned = access(farm, known_hosts=None, host_key=pin)
        result = session(pinned, lambda r: r.run(node0.address, "hostname"))
        assert result.stdout.strip() == node0.hostname


def test_no_pinning_is_refused_at_construction(farm):
    with pytest.raises(InvalidNodeAccess, match="no host key pinning: give known_hosts") as caught:
        NodeAccess(user="root", private_key=farm.private_key_text)
    assert "host key checking is never disabled" in str(caught.value)
    with pytest.raises(InvalidNodeAccess, match="not both"):
        access(farm, host_key=farm.nodes[0].host_key)
    with pytest.raises(InvalidNodeAccess, match="no entries"):
        access(farm, known_hosts="# nothing\n\n")


def test_the_private_key_is_never_shown(farm):
    acc = access(farm)
    assert "PRIVATE KEY" not in repr(acc) and "private_key" not in repr(acc)
    broken = farm.private_key_text.replace("A", "B", 40)
    with pytest.raises(InvalidNodeAccess) as caught:
        access(farm, private_key=broken)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert broken[40:80] not in str(caught.value)


def test_a_key_the_node_does_not_accept_fails_authentication(farm, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    stranger = access(farm, private_key=(tmp_path / "k").read_text())
    node = farm.nodes[0].address
    with pytest.raises(AuthenticationFailed, match=rf"node {node}: SSH authentication as 'root'"):
        session(stranger, lambda r: r.run(node, "true"))


# ---- unreachable, timeouts, dead nodes -------------------------------------------------------

def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_an_unreachable_node_raises_node_unreachable_within_the_connect_timeout(farm):
    node = farm.nodes[0].address
    closed_port = access(farm, port=_free_port(farm.host_address), connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(NodeUnreachable) as caught:
        session(closed_port, lambda r: r.run(node, "true"))
    assert time.monotonic() - started < 1
    assert caught.value.transient
    assert str(caught.value).startswith(f"node {node}: unreachable over SSH on port "
                                        f"{closed_port.port} (Connection refused): check that")

    # A listener that never speaks SSH (a hung sshd, a middlebox): the connect timeout ends it.
    with socket.socket() as silent:
        silent.bind((farm.host_address, 0))
        silent.listen(8)
        mute = access(farm, port=silent.getsockname()[1], connect_timeout=1.5)
        started = time.monotonic()
        with pytest.raises(NodeUnreachable, match=r"no SSH session within 1.5 s"):
            session(mute, lambda r: r.run(farm.host_address, "true"))
        assert 1.4 < time.monotonic() - started < 3


def test_a_command_past_its_timeout_raises_and_is_killed_on_the_node(farm):
    node = farm.nodes[0]
    started = time.monotonic()
    with pytest.raises(RemoteTimeout) as caught:
        session(access(farm), lambda r: r.run(node.address, "echo begun >&2; sleep 31.7; echo x",
                                              timeout=1))
    assert 1 <= time.monotonic() - started < 2.5
    err = caught.value
    assert err.transient and err.exit_code is None
    assert str(err).startswith(f"node {node.address}: `echo begun >&2; sleep 31.7; echo x` did "
                               "not finish within 1 s and was interrupted")
    # The node ends the command's whole process group REMOTE_KILL_GRACE s later.
    deadline = time.monotonic() + remote.REMOTE_KILL_GRACE + 3
    while any("sleep 31.7" in p for p in node.processes()):
        assert time.monotonic() < deadline, node.processes()
        time.sleep(0.1)


def test_run_all_returns_the_fast_node_without_waiting_for_the_slow_one(farm):
    slow, fast = (n.address for n in farm.nodes)
    arrived: dict[str, float] = {}
    started = time.monotonic()

    def command_for(node: str) -> str:
        return "sleep 30.3" if node == slow else "echo fast"

    async def body(r: Remote):
        return await r.run_all([slow, fast], command_for, timeout=2,
                               on_result=lambda node, _: arrived.setdefault(
                                   node, time.monotonic() - started))

    results = session(access(farm), body)
    elapsed = time.monotonic() - started
    assert list(results) == [slow, fast]
    assert isinstance(results[slow], RemoteTimeout) and results[slow].node == slow
    assert results[fast] == CommandResult(fast, 0, "fast\n", "")
    assert arrived[fast] < 1.5, arrived  # well before the slow node's 2 s timeout
    assert 2 <= arrived[slow] < 3 and elapsed < 3.5, (arrived, elapsed)


def test_run_all_bounds_concurrency_and_collects_each_nodes_outcome(farm):
    node0, node1 = (n.address for n in farm.nodes)
    down = farm.host_address  # nothing listens on port 22 of the host side of the bridge

    async def body(r: Remote):
        return await r.run_all([node0, node1, down], lambda n: f"echo {n}; exit {n[-1]}",
                               limit=1)

    results = session(access(farm), body)
    assert isinstance(results[node0], RemoteCommandError) and results[node0].exit_code == 2
    assert isinstance(results[node1], RemoteCommandError) and results[node1].exit_code == 3
    assert isinstance(results[down], NodeUnreachable)


def test_a_node_that_vanishes_mid_command_is_noticed_by_keepalives(farm, monkeypatch):
    node = farm.nodes[1]
    # 1 s x 2 here; production: 15 s x 3 (SSH_OPTIONS), i.e. within about 45 s.
    monkeypatch.setitem(remote.SSH_OPTIONS, "keepalive_interval", 1)
    monkeypatch.setitem(remote.SSH_OPTIONS, "keepalive_count_max", 2)
    link = f"{farm.bridge}v1"

    async def body(r: Remote):
        await r.run(node.address, "true")
        task = asyncio.create_task(r.run(node.address, "sleep 60", timeout=50))
        await asyncio.sleep(0.5)
        subprocess.run(["ip", "link", "set", link, "down"], check=True)  # cable pulled
        started = time.monotonic()
        try:
            with pytest.raises(NodeUnreachable, match="connection lost"):
                await task
        finally:
            subprocess.run(["ip", "link", "set", link, "up"], check=True)
        noticed = time.monotonic() - started
        again = await r.run(node.address, "echo back", timeout=10)  # reconnects
        return noticed, again

    noticed, again = session(access(farm), body)
    assert noticed < 5
    assert again.stdout == "back\n"


# ---- connection reuse ----------------------------------------------------------------------

def test_one_connection_per_node_is_reused_within_a_remote(farm):
    node0, node1 = farm.nodes
    before = (accepted(node0), accepted(node1))

    async def body(r: Remote):
        for _ in range(3):
            await r.run(node0.address, "true")
        await asyncio.gather(*(r.run(node1.address, f"echo {i}") for i in range(12)))
        await r.run_all([node0.address, node1.address], lambda n: "true")

    session(access(farm), body)
    assert (accepted(node0), accepted(node1)) == (before[0] + 1, before[1] + 1)
    session(access(farm), body)  # a new Remote (a new task): a new connection
    assert (accepted(node0), accepted(node1)) == (before[0] + 2, before[1] + 2)


# ---- secrets on stdin --------------------------------------------------------------------------

def test_a_secret_on_stdin_is_never_in_the_process_list_logs_or_error(farm, caplog):
    node = farm.nodes[0]
    caplog.set_level(logging.DEBUG, logger="airfleet")
    samples: list[list[str]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(node.processes())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with pytest.raises(RemoteCommandError) as caught:
            session(access(farm), lambda r: r.run(
                node.address, "read -r s; [ -n \"$s\" ] && sleep 1.25; echo failed >&2; exit 4",
                stdin=CANARY + "\n"))
    finally:
        done.set()
        sampler.join()
    seen = [p for snapshot in samples for p in snapshot]
    assert any("sleep 1.25" in p for p in seen), "sampled while the command ran"
    assert not [p for p in seen if CANARY in p]
    assert CANARY not in str(caught.value) and CANARY not in caplog.text
    assert caught.value.exit_code == 4


def test_registry_login_takes_the_password_on_stdin(farm):
    node = farm.nodes[0]
    script = node.bin_dir / "docker"  # a fake docker: records argv and stdin
    script.write_text('#!/bin/sh\necho "$@" > /tmp/docker-argv\ncat > /tmp/docker-stdin\n')
    script.chmod(0o755)
    login = commands.registry_login("docker", "https://registry.example:5000", "robot")
    session(access(farm), lambda r: r.run(node.address, login, stdin=CANARY))
    assert node.run("cat /tmp/docker-argv").stdout == (
        "login --username robot --password-stdin registry.example:5000\n")
    assert node.run("cat /tmp/docker-stdin").stdout == CANARY
    script.unlink()


def test_errors_survive_pickling_with_their_attributes():
    errors = [RemoteCommandError("n", "cmd", 3, "tail"), RemoteTimeout("n", "cmd", 5, "x"),
              NodeUnreachable("n", "cmd", 22, "refused"), HostKeyRejected("n", "cmd", "bad"),
              AuthenticationFailed("n", "cmd", "root", "denied")]
    for err in errors:
        again = pickle.loads(pickle.dumps(err))
        assert (type(again), str(again), again.__dict__) == (type(err), str(err), err.__dict__)


def test_run_sync_refuses_inside_a_running_loop():
    async def inner():
        coro = asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="await the coroutine instead"):
            run_sync(coro)
    asyncio.run(inner())


# ---- the builders against a real Ray (container_runtime: none) ---------------------------------

def _ray_nodes(head) -> list[dict]:
    """The head's dashboard answers on its loopback only: ask it there."""
    done = node_http_get(head, "http://127.0.0.1:8265/api/v0/nodes", check=False)
    try:
        return json.loads(done.stdout)["data"]["result"]["result"]
    except (ValueError, KeyError):
        return []


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.5)
    return value


def _alive(head, count: int) -> list[dict]:
    alive = [n for n in _ray_nodes(head) if n["state"] == "ALIVE"]
    return alive if len(alive) == count else []


def _sockets() -> int:
    """How many sockets this process holds (listening or connected, TCP or UNIX)."""
    fds = Path("/proc/self/fd")
    return sum(os.readlink(fds / fd).startswith("socket:") for fd in os.listdir(fds)
               if (fds / fd).exists())


async def _through_the_tunnel(r: Remote, head, worker) -> dict:
    """The head's dashboard, loopback-only, through SSH channels on ``r``'s connection to the
    head, which carries them: no socket of this machine's is opened for it (no local forward
    for any local user to reach); a tunnel whose connection drops opens it again."""
    await r.run(head.address, "true")  # the head's command connection, open
    before = _sockets()
    tunnel = SSHDashboardTunnel(r, head.address, 8265)
    try:
        seen = {"healthy": await tunnel.gcs_healthy(),
                "alive": {n.ip for n in await tunnel.list_nodes() if n.alive},
                "new_sockets": _sockets() - before}
        r._forget(head.address, r._connections[head.address])  # the connection drops ...
        await asyncio.sleep(0.2)  # ... and asyncssh notices (keepalives do, on a dead link)
        seen["reopened"] = await tunnel.gcs_healthy()
    finally:
        await tunnel.aclose()
    assert tcp_connect(worker, head.address, 8265) == "ECONNREFUSED"  # what the tunnel is for
    return seen


def test_a_tunnel_that_cannot_open_says_why(farm):
    """Host key, authentication, reachability: the typed errors of commands, from the tunnel."""
    node0, node1 = farm.nodes
    cases = {
        HostKeyRejected: access(farm, known_hosts=f"{node0.address} {node1.host_key}\n"),
        AuthenticationFailed: access(farm, private_key=_another_key()),
        NodeUnreachable: access(farm, port=2),  # nothing listens there
    }
    for error, farm_access in cases.items():
        async def body(r: Remote):
            tunnel = through_ssh(r, node0.address, 8265)
            try:
                return await tunnel.gcs_healthy()
            finally:
                await tunnel.aclose()

        with pytest.raises(error) as caught:
            session(farm_access, body)
        assert str(caught.value).startswith(f"node {node0.address}: "), str(caught.value)


def test_a_channel_slow_to_open_times_out_and_keeps_the_connection(farm):
    """A channel the head's sshd does not answer in time (here: its session processes
    stopped) is a timeout, not an unreachable node: the connection stays for the next one."""
    node = farm.nodes[0]

    async def body(r: Remote):
        await r.run(node.address, "true")
        conn = r._connections[node.address]
        node.run("pkill -STOP -f 'sshd: root'")
        try:
            with pytest.raises(TimeoutError):
                await r.loopback_channel(node.address, 8265, timeout=1)
        finally:
            node.run("pkill -CONT -f 'sshd: root'")
        return r._connections.get(node.address) is conn and not conn.is_closed()

    assert session(access(farm), body) is True


def test_a_silent_dashboard_says_why_as_the_heads_sshd_does(farm):
    """Nothing listens on the port (no Ray yet), or the node's sshd forwards nothing."""
    async def silent(r: Remote, node: str):
        tunnel = through_ssh(r, node, 8265)
        try:
            return await tunnel.gcs_healthy(timeout=2), await tunnel.why_silent()
        finally:
            await tunnel.aclose()

    node = farm.nodes[0].address
    assert session(access(farm), lambda r: silent(r, node)) == (
        False, "the head's sshd cannot connect to 127.0.0.1:8265: Connection refused")
    with NodeFarm(1, name_prefix="nofwd", sshd_extra="AllowTcpForwarding no") as closed:
        node = closed.nodes[0].address
        healthy, why = session(access(closed), lambda r: silent(r, node))
    assert not healthy and why == ("the head's sshd refuses to forward to 127.0.0.1:8265 "
                                   "(open failed): allow it there with AllowTcpForwarding yes "
                                   "(or local)")


def _another_key() -> str:
    import asyncssh

    return asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode()


def test_ray_head_worker_drain_stop_and_leftovers_on_host_processes(farm):
    head, worker = farm.nodes
    cache = "/tmp/my models"  # a space: quoting carries it as one value

    async def body(r: Remote):
        await r.run(head.address, commands.ensure_directory(cache))
        await r.run(head.address, commands.ray_start_head(
            head.address, num_gpus=2, env={"HF_HOME": cache}), timeout=90)
        await r.run(worker.address, commands.ray_start_worker(
            worker.address, head.address), timeout=90)
        alive = _wait(lambda: _alive(head, 2), 60, "head and worker ALIVE")
        gpus = {n["node_ip"]: n["resources_total"].get("GPU", 0) for n in alive}
        worker_id = next(n["node_id"] for n in alive if n["node_ip"] == worker.address)
        found = (await r.run(worker.address, commands.leftovers("none", "llm-a"))).stdout
        tunnelled = await _through_the_tunnel(r, head, worker)
        hf_home = head.run("tr '\\0' '\\n' </proc/$(pgrep -f raylet/raylet | head -n1)/environ"
                           " | grep ^HF_HOME=").stdout

        await r.run(head.address, commands.ray_drain_node(
            "none", "llm-a", head_ip=head.address, gcs_port=6379, node_id=worker_id,
            message="scale down: 'it's time'", deadline_seconds=60), timeout=60)
        _wait(lambda: any(n["node_id"] == worker_id and n["state"] == "DEAD"
                          for n in _ray_nodes(head)), 60, "worker DEAD after drain")
        for node in (worker, head):
            await r.run(node.address, commands.ray_stop("none", "llm-a"), timeout=90)
        # The dashboard's multiprocessing forkserver outlives `ray stop` by about half a second.
        after = {}
        for _ in range(20):
            after = {n.address: (await r.run(n.address, commands.leftovers("none", "llm-a"))).stdout
                     for n in (head, worker)}
            if not any(after.values()):
                break
            await asyncio.sleep(0.5)
        return gpus, found, hf_home, after, tunnelled

    gpus, found, hf_home, after, tunnelled = session(access(farm), body)
    assert tunnelled == {"healthy": True, "alive": {head.address, worker.address},
                         "new_sockets": 0, "reopened": True}
    assert gpus == {head.address: 2.0, worker.address: 0.0}
    assert hf_home == f"HF_HOME={cache}\n"
    lines = found.splitlines()
    assert lines and all(line.startswith("process ") for line in lines), found
    assert any(line.split()[2].endswith("/raylet/raylet") for line in lines), found
    assert after == {head.address: "", worker.address: ""}
    rest = [p for n in farm.nodes for p in n.processes() if "sshd" not in p]
    assert all("ray" not in p for p in rest), rest  # leftovers saw every Ray process
