"""The sustained-kernel experiment: its windows pick the calls they name, its ratios are taken
against the burst, a series stops after its time and idles between calls as asked."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import cpu_sustained
from cpu_sustained import FIRST_WINDOW_S, LAST_WINDOW_S, SERIES_POINTS, report, run_series, summarise


def test_windows_and_ratios():
    seconds = 3.0
    # 0.1 s apart: the first window holds the 3 ms calls, the last second the 6 ms ones
    series = [
        (t / 10, 0.003 if t / 10 < FIRST_WINDOW_S else 0.006 if t / 10 >= seconds - LAST_WINDOW_S else 0.004)
        for t in range(30)
    ]
    summary = summarise(series, burst=0.003, seconds=seconds)
    assert summary["calls"] == 30
    assert summary["first_s"] == pytest.approx(0.003) and summary["first_over_burst"] == pytest.approx(1.0)
    assert summary["last_s"] == pytest.approx(0.006) and summary["last_over_burst"] == pytest.approx(2.0)
    assert len(summary["series"]) <= SERIES_POINTS


def test_a_long_series_is_thinned():
    series = [(i * 1e-4, 0.001) for i in range(10 * SERIES_POINTS)]
    assert len(summarise(series, burst=0.001, seconds=2.0)["series"]) == SERIES_POINTS
    for calls in (SERIES_POINTS + 1, 2 * SERIES_POINTS - 1, 3 * SERIES_POINTS + 7):  # not a multiple
        thinned = summarise([(i * 1e-4, 0.001) for i in range(calls)], burst=0.001, seconds=2.0)["series"]
        assert SERIES_POINTS // 2 <= len(thinned) <= SERIES_POINTS


class Rotation:
    def next(self):
        return (None, None)


def test_a_series_stops_after_its_time_and_idles_between_calls(monkeypatch):
    monkeypatch.setattr(cpu_sustained, "REST_S", 0.0)
    calls = []

    def kernel(x, w13b, w2b):
        calls.append(x)
        sum(range(20_000))  # a little work

    started = time.perf_counter()
    busy = run_series(kernel, Rotation(), "x", seconds=0.2, duty=1.0)
    gapped = run_series(kernel, Rotation(), "x", seconds=0.2, duty=0.25)
    assert time.perf_counter() - started < 2.0  # each series stops near its 0.2 s (generous: a loaded CI box)
    assert len(calls) == len(busy) + len(gapped)
    # idle for three times each call's time: far fewer calls fit (loose: a loaded CI machine)
    assert len(gapped) < len(busy) / 2
    assert summarise(gapped, burst=busy[0][1], seconds=0.2)["duty"] < 0.6


def test_the_report_shows_each_series_against_the_burst():
    series = summarise([(0.0, 0.002), (2.5, 0.003)], burst=0.002, seconds=3.0)
    record = {
        "machine": {"cpu_model": "Test CPU"},
        "threads": 16,
        "seconds": 3.0,
        "duty": 0.75,
        "results": [{"kernel": "amx-bf16", "tokens": 16, "burst_s": 0.002, "sustained": series, "gapped": series}],
    }
    text = report(record)
    assert "Test CPU, 16 threads" in text
    assert "| amx-bf16 | 16 | 2.00 | 1.00x | 1.50x | 1.00x | 1.50x (" in text
