"""A stand-in for an Open Policy Agent server: its REST Policy and Data APIs over real HTTP,
evaluating real Rego (v1, OPA 1.x's default) with Microsoft's rego-cpp interpreter
(``regopy``). No OPA binary can be installed here: it ships as a Go program or a container
image, and this machine has neither a Go toolchain nor a Docker engine.

What it serves, as OPA's REST API reference documents it
(https://www.openpolicyagent.org/docs/rest-api):

- ``PUT /v1/policies/<id>``, the Rego module as the body: ``200 {}``; a module that does not
  parse: ``400 {"code": "invalid_parameter", "message": ...}`` and nothing loaded.
- ``POST /v1/data/<path>`` with ``{"input": ...}``: ``200 {"result": <value>}``, where the path
  names a rule or a package (a package's value is the object of its rules); a document that
  is undefined (no such package or rule, or a rule whose body fails and has no default):
  ``200 {}``, no ``result`` key. A body without ``input`` is evaluated with input undefined
  and the answer carries OPA's ``warning`` (``api_usage_warning``). A body that is not JSON:
  ``400 invalid_parameter``.
- ``GET /health``: ``200 {}``.

Not served (a real OPA has them): bundles, decision logs, ``GET`` with ``?input=``, metrics
and explanations. More lenient than OPA 1.x in one way: rego-cpp also accepts a rule body
without ``if`` (Rego v0), which OPA 1.x refuses; the modules tests load are written in v1.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class OpaServer:
    """``with OpaServer() as opa: opa.url`` -> ``http://127.0.0.1:<port>``."""

    def __init__(self) -> None:
        self.modules: dict[str, str] = {}  # policy id -> Rego source
        self.requests: list[tuple[str, str, str]] = []  # (method, path, body) as received
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> OpaServer:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _interpreter(self, modules: dict[str, str]):
        from regopy import Interpreter

        rego = Interpreter()
        for policy_id, source in modules.items():
            rego.add_module(policy_id, source)
        return rego

    def put_policy(self, policy_id: str, rego: str) -> tuple[int, dict[str, Any]]:
        from regopy import RegoError

        with self._lock:
            modules = {**self.modules, policy_id: rego}
            try:  # the interpreter parses (and checks) its modules on the first query
                self._interpreter(modules).query("x := data")
            except RegoError as exc:
                return 400, _error("invalid_parameter", f"error(s) occurred while compiling "
                                   f"module(s): {exc}")
            self.modules = modules
        return 200, {}

    def data(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        from regopy import RegoError

        try:
            doc = json.loads(body) if body.strip() else {}
        except ValueError as exc:
            return 400, _error("invalid_parameter", f"body contains malformed input "
                               f"document: {exc}")
        answer: dict[str, Any] = {}
        if not isinstance(doc, dict) or "input" not in doc:
            answer["warning"] = {"code": "api_usage_warning",
                                 "message": "'input' key missing from the request"}
        rego = self._interpreter(self.modules)
        if isinstance(doc, dict) and "input" in doc:
            rego.set_input_term(json.dumps(doc["input"]))
        query = ".".join(["data", *filter(None, path.split("/"))])
        try:
            output = str(rego.query(f"x := {query}"))
        except RegoError as exc:  # OPA: 500 internal_error on an evaluation error
            return 500, _error("internal_error", str(exc))
        if output != "undefined":
            answer["result"] = json.loads(output)["bindings"]["x"]
        return 200, answer


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


def _handler(opa: OpaServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _answer(self, status: int, answer: dict[str, Any]) -> None:
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self):  # noqa: N802 - http.server's name
            body = self._body()
            opa.requests.append(("PUT", self.path, body.decode(errors="replace")))
            if not self.path.startswith("/v1/policies/"):
                return self._answer(404, _error("resource_not_found", self.path))
            self._answer(*opa.put_policy(self.path[len("/v1/policies/"):],
                                         body.decode(errors="replace")))

        def do_POST(self):  # noqa: N802
            body = self._body()
            opa.requests.append(("POST", self.path, body.decode(errors="replace")))
            if not self.path.startswith("/v1/data"):
                return self._answer(404, _error("resource_not_found", self.path))
            self._answer(*opa.data(self.path[len("/v1/data"):].split("?")[0], body))

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                return self._answer(200, {})
            self._answer(404, _error("resource_not_found", self.path))

        def log_message(self, *args: object) -> None:
            pass

    return Handler
