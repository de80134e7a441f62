"""How a bound policy runs: ``subprocess`` (the default), ``local``, ``http`` or ``gx``.

- ``subprocess``: a separate interpreter (``python -I``, a minimal environment, an address-space
  limit), the policy's source and the request as JSON on stdin and the decision as JSON on
  stdout; killed with its process group at the timeout. Isolated only inside the bwrap sandbox
  of :mod:`airfleet.policy.sandbox`, where one can be made; elsewhere it says it is not.
- ``local``: imported and called in-process, for trusted code; a call still running at the
  timeout is abandoned (its thread cannot be killed) and the action denied.
- ``http``: the request POSTed as JSON to the binding's URL; the decision is the JSON answer.
  A URL of OPA's Data API (``http://opa:8181/v1/data/airfleet/delete_cluster``) gets the
  request as OPA's input and OPA's ``result`` read as the decision (a boolean or an object).
- ``gx``: a Great Expectations suite (stability only) validated against the health check's
  node table (:mod:`airfleet.policy.gx`).

Each raises :class:`~airfleet.policy.PolicyFailed` with the reason when no decision came back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from airfleet.policy import Binding, PolicyFailed, _short, policy_path, sandbox, source_version

CHILD = Path(__file__).with_name("child.py")
# The child's whole environment: nothing of the task's (connections, keys, tokens) reaches it.
CHILD_ENV = sandbox.ENV
# OPA's Data API: POST /v1/data/<package path>/<rule> {"input": ...} -> {"result": ...}
OPA_DATA_API = "/v1/data/"


def run(binding: Binding, request: dict[str, Any], directory: Path | None = None) -> Any:
    if binding.mode == "http":
        return _http(binding, request)
    if binding.mode == "gx":
        from airfleet.policy import gx

        return gx.evaluate(binding.params["suite"], request)
    path = policy_path(binding.policy, directory)
    if binding.mode == "local":
        return _local(path, binding.timeout_seconds, request)
    return _subprocess(path, binding, request)


def isolation(binding: Binding) -> str:
    """What a decision reports about how far the policy was kept from the worker's secrets."""
    if binding.mode == "subprocess":
        return sandbox.current().status
    if binding.mode == "local":
        return "not isolated: runs inside the worker (local mode)"
    if binding.mode == "gx":
        return "no code: a GX expectation suite, validated inside the worker"
    return "the policy server's own (http mode)"


def _subprocess(path: Path, binding: Binding, request: dict[str, Any]) -> Any:
    box = sandbox.current()
    payload = json.dumps({"source": path.read_text(), "request": request}).encode()
    command = [*box.argv, sys.executable, "-I", str(CHILD), str(path), str(binding.memory_mb)]
    # cwd: the sandbox starts the child in its own empty /tmp; unsandboxed, in /.
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=CHILD_ENV, cwd="/",
                            start_new_session=True)
    try:
        out, err = proc.communicate(payload, timeout=binding.timeout_seconds)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise PolicyFailed(f"did not answer within {binding.timeout_seconds:g} s "
                           "(stopped)") from None
    if proc.returncode != 0:
        last = (err.decode(errors="replace").strip().splitlines() or [""])[-1]
        raise PolicyFailed(f"exited with status {proc.returncode}: {_short(last)}")
    try:
        answer = json.loads(out)
    except ValueError:
        raise PolicyFailed(f"answered something that is not JSON: {_short(out)}") from None
    if not isinstance(answer, dict) or not ("decision" in answer or "error" in answer):
        raise PolicyFailed(f"answered something that is not a decision: {_short(answer)}")
    if "error" in answer:
        raise PolicyFailed(str(answer["error"]))
    return answer["decision"]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    # Not communicate(): a process that left the group may still hold the pipes open.
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        pipe.close()


_MODULES: dict[tuple[str, str], Any] = {}


def _local(path: Path, timeout: float, request: dict[str, Any]) -> Any:
    source = path.read_text()
    key = (str(path), source_version(source))
    if key not in _MODULES:  # a changed file is a new version: load it afresh
        spec = importlib.util.spec_from_file_location(f"airfleet_policy_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise PolicyFailed(f"failed to load: {type(exc).__name__}: {exc}") from None
        _MODULES[key] = module
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["result"] = _MODULES[key].evaluate(json.loads(json.dumps(request)))
        except BaseException as exc:  # noqa: BLE001 - every failure is a deny
            outcome["error"] = f"raised {type(exc).__name__}: {exc}"

    worker = threading.Thread(target=call, name=f"policy-{path.stem}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise PolicyFailed(f"did not answer within {timeout:g} s (abandoned: local mode "
                           "cannot stop it; bind untrusted code in subprocess mode)")
    if "error" in outcome:
        raise PolicyFailed(_short(outcome["error"], 500))
    return outcome["result"]


def _http(binding: Binding, request: dict[str, Any]) -> Any:
    import requests

    where = f"server {binding.url}"
    opa = opa_document(binding.url)
    try:
        # OPA's Data API reads the input document from the body's "input" key.
        response = requests.post(binding.url, json={"input": request} if opa else request,
                                 timeout=binding.timeout_seconds)
    except requests.Timeout:
        raise PolicyFailed(f"{where} did not answer within {binding.timeout_seconds:g} s") \
            from None
    except requests.RequestException as exc:
        raise PolicyFailed(f"{where} is unreachable ({type(exc).__name__})") from None
    if response.status_code != 200:
        raise PolicyFailed(f"{where} answered HTTP {response.status_code}: "
                           f"{_short(response.text)}")
    try:
        answer = response.json()
    except ValueError:
        raise PolicyFailed(f"{where} answered something that is not JSON: "
                           f"{_short(response.text)}") from None
    return _opa_decision(opa, answer) if opa else answer


def opa_document(url: str | None) -> str | None:
    """The document an OPA Data API URL names (``.../v1/data/airfleet/delete`` ->
    ``data.airfleet.delete``), or None for any other policy server."""
    path = urlsplit(url or "").path
    if not path.startswith(OPA_DATA_API):
        return None
    return ".".join(["data", *filter(None, path[len(OPA_DATA_API):].split("/"))])


def _opa_decision(document: str, answer: Any) -> Any:
    """OPA answers ``{"result": <the document's value>}``: a boolean (allow or deny) or an
    object in the decision's own form; no ``result`` at all when the document is undefined."""
    if not isinstance(answer, dict) or "result" not in answer:
        raise PolicyFailed(f"is undefined in OPA: {document} has no value; check the Rego "
                           "package and rule the URL names, or give the rule a default")
    result = answer["result"]
    if isinstance(result, bool):
        return {"allowed": result, "reason": f"{document} is {str(result).lower()}"}
    return result
