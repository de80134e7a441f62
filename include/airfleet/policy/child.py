"""One policy in its own interpreter: ``python -I child.py POLICY_FILE MEMORY_MB``.

Stdin is JSON ``{"source": ..., "request": ...}``: the policy's source comes from the parent, so
the policy file need not be readable here (inside the sandbox its folder may be hidden);
POLICY_FILE only names it in tracebacks. The answer goes as JSON to stdout,
``{"decision": ...}`` or ``{"error": "..."}``; whatever the policy prints goes to stderr.
Standard library only: this file runs by path, outside the airfleet package, in an interpreter
that holds no secrets.
"""

import json
import os
import resource
import sys
import traceback
import types


def _evaluate(path: str, source: str, request: dict) -> dict:
    module = types.ModuleType("airfleet_policy")
    module.__file__ = path
    sys.modules[module.__name__] = module  # as an import would (dataclasses look it up)
    exec(compile(source, path, "exec"), module.__dict__)
    result = module.evaluate(request)
    if not isinstance(result, dict):  # a decision object: its attributes
        result = {k: getattr(result, k) for k in ("allowed", "reason", "input")
                  if hasattr(result, k)}
    try:
        json.dumps(result)
    except (TypeError, ValueError) as exc:
        return {"error": f"answered a decision that is not JSON: {exc}"}
    return {"decision": result}


def main() -> None:
    path, memory_mb = sys.argv[1], int(sys.argv[2])
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the policy's prints go to stderr, never into the answer
    try:
        given = json.load(sys.stdin)
        result = _evaluate(path, given["source"], given["request"])
    except MemoryError:
        result = {"error": f"ran out of memory (limit {memory_mb} MB)"}
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: all are a deny
        traceback.print_exc()
        result = {"error": f"raised {type(exc).__name__}: {exc}"[:500]}
    answer.write(json.dumps(result))
    answer.close()


if __name__ == "__main__":
    main()
