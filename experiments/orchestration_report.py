"""Orchestration runs side by side: the `orchestration` stage of experiments/gpu_campaign.sh (a
folder holding ``orchestration.json``) or its `threads-ab` stage (one run per CPU thread setting,
``<dir>/ab-<variant>/orchestration.json``), each beside the ``calibration.json`` it measured.
Tables: each policy's decode tokens/s and TTFT, the calibration's CPU expert time and slowdown
beside copies, and the median timeline of its timed decode layers (ms from the layer's start,
as ``fiddler.orchestrator`` records it); from the sampled timed layers, the rate at which each
path moved expert bytes while it was busy (CPU: the experts' bytes it computed over
cpu_begin..cpu_end; copies: the bytes copied over copies_begin..copies_landed), all missing
experts' bytes over the whole layers, and the mean time before the CPU began and after the main
thread's wait was over; the path offsets a variant learned (``--adapt-paths``: how late the
CPU's compute and the last copy ended against the plan, as the planner then used them); and the
timed prefill against the planner's prediction (where TTFT goes).

Usage: python experiments/orchestration_report.py DIR [--out FILE]   (markdown on stdout or FILE)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fiddler.config import ModelConfig
from fiddler.files import write_text_atomic

ORCHESTRATION_DTYPE_BYTES = 2  # experiments/orchestration_gpu.py runs in bfloat16
# the timeline's marks in the order a layer reaches them with the CPU rows on the worker thread
# (fiddler.orchestrator's layer_log); on the main thread the CPU marks come after `issued`
MARKS = (
    "routed",
    "planned",
    "hidden_down",
    "out_free",
    "gathered",
    "cpu_submitted",
    "cpu_picked",
    "cpu_inputs",
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


def read_calibration(folder: Path, name: str) -> dict:
    """A calibration file of the run's folder; empty when absent."""
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else {}


def variant_rows(run: dict, folder: Path, variant: str) -> list[str]:
    """One table row per policy of one variant's orchestration run, each beside the calibration
    it planned with (a row of an ``--ab-threads`` run names its own; else ``calibration.json``)."""
    rows = []
    for policy, result in run.get("speed", {}).get("policies", {}).items():
        calibration = read_calibration(folder, result.get("calibration", "calibration.json"))
        cpu_1 = calibration.get("cpu_expert_s", [None])[0]
        slowdown = calibration.get("concurrent", {}).get("cpu_slowdown")
        timing = result.get("layer_timing_decode", {})
        timeline = timing.get("timeline_ms_median", {})
        share = result.get("share_of_bound")  # recorded since the handoff-ab stage
        shown = "-" if share is None else f"{share:.0%}"
        same = result.get("decode_bound_same_window_tokens_per_s")  # where the calibration records it
        if same:
            shown += f" ({result['decode_tokens_per_s'] / same:.0%} one window)"
        rows.append(
            f"| {variant} | {policy} | {_cell(result['decode_tokens_per_s'])} | "
            f"{shown} | {_cell(result['ttft_s'])} | "
            f"{_cell(cpu_1 * 1e3 if cpu_1 else None)} | {_cell(slowdown)} | {_cell(timing.get('measured_ms_mean'))} | "
            + " | ".join(_cell(timeline.get(mark)) for mark in MARKS)
            + " |"
        )
    return rows


def offset_rows(run: dict, variant: str) -> list[str]:
    """One row per policy whose run learned path offsets (any not zero), in ms."""
    rows = []
    for policy, result in run.get("speed", {}).get("policies", {}).items():
        offsets = result.get("path_offsets_ms") or {}
        if any(offsets.values()):
            rows.append(f"| {variant} | {policy} | {_cell(offsets.get('cpu'))} | {_cell(offsets.get('copy'))} |")
    return rows


def path_rates(samples: list[dict], expert_bytes: int) -> dict[str, float | None]:
    """GB/s of expert bytes per path while busy and over whole layers; ms before the CPU began
    and after the wait for it, averaged over the sampled layers."""
    cpu_bytes = cpu_s = copy_bytes = copy_s = before = after = 0.0
    for layer in samples:
        marks = layer["timeline_ms"]
        split = layer.get("split")  # (expert, cpu_blocks, blocks)
        on_cpu = len(layer["cpu"]) + (split[1] / split[2] if split else 0.0)
        copied = len(layer["copy"]) + ((split[2] - split[1]) / split[2] if split else 0.0)
        if on_cpu and "cpu_end" in marks:
            cpu_bytes += on_cpu * expert_bytes
            cpu_s += (marks["cpu_end"] - marks["cpu_begin"]) / 1e3
        if copied and "copies_landed" in marks:
            copy_bytes += copied * expert_bytes
            copy_s += (marks["copies_landed"] - marks["copies_begin"]) / 1e3
        before += marks.get("cpu_begin", 0.0)
        # after the main thread's wait; in the stream CPU mode (no such wait) after the CPU's end
        after += marks["end"] - marks.get("wait_over", marks.get("cpu_end", marks["end"]))
    layers_s = sum(layer["timeline_ms"]["end"] for layer in samples) / 1e3
    count = len(samples)
    return {
        "cpu": cpu_bytes / cpu_s / 1e9 if cpu_s else None,
        "copy": copy_bytes / copy_s / 1e9 if copy_s else None,
        "all": (cpu_bytes + copy_bytes) / layers_s / 1e9 if layers_s else None,
        "before": before / count if count else None,
        "after": after / count if count else None,
    }


