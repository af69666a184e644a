"""Side-by-side table of the `threads-ab` stage of experiments/gpu_campaign.sh: one
orchestration run per CPU thread setting (``<dir>/ab-<variant>/orchestration.json`` beside the
``calibration.json`` it measured), each policy's decode tokens/s and TTFT, the calibration's CPU
expert time and slowdown beside copies, and the median timeline of its timed decode layers (ms
from the layer's start, as ``fiddler.orchestrator`` records it).

Usage: python experiments/threads_ab_report.py DIR [--out FILE]   (markdown on stdout or FILE)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fiddler.files import write_text_atomic

# the timeline's marks in the order a layer reaches them with the CPU rows on the worker thread
# (fiddler.orchestrator's layer_log); on the main thread the CPU marks come after `issued`
MARKS = (
    "routed",
    "cpu_submitted",
    "cpu_picked",
    "cpu_begin",
    "issued",
    "copies_landed",
    "gpu_done",
    "cpu_end",
    "wait_over",
    "end",
)


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def variant_rows(run: dict, calibration: dict, variant: str) -> list[str]:
    """One table row per policy of one variant's orchestration run."""
    cpu_1 = calibration.get("cpu_expert_s", [None])[0]
    slowdown = calibration.get("concurrent", {}).get("cpu_slowdown")
    rows = []
    for policy, result in run.get("speed", {}).get("policies", {}).items():
        timing = result.get("layer_timing_decode", {})
        timeline = timing.get("timeline_ms_median", {})
        rows.append(
            f"| {variant} | {policy} | {_cell(result['decode_tokens_per_s'])} | {_cell(result['ttft_s'])} | "
            f"{_cell(cpu_1 * 1e3 if cpu_1 else None)} | {_cell(slowdown)} | {_cell(timing.get('measured_ms_mean'))} | "
            + " | ".join(_cell(timeline.get(mark)) for mark in MARKS)
            + " |"
        )
    return rows


def report(directory: Path) -> str:
    runs = sorted(directory.glob("ab-*/orchestration.json"))
    if not runs:
        raise FileNotFoundError(f"{directory} has no ab-*/orchestration.json: run the threads-ab stage into it")
    lines = [
        f"# CPU thread settings side by side ({directory})",
        "",
        "Decode tokens/s and TTFT as measured untimed; the calibration's CPU expert at one token; "
        "the mean timed decode layer and the median of each timeline mark (ms from the layer's start).",
        "",
        "| variant | policy | decode tokens/s | TTFT s | CPU expert ms | CPU beside copies | timed layer ms | "
        + " | ".join(MARKS)
        + " |",
        "|" + "---|" * (7 + len(MARKS)),
    ]
    for path in runs:
        variant = path.parent.name.removeprefix("ab-")
        calibration_path = path.parent / "calibration.json"
        calibration = json.loads(calibration_path.read_text()) if calibration_path.exists() else {}
        lines += variant_rows(json.loads(path.read_text()), calibration, variant)
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = report(args.directory)
    if args.out:
        write_text_atomic(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
