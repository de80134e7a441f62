"""Fixtures the integration tests share."""

from __future__ import annotations

import json

import pytest

from airfleet.store import Store

RECORDING_BACKEND = "tests.fakes.recording_backend:RecordingBackend"


@pytest.fixture
def fake(airfleet_home, monkeypatch, tmp_path):
    """Register the recording backend for ssh and kubernetes; return its call log reader and
    a way to instruct it."""
    monkeypatch.setenv("AIRFLEET_BACKENDS", f"ssh={RECORDING_BACKEND},kubernetes={RECORDING_BACKEND}")
    log, state = tmp_path / "calls.jsonl", tmp_path / "state.json"
    monkeypatch.setenv("AIRFLEET_FAKE_BACKEND_LOG", str(log))
    monkeypatch.setenv("AIRFLEET_FAKE_BACKEND_STATE", str(state))
    Store().migrate()

    class Fake:
        def calls(self, cluster: str | None = None) -> list[str]:
            if not log.exists():
                return []
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            return [r["verb"] for r in rows if cluster in (None, r["cluster"])]

        def instruct(self, **instructions) -> None:
            state.write_text(json.dumps(instructions))

    return Fake()
