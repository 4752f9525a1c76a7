"""ProgressMeter: rate over a sliding window, and the time left at that rate."""

from __future__ import annotations

import pytest

from kevo_repl.repl.progress import ProgressMeter


def test_rate_and_eta_follow_the_recent_window() -> None:
    meter = ProgressMeter(window_s=10.0)
    assert meter.rate(0.0) == 0.0 and meter.eta_s(100, 0.0) is None
    meter.observe(0, 0.0)
    assert meter.rate(0.0) == 0.0  # one sample: no speed yet
    for t in range(1, 21):
        meter.observe(t * 1000, float(t))  # 1,000 entries/s for 20 s
    assert meter.rate(20.0) == pytest.approx(1000.0)
    assert meter.eta_s(5000, 20.0) == pytest.approx(5.0)
    assert meter.eta_s(0, 20.0) == 0.0
    for t in range(21, 26):
        meter.observe(20_000 + (t - 20) * 100, float(t))  # slows to 100/s
    assert meter.rate(25.0) < 700  # the old speed ages out of the window


def test_a_stalled_position_reads_as_stopped() -> None:
    meter = ProgressMeter(window_s=5.0)
    meter.observe(0, 0.0)
    meter.observe(500, 1.0)
    assert meter.rate(2.0) == pytest.approx(500.0)
    assert meter.rate(6.5) == 0.0 and meter.eta_s(10, 6.5) is None
