"""maintenance_window: allow disruptive actions only inside maintenance windows.

Params:
- ``windows`` (default ``[{"days": ["sat", "sun"], "start": "00:00", "end": "23:59"}]``): a list
  of ``{"days": [...], "start": "HH:MM", "end": "HH:MM"}``. Days are three-letter names
  (``mon`` .. ``sun``; a window without ``days`` is every day). Start and end are both included
  (to the minute). A window whose end is before its start spans midnight and belongs to its
  start day: ``{"days": ["fri"], "start": "22:00", "end": "02:00"}`` is Friday 22:00 to
  Saturday 02:00.
- ``timezone`` (default ``"UTC"``): the zoneinfo name the windows are written in.
- ``actions`` (default: every action but ``create_cluster`` and ``onboard_cluster``, which add
  capacity without disturbing anything): the actions the windows restrict.

Judges the actions in ``actions``: allowed when ``request["now"]``, in ``timezone``, falls in
any window. Every other action is allowed. Malformed params (an unknown day, a bad HH:MM, an
unknown timezone or action) deny, naming the bad param.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ACTIONS = ("create_cluster", "delete_cluster", "update_cluster", "onboard_cluster", "add_node",
           "remove_node", "scale_nodegroup", "deploy_endpoint", "scale_endpoint",
           "delete_endpoint")
DEFAULT_WINDOWS = [{"days": ["sat", "sun"], "start": "00:00", "end": "23:59"}]
DEFAULT_TIMEZONE = "UTC"
DEFAULT_ACTIONS = [a for a in ACTIONS if a not in ("create_cluster", "onboard_cluster")]
HHMM = re.compile(r"^(\d{1,2}):(\d{2})$")


class ParamError(ValueError):
    pass


def evaluate(request: dict[str, Any]) -> dict[str, Any]:
    action = request.get("action")
    name = (request.get("cluster") or {}).get("name", "?")
    params = request.get("params") or {}
    try:
        windows = _windows(params.get("windows", DEFAULT_WINDOWS))
        tz_name, tz = _timezone(params.get("timezone", DEFAULT_TIMEZONE))
        actions = _actions(params.get("actions", DEFAULT_ACTIONS))
    except ParamError as exc:
        return _decide(False, str(exc))
    if action not in actions:
        return _decide(True, f"maintenance_window: {action} is not restricted to maintenance "
                             "windows (binding param actions)")
    try:
        now = datetime.fromisoformat(str(request.get("now")))
    except ValueError:
        return _decide(False, f"request now {request.get('now')!r} is not an ISO-8601 time")
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    local = now.astimezone(tz)
    when = f"{local:%a %Y-%m-%d %H:%M} ({tz_name})"
    for window in windows:
        if _inside(window, local):
            return _decide(True, f"{action} on cluster {name} at {when} is inside maintenance "
                                 f"window {_describe(window)}")
    listed = ", ".join(_describe(w) for w in windows) or "(none)"
    return _decide(False, f"{action} on cluster {name} at {when} is outside the maintenance "
                          f"windows [{listed}] (binding params windows, timezone)")


def _inside(window: dict, local: datetime) -> bool:
    minute = local.hour * 60 + local.minute
    day, previous = DAYS[local.weekday()], DAYS[(local.weekday() - 1) % 7]
    start, end, days = window["start"], window["end"], window["days"]
    if start <= end:
        return day in days and start <= minute <= end
    return (day in days and minute >= start) or (previous in days and minute <= end)


def _describe(window: dict) -> str:
    days = ",".join(d for d in DAYS if d in window["days"])
    return f"{days} {window['start_text']}-{window['end_text']}"


def _windows(value: Any) -> list[dict]:
    if not isinstance(value, list | tuple):
        raise ParamError(f"binding param windows must be a list of windows, got {value!r}")
    windows = []
    for i, window in enumerate(value):
        if not isinstance(window, dict):
            raise ParamError(f"binding param windows[{i}] must be a mapping with days, start "
                             f"and end, got {window!r}")
        days = window.get("days", list(DAYS))
        if isinstance(days, str) or not isinstance(days, list | tuple):
            raise ParamError(f"binding param windows[{i}].days must be a list of day names "
                             f"({', '.join(DAYS)}), got {days!r}")
        bad = [d for d in days if not isinstance(d, str) or d.lower() not in DAYS]
        if bad:
            raise ParamError(f"binding param windows[{i}].days has unknown day {bad[0]!r}; "
                             f"days are {', '.join(DAYS)}")
        start, start_text = _minute(window.get("start"), f"windows[{i}].start")
        end, end_text = _minute(window.get("end"), f"windows[{i}].end")
        windows.append({"days": {d.lower() for d in days}, "start": start, "end": end,
                        "start_text": start_text, "end_text": end_text})
    return windows


def _minute(value: Any, param: str) -> tuple[int, str]:
    match = HHMM.match(value) if isinstance(value, str) else None
    if not match or int(match[1]) > 23 or int(match[2]) > 59:
        raise ParamError(f"binding param {param} must be a time HH:MM (00:00 to 23:59), "
                         f"got {value!r}")
    hour, minute = int(match[1]), int(match[2])
    return hour * 60 + minute, f"{hour:02d}:{minute:02d}"


def _timezone(value: Any) -> tuple[str, tzinfo]:
    if value == "UTC":  # needs no time zone database
        return "UTC", UTC
    try:
        return str(value), ZoneInfo(str(value))
    except Exception as exc:  # noqa: BLE001 - ZoneInfo raises KeyError, ValueError, OSError
        raise ParamError(f"binding param timezone {value!r} is not a known zoneinfo name "
                         "(e.g. UTC, Europe/Paris)") from exc


def _actions(value: Any) -> set[str]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ParamError(f"binding param actions must be a list of actions, got {value!r}")
    bad = [a for a in value if a not in ACTIONS]
    if bad:
        raise ParamError(f"binding param actions has unknown action {bad[0]!r}; actions are "
                         f"{', '.join(ACTIONS)}")
    return set(value)


def _decide(allowed: bool, reason: str) -> dict[str, Any]:
    return {"allowed": allowed, "reason": reason}
