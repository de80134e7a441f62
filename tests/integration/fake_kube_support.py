"""Fixtures the fake Kubernetes API server's own tests share (each test module brings its own
module-scoped ``server``, with the delays it needs): a fresh cluster per test, the real
``kubernetes`` client and typed APIs, a namespace ``x``, and real kubectl."""

from __future__ import annotations

import os
import subprocess

import kubernetes
import pytest
from kubernetes.client import AppsV1Api, CoreV1Api

KUBECTL = "/usr/bin/kubectl"


@pytest.fixture(autouse=True)
def fresh(server):
    server.reset()


@pytest.fixture
def client(server):
    api = kubernetes.config.new_client_from_config_dict(server.kubeconfig())
    yield api
    api.close()


@pytest.fixture
def core(client) -> CoreV1Api:
    return CoreV1Api(client)


@pytest.fixture
def apps(client) -> AppsV1Api:
    return AppsV1Api(client)


@pytest.fixture
def ns(core) -> str:
    core.create_namespace({"metadata": {"name": "x"}})
    return "x"


@pytest.fixture
def kubectl(server, tmp_path):
    """``kubectl(*args, token=None, stdin=None, check=True, namespace=None)`` against the fake
    with an https kubeconfig (client-go sends no token over plain http), as the admin or as
    ``token``'s identity."""
    def run(*args: str, token: str | None = None, stdin: str | None = None,
            check: bool = True, namespace: str | None = None) -> subprocess.CompletedProcess:
        config = server.write_kubeconfig(tmp_path / f"kubeconfig-{hash((token, namespace))}",
                                         token=token, namespace=namespace)
        env = {**os.environ, "HOME": str(tmp_path), "KUBECONFIG": str(config)}
        done = subprocess.run([KUBECTL, "--cache-dir", str(tmp_path / "cache"), *args], env=env,
                              input=stdin, capture_output=True, text=True, timeout=60)
        if check:
            assert done.returncode == 0, done.stderr
        return done

    return run
