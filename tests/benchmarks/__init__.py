"""Benchmarks (`make bench`): each prints its figures and writes them under ``results/``; none
passes or fails on time.

``AIRFLEET_BENCH_QUICK=1`` (``.ci/run`` sets it) asks for fewer repetitions: every figure is
still measured and printed, from fewer samples (the JSON says how many).
"""

from __future__ import annotations

import os

QUICK = os.environ.get("AIRFLEET_BENCH_QUICK", "") not in ("", "0")


def repetitions(full: int, quick: int) -> int:
    """``full`` repetitions, or ``quick`` under ``AIRFLEET_BENCH_QUICK=1``."""
    return quick if QUICK else full
