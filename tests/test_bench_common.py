"""Helpers the benchmarks report with."""

from __future__ import annotations

import math

from bench.common import pct, window_p99


def test_window_p99_splits_by_scheduled_second_across_clients() -> None:
    # Two clients: second 0 is fast for both, second 1 has one slow transaction.
    a = {"scheduled_at": [0.1, 0.5, 1.2, 1.9], "latencies": [0.010, 0.012, 0.011, 0.200]}
    b = {"scheduled_at": [0.3, 1.4], "latencies": [0.009, 0.013]}
    windows = window_p99([a, b])
    assert len(windows) == 2
    assert math.isclose(windows[0], 12.0)
    assert math.isclose(windows[1], 200.0)
    # Half-second windows: four of them, the slow one last.
    halves = window_p99([a, b], width=0.5)
    assert len(halves) == 4 and math.isclose(halves[-1], 200.0)


def test_pct_of_nothing_is_nan() -> None:
    assert math.isnan(pct([], 0.99))
    assert pct([1.0, 2.0, 3.0], 0.5) == 2.0
