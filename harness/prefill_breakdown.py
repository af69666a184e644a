"""Where a Fiddler system's TTFT goes against its own plan: the part of a TTFT miss the planner
does not see.

Contract: ``prefill_breakdown(run_dir, hardware)`` reads a run folder's raw rows whose Fiddler
executor recorded its prefill counters (``stats.prefill``, ``harness.runner.prefill_counters``;
rows measured before commit d4a5651 have none) and returns, per (system, scenario, input
tokens) of single-sequence rows (beam rows left out), medians over the rows of: the measured
TTFT; the planner's own prediction of the prefill's MoE layers (the sum of its per-layer
predictions, with the routing the run met: the CPU path's, the copies' and the accelerator's
work together); the CPU path's compute and the main thread's wait for it; the rest, (TTFT -
planned) per decoder layer, the median of each row's; and what the hardware profile adds per
layer outside the plan (the simulator's ``step_overhead_per_layer_s``, plus its
``cpu_path_overhead_s_by_tokens`` at the prompt's tokens on the share of layers whose plan used
the CPU: one CPU job per such layer). ``prefill_markdown`` renders the rows. A folder without
raw rows, or none with prefill counters, gives an empty frame: the breakdown is an addendum to
validation.

Why: the simulator prices a Fiddler layer as the engine's plan plus the profile's overheads (in
the prefill, the plan's CPU compute scaled by the profile's ``prefill_cpu_factor_by_rows``), so
when its TTFT misses, either the plan's prices were wrong (CPU compute against the plan, where
the plan is the CPU's alone) or the host spent time outside any plan (the rest against the
profile's overheads). The plan here is the run's own, made with the executor's in-run
corrections, so it shows the CPU's speed as the run learned it, not as calibrated.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pandas as pd

from harness.runner import read_raw
from harness.simulate import load_profile
from harness.timing import MEASURED_ROW_STATUSES

COLUMNS = [
    "system",
    "scenario",
    "input_tokens",
    "rows",
    "ttft_s",
    "planned_s",
    "cpu_compute_s",
    "cpu_wait_s",
    "rest_per_layer_ms",
    "profile_per_layer_ms",
]


def prefill_breakdown(run_dir: str | Path, hardware: str) -> pd.DataFrame:
    _, hw = load_profile(hardware)
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for row in read_raw(Path(run_dir) / "raw.csv"):  # none where the folder has no raw rows
        stats = json.loads(row.get("stats") or "{}") if row["status"] in MEASURED_ROW_STATUSES else {}
        prefill = stats.get("prefill") or {}
        if "predicted_s" not in prefill or int(row["beam_width"]) != 1:
            continue
        ttft = float(row["ttft_s"]) if row["ttft_s"] not in ("", None) else math.nan
        if not math.isfinite(ttft):
            continue
        layers = int(row["num_layers"])
        cpu_share = min(1.0, prefill.get("cpu_jobs", 0) / layers)
        groups.setdefault((row["system"], row["scenario"], int(row["input_tokens"])), []).append(
            {
                "ttft_s": ttft,
                "planned_s": prefill["predicted_s"],
                "cpu_compute_s": prefill.get("cpu_compute_s", 0.0),
                "cpu_wait_s": prefill.get("cpu_wait_s", 0.0),
                "rest_per_layer_ms": 1e3 * (ttft - prefill["predicted_s"]) / layers,
                "profile_per_layer_ms": 1e3
                * (hw.step_overhead_per_layer_s + cpu_share * hw.cpu_path_overhead(int(row["input_tokens"]))),
            }
        )
    rows = [
        {"system": system, "scenario": scenario, "input_tokens": tokens, "rows": len(found)}
        | {k: statistics.median(r[k] for r in found) for k in COLUMNS[4:]}
        for (system, scenario, tokens), found in sorted(groups.items())
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def prefill_markdown(rows: pd.DataFrame) -> list[str]:
    """The table's lines with a heading and what each column is; none for an empty frame."""
    if rows.empty:
        return []
    lines = [
        "## Where Fiddler's TTFT goes against its own plan",
        "",
        "Rows that recorded the executor's prefill counters (one sequence; beam rows left out), "
        "medians over them, each column on its own. planned: the engine's planner's predicted time of "
        "the prefill's MoE layers (CPU path, copies and accelerator together), with the routing the "
        "run met; CPU compute and wait: the CPU path's, and the main thread's wait for it; rest: "
        "(TTFT - planned) per decoder layer, the median of each row's: time outside any plan "
        "(attention and the dense part, the routing read, the hand-off around the CPU path, the "
        "first token); profile: the overheads the simulator adds per layer outside the plan (it "
        "prices the dense part's reads besides, ~0.02 ms a layer on the GPU host). Where the plan "
        "is the CPU's alone, CPU compute near planned and rest above profile put a TTFT miss "
        "outside the planner's prices.",
        "",
        "| system | scenario | input tokens | rows | TTFT s | planned s | CPU compute s | CPU wait s "
        "| rest ms/layer | profile ms/layer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.itertuples():
        lines.append(
            f"| {r.system} | {r.scenario} | {r.input_tokens} | {r.rows} | {r.ttft_s:.3g} | {r.planned_s:.3g} | "
            f"{r.cpu_compute_s:.3g} | {r.cpu_wait_s:.3g} | {r.rest_per_layer_ms:.2f} | {r.profile_per_layer_ms:.2f} |"
        )
    return [*lines, ""]
