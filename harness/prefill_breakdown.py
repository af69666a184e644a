"""Where a Fiddler system's TTFT goes against its own plan: the part of a TTFT miss the planner
does not see.

Contract: ``prefill_breakdown(run_dir, hardware)`` reads a run folder's raw rows whose Fiddler
executor recorded its prefill counters (``stats.prefill``, ``harness.runner.prefill_counters``;
rows measured before commit d4a5651 have none) and returns, per (system, input tokens), medians over the
rows of: the measured TTFT; the planner's own prediction of the prefill's MoE layers (the sum of
its per-layer predictions over the layers it planned, with the routing the run met); the CPU
path's compute and the main thread's wait for it; and the rest, TTFT less the plan, per decoder
layer, beside what the hardware profile adds per layer outside the plan (the simulator's
``step_overhead_per_layer_s``, plus ``prefill_cpu_path_overhead_per_layer_s`` where the
prefill used the CPU). ``prefill_markdown`` renders the rows.

Why: the simulator prices a Fiddler layer as the engine's plan plus the profile's overheads, so
when its TTFT misses, either the plan's prices were wrong (CPU compute against the plan) or the
host spent time outside any plan (the rest against the profile's overheads). An empty frame
where no row recorded prefill counters.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd

from harness.simulate import load_profile
from harness.timing import MEASURED_ROW_STATUSES

COLUMNS = [
    "system",
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
    path = Path(run_dir) / "raw.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the prefill breakdown reads a run's raw rows")
    _, hw = load_profile(hardware)
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in pd.read_csv(path, keep_default_na=False).to_dict("records"):
        stats = json.loads(row["stats"] or "{}") if row["status"] in MEASURED_ROW_STATUSES else {}
        prefill = stats.get("prefill") or {}
        if "predicted_s" not in prefill or row["ttft_s"] in ("", None) or int(row["beam_width"]) != 1:
            continue
        ttft, layers = float(row["ttft_s"]), int(row["num_layers"])
        uses_cpu = prefill.get("cpu_jobs", 0) > 0
        groups.setdefault((row["system"], int(row["input_tokens"])), []).append(
            {
                "ttft_s": ttft,
                "planned_s": prefill["predicted_s"],
                "cpu_compute_s": prefill.get("cpu_compute_s", 0.0),
                "cpu_wait_s": prefill.get("cpu_wait_s", 0.0),
                "rest_per_layer_ms": 1e3 * (ttft - prefill["predicted_s"]) / layers,
                "profile_per_layer_ms": 1e3
                * (hw.step_overhead_per_layer_s + (hw.prefill_cpu_path_overhead_per_layer_s if uses_cpu else 0.0)),
            }
        )
    rows = [
        {"system": system, "input_tokens": tokens, "rows": len(found)}
        | {k: statistics.median(r[k] for r in found) for k in COLUMNS[3:]}
        for (system, tokens), found in sorted(groups.items())
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def prefill_markdown(rows: pd.DataFrame) -> list[str]:
    """The table's lines with a heading and what each column is; none for an empty frame."""
    if rows.empty:
        return []
    lines = [
        "## Where Fiddler's TTFT goes against its own plan",
        "",
        "Rows that recorded the executor's prefill counters, medians over them (single batch). "
        "planned: the engine's planner's predicted time of the prefill's MoE layers, with the routing "
        "the run met; CPU compute and wait: the CPU path's, and the main thread's wait for it; rest: "
        "(TTFT - planned) per decoder layer, the host's and the accelerator's time outside any plan "
        "(attention and the dense part, the routing read, the hand-off around the CPU path, the "
        "first token); profile: what the simulator adds per layer outside the plan. A TTFT miss with "
        "CPU compute near planned and rest above profile lies outside the planner's prices.",
        "",
        "| system | input tokens | rows | TTFT s | planned s | CPU compute s | CPU wait s | rest ms/layer "
        "| profile ms/layer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.itertuples():
        lines.append(
            f"| {r.system} | {r.input_tokens} | {r.rows} | {r.ttft_s:.3g} | {r.planned_s:.3g} | "
            f"{r.cpu_compute_s:.3g} | {r.cpu_wait_s:.3g} | {r.rest_per_layer_ms:.2f} | {r.profile_per_layer_ms:.2f} |"
        )
    return [*lines, ""]
