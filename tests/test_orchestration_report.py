"""The orchestration report: one row per variant and policy, the timeline's marks in order, the
timed prefill beside the planner's prediction, the untimed decode's CPU job, the path offsets a run
learned, one run's folder as well as the threads-ab variants, each row beside the calibration it
planned with, and a clear error for a folder without runs."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
from orchestration_report import MARKS, path_rates, report, untimed_cpu_job


def write_variant(root: Path, variant: str, decode: float, timeline: dict) -> None:
    folder = root / f"ab-{variant}"
    folder.mkdir(parents=True)
    run = {
        "speed": {
            "policies": {
                "hybrid": {
                    "decode_tokens_per_s": decode,
                    "ttft_s": 0.5,
                    "layer_timing_decode": {"measured_ms_mean": 6.0, "timeline_ms_median": timeline},
                }
            }
        }
    }
    (folder / "orchestration.json").write_text(json.dumps(run))
    calibration = {"cpu_expert_s": [0.0033], "concurrent": {"cpu_slowdown": 1.2}}
    (folder / "calibration.json").write_text(json.dumps(calibration))


def test_rows_per_variant_with_the_timeline(tmp_path):
    write_variant(tmp_path, "default", 5.78, {"routed": 0.1, "cpu_begin": 1.5, "end": 6.9})
    write_variant(tmp_path, "passive", 6.4, {"routed": 0.1, "cpu_begin": 0.3, "end": 5.6})
    text = report(tmp_path)
    header = next(line for line in text.splitlines() if line.startswith("| variant"))
    assert header.endswith(" | ".join(MARKS) + " |")
    unmarked = "| - " * 7  # planned ... cpu_inputs: not in this layer's timeline
    assert f"| default | hybrid | 5.78 | - | 0.50 | 3.30 | 1.20 | 6.00 | 0.10 {unmarked}| 1.50 |" in text
    assert "| passive | hybrid | 6.40 |" in text


def test_the_share_of_the_bound_is_shown_where_recorded(tmp_path):
    write_variant(tmp_path, "stream", 6.6, {"routed": 0.1, "end": 5.0})
    run_file = tmp_path / "ab-stream" / "orchestration.json"
    run = json.loads(run_file.read_text())
    run["speed"]["policies"]["hybrid"]["share_of_bound"] = 0.824
    run_file.write_text(json.dumps(run))
    assert "| stream | hybrid | 6.60 | 82% | 0.50 |" in report(tmp_path)
    run["speed"]["policies"]["hybrid"]["decode_bound_same_window_tokens_per_s"] = 7.5
    run_file.write_text(json.dumps(run))
    assert "| stream | hybrid | 6.60 | 82% (88% one window) | 0.50 |" in report(tmp_path)


def test_a_row_of_a_thread_ab_run_shows_its_own_calibration(tmp_path):
    """``orchestration_gpu.py --ab-threads`` plans each thread count with its own calibration
    file, which each row names."""
    write_variant(tmp_path, "threads", 6.0, {"routed": 0.1, "end": 5.0})
    folder = tmp_path / "ab-threads"
    run = json.loads((folder / "orchestration.json").read_text())
    row = run["speed"]["policies"].pop("hybrid")
    for threads, cpu_s in ((16, 0.0035), (15, 0.0038)):
        name = f"calibration-threads{threads}.json"
        (folder / name).write_text(json.dumps({"cpu_expert_s": [cpu_s], "concurrent": {"cpu_slowdown": 1.1}}))
        run["speed"]["policies"][f"hybrid at {threads} threads"] = row | {"calibration": name}
    (folder / "orchestration.json").write_text(json.dumps(run))
    text = report(tmp_path)
    assert "| threads | hybrid at 16 threads | 6.00 | - | 0.50 | 3.50 | 1.10 |" in text
    assert "| threads | hybrid at 15 threads | 6.00 | - | 0.50 | 3.80 | 1.10 |" in text


def test_a_folder_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="orchestration or threads-ab stage"):
        report(tmp_path)


def test_one_runs_folder_with_its_timed_prefill(tmp_path):
    """The orchestration stage's folder holds one run; its prefill table appears when timed."""
    write_variant(tmp_path, "default", 5.78, {"routed": 0.1, "end": 6.9})
    one = tmp_path / "ab-default"
    assert "timed prefill" not in report(one)  # no prefill timing recorded: no table
    run = json.loads((one / "orchestration.json").read_text())
    run["speed"]["policies"]["hybrid"]["layer_timing_prefill"] = {
        "layers": 32,
        "predicted_ms_total": 520.0,
        "measured_ms_total": 610.5,
        "cpu_compute_ms_total": 300.25,
        "timed_ttft_s": 0.75,
        "timeline_ms_median": {"routed": 0.3, "cpu_begin": 0.6},
    }
    (one / "orchestration.json").write_text(json.dumps(run))
    text = report(one)
    unmarked = "| - " * 7  # planned ... cpu_inputs
    assert f"| ab-default | hybrid | 0.50 | 0.75 | 32 | 520.0 | 610.5 | 300.2 | 0.30 {unmarked}| 0.60 |" in text


