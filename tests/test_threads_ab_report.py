"""The threads-ab report: one row per variant and policy, the timeline's marks in order, and a
clear error for a folder without runs."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
from threads_ab_report import MARKS, report


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
    assert "| default | hybrid | 5.78 | 0.50 | 3.30 | 1.20 | 6.00 | 0.10 | - | - | 1.50 |" in text
    assert "| passive | hybrid | 6.40 |" in text


def test_a_folder_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="threads-ab stage"):
        report(tmp_path)