def untimed_cpu_job(per_decode_token: dict) -> dict[str, float | None]:
    """ms per CPU job in the untimed decode (host clock, no synchronisation): from the routing
    known to the CPU computing, and its compute; None where not recorded (runs before the
    fifteenth session) or no job ran."""
    jobs = per_decode_token.get("cpu_jobs")
    if not jobs:
        return {"start": None, "compute": None}
    return {
        "start": 1e3 * per_decode_token["cpu_start_s"] / jobs,
        "compute": 1e3 * per_decode_token["cpu_compute_s"] / jobs,
    }


def rate_rows(run: dict, variant: str) -> list[str]:
    """One row per policy: ``path_rates`` of its sampled timed decode layers, and the untimed
    decode's CPU job (``untimed_cpu_job``)."""
    rows = []
    for policy, result in run.get("speed", {}).get("policies", {}).items():
        samples = result.get("layer_timing_decode", {}).get("sample", [])
        if not samples:
            continue
        expert_bytes = ModelConfig.preset(run["args"]["model"]).expert_params * ORCHESTRATION_DTYPE_BYTES
        rates = path_rates(samples, expert_bytes)
        untimed = untimed_cpu_job(result.get("per_decode_token", {}))
        cells = (
            [_cell(rates[key], 1) for key in ("cpu", "copy", "all")]
            + [_cell(rates[key]) for key in ("before", "after")]
            + [_cell(untimed[key]) for key in ("start", "compute")]
        )
        rows.append(f"| {variant} | {policy} | {len(samples)} | " + " | ".join(cells) + " |")
    return rows


def prefill_rows(run: dict, variant: str) -> list[str]:
    """One row per policy: its timed prefill's MoE layers, predicted and measured."""
    rows = []
    for policy, result in run.get("speed", {}).get("policies", {}).items():
        timing = result.get("layer_timing_prefill")
        if not timing:
            continue
        timeline = timing.get("timeline_ms_median", {})
        cells = [
            _cell(result.get("ttft_s")),
            _cell(timing.get("timed_ttft_s")),
            str(timing.get("layers", 0)),
            _cell(timing.get("predicted_ms_total"), 1),
            _cell(timing.get("measured_ms_total"), 1),
            _cell(timing.get("cpu_compute_ms_total"), 1),
        ] + [_cell(timeline.get(mark)) for mark in MARKS]
        rows.append(f"| {variant} | {policy} | " + " | ".join(cells) + " |")
    return rows


def runs_in(directory: Path) -> list[tuple[str, Path]]:
    """(variant, orchestration.json) pairs: the folder's own run, or its ab-* variants."""
    own = directory / "orchestration.json"
    if own.exists():
        return [(directory.name, own)]
    runs = sorted(directory.glob("ab-*/orchestration.json"))
    if not runs:
        raise FileNotFoundError(
            f"{directory} has neither orchestration.json nor ab-*/orchestration.json: "
            "give the folder of an orchestration or threads-ab stage"
        )
    return [(path.parent.name.removeprefix("ab-"), path) for path in runs]


def report(directory: Path) -> str:
    runs = runs_in(directory)
    lines = [
        f"# Orchestration runs side by side ({directory})",
        "",
        "Decode tokens/s and TTFT as measured untimed, and that decode's share of the bandwidth bound "
        "(`fiddler.bounds`, the run's calibration and decode GPU hit rate; in brackets, of the bound with "
        "both paths' rates from one window of the calibration, `same_window_model`, where it records that); "
        "the calibration's CPU expert "
        "at one token; the mean timed decode layer and the median of each timeline mark (ms from the "
        "layer's start; timing synchronises every layer, which the stream CPU mode's gain needs not to).",
        "",
        "| variant | policy | decode tokens/s | share of bound | TTFT s | CPU expert ms | CPU beside copies | "
        "timed layer ms | " + " | ".join(MARKS) + " |",
        "|" + "---|" * (8 + len(MARKS)),
    ]
    rates = [
        "",
        "Expert bytes moved per path while busy, and over whole timed layers (GB/s); ms before the CPU "
        "began and after the main thread's wait for it was over (the stream CPU mode: after the CPU's end; means). "
        "Untimed (the decode of the first table, nothing synchronised): ms per CPU job from the routing known "
        "on the host to the CPU computing, and its compute.",
        "",
        "| variant | policy | layers | CPU GB/s | copy GB/s | all GB/s | before CPU ms | after wait ms | "
        "untimed start ms | untimed CPU ms |",
        "|" + "---|" * 10,
    ]
    prefill = [
        "",
        "The timed prefill (one generation with layer timing on, which synchronises each layer): TTFT "
        "untimed and timed, its MoE layers' time as the planner predicted it and as measured, the CPU "
        "worker's compute, and the median timeline of those layers (ms).",
        "",
        "| variant | policy | TTFT s | timed TTFT s | layers | predicted ms | measured ms | CPU compute ms | "
        + " | ".join(MARKS)
        + " |",
        "|" + "---|" * (8 + len(MARKS)),
    ]
    offsets = [
        "",
        "Path offsets learned in the run (`--adapt-paths`; the last generation's, ms): how much later "
        "than the plan's timeline the CPU's compute and the last copy ended, as the planner then used them.",
        "",
        "| variant | policy | CPU offset ms | copy offset ms |",
        "|" + "---|" * 4,
    ]
    prefill_body: list[str] = []
    offset_body: list[str] = []
    for variant, path in runs:
        run = json.loads(path.read_text())
        lines += variant_rows(run, path.parent, variant)
        rates += rate_rows(run, variant)
        offset_body += offset_rows(run, variant)
        prefill_body += prefill_rows(run, variant)
    tables = lines + rates + (offsets + offset_body if offset_body else [])
    return "\n".join(tables + (prefill + prefill_body if prefill_body else [])) + "\n"


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