def test_path_rates_count_a_divided_experts_share_on_each_path():
    expert_bytes = 1_000_000
    layer = {
        "cpu": [3],
        "copy": [],
        "split": [5, 4, 16],  # a quarter of expert 5 on the CPU, the rest copied
        "timeline_ms": {
            "cpu_begin": 1.0,
            "cpu_end": 2.25,  # 1.25 experts in 1.25 ms
            "copies_begin": 0.5,
            "copies_landed": 1.25,  # 0.75 experts in 0.75 ms
            "wait_over": 2.5,
            "end": 3.0,
        },
    }
    rates = path_rates([layer], expert_bytes)
    assert rates["cpu"] == pytest.approx(1.0)  # GB/s
    assert rates["copy"] == pytest.approx(1.0)
    assert rates["all"] == pytest.approx(2.0 / 3.0)  # 2 experts over the 3 ms layer
    assert rates["before"] == pytest.approx(1.0) and rates["after"] == pytest.approx(0.5)
    del layer["timeline_ms"]["wait_over"]  # the stream CPU mode: no wait, "after" counts from the CPU's end
    assert path_rates([layer], expert_bytes)["after"] == pytest.approx(0.75)


def test_the_untimed_cpu_job_per_job_and_absent_in_older_runs(tmp_path):
    """The untimed decode's CPU counters per job: routing-to-compute and compute, in ms."""
    per_token = {"cpu_jobs": 30.0, "cpu_start_s": 0.009, "cpu_compute_s": 0.12, "cpu_wait_s": 0.0}
    job = untimed_cpu_job(per_token)
    assert job["start"] == pytest.approx(0.3) and job["compute"] == pytest.approx(4.0)
    assert untimed_cpu_job({}) == {"start": None, "compute": None}  # recorded since the fifteenth session
    assert untimed_cpu_job({"cpu_jobs": 0.0}) == {"start": None, "compute": None}  # no CPU work
    layer = {"cpu": [3], "copy": [], "split": None, "timeline_ms": {"cpu_begin": 1.0, "cpu_end": 2.0, "end": 2.5}}
    write_variant(tmp_path, "default", 5.78, {"routed": 0.1, "end": 6.9})
    path = tmp_path / "ab-default" / "orchestration.json"
    run = json.loads(path.read_text())
    run["args"] = {"model": "mixtral-tiny"}
    hybrid = run["speed"]["policies"]["hybrid"]
    hybrid["layer_timing_decode"]["sample"] = [layer]
    hybrid["per_decode_token"] = per_token
    path.write_text(json.dumps(run))
    row = next(line for line in report(tmp_path).splitlines() if line.startswith("| default | hybrid | 1 |"))
    assert row.endswith("| 0.30 | 4.00 |")


def test_learned_path_offsets_are_shown_only_where_a_run_learned_some(tmp_path):
    write_variant(tmp_path, "paths", 6.1, {"routed": 0.1, "end": 5.0})
    assert "Path offsets" not in report(tmp_path)
    run_file = tmp_path / "ab-paths" / "orchestration.json"
    run = json.loads(run_file.read_text())
    row = run["speed"]["policies"]["hybrid"]
    run["speed"]["policies"]["hybrid adapting path ends"] = row | {"path_offsets_ms": {"cpu": 0.31, "copy": 0.84}}
    row["path_offsets_ms"] = {"cpu": 0.0, "copy": 0.0}
    run_file.write_text(json.dumps(run))
    text = report(tmp_path)
    assert "| paths | hybrid adapting path ends | 0.31 | 0.84 |" in text
    assert "| paths | hybrid | 0.00 | 0.00 |" not in text
