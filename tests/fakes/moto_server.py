"""moto's AWS server (``moto_server``) as a subprocess on a free loopback port.

Real boto3 clients and Airflow AWS connections (extra ``endpoint_url``) talk to it. moto makes
EKS clusters and node groups ACTIVE at once and deletes them at once (FACTS.md).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        moto = Path(sys.executable).parent / "moto_server"
        self._proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.url}/moto-api/", timeout=1)
                return self
            except requests.RequestException:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"moto_server exited with {self._proc.returncode}") from None
                time.sleep(0.1)
        raise RuntimeError("moto_server did not answer within 30 s")

    def stop(self) -> None:
        if self._proc:
            self._proc.terminate()
            self._proc.wait(timeout=10)

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def reset(self) -> None:
        requests.post(f"{self.url}/moto-api/reset", timeout=5).raise_for_status()

    def client(self, service: str, region: str = "us-east-1"):
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name=region, **CREDENTIALS)
