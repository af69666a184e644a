"""``make reproduce`` / ``make reproduce-quick``: the paper's sweep where a GPU is, a functional
sweep where none is.

Contract: on a machine with a CUDA GPU, the full plan runs full-size Mixtral-8x7B (bf16,
seeded random weights) at a 24 GB budget: ``single-batch`` on the ``paper-v3`` grid for every
system, ``long-prefill`` and ``beam-search`` for Fiddler's policies and the strongest
baselines, 3 prompts per cell, slow systems held to a per-run time limit (extrapolated cells
are marked); ``--quick`` runs a few-minute subset. Without a GPU it says so and runs the same
systems on the small preset on the CPU (float32, a budget that keeps about a fifth of the
experts resident, as 24 GB does for Mixtral-8x7B), which checks that everything runs and agrees
with the reference, not how fast the paper's hardware is. Both then write the simulated
reproduction on the paper's machines (``harness.simulate``: v1 grid on Environments 1 and 2 at
24 GB, v3 grid on the 48 GB Gen4 environment, the measured GPU host at 24 GB) under
``results/simulated/`` with the comparison against the paper's published figures
(``--simulated-only`` does just that, in seconds). Each measured part writes its own run
folder under ``results/`` (resumable).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from baselines import SYSTEMS
from fiddler.calibrate import DEFAULT_TOKEN_COUNTS, QUICK_TOKEN_COUNTS, calibrate, save_calibration
from fiddler.config import ModelConfig
from fiddler.files import read_json, write_json_atomic
from fiddler.placement import budget_breakdown
from harness.runner import SweepSpec, run_sweep
from harness.scenarios import cells

RESULTS = Path(__file__).resolve().parent.parent / "results"
GPU_MODEL, GPU_BUDGET_GB, CPU_MODEL = "mixtral-8x7b", 24.0, "mixtral-small"
RESIDENT_SHARE = 56 / 256  # the share of experts a 24 GB card holds for Mixtral-8x7B
FIDDLER = ("fiddler-paper", "fiddler-hybrid", "fiddler-cpu-experts", "fiddler-copy-experts")
STRONG_BASELINES = ("expert-lru", "expert-lru-prefetch", "layer-streaming", "cpu-only")
EVERY_SYSTEM = (*FIDDLER, *STRONG_BASELINES, "accelerate-offload")
RUN_TIME_LIMIT_S = 120.0
QUICK_RUN_TIME_LIMIT_S = 20.0  # reproduce-quick: slow systems measured over what fits, extrapolated
QUICK_PROMPTS_PER_CELL = 2  # reproduce-quick must fit one 10-minute device call with every load


def cpu_budget_gb(config: ModelConfig, max_seq_len: int) -> float:
    b = budget_breakdown(config, 0, torch.float32, max_seq_len, 1, staging_experts=2)
    experts = int(RESIDENT_SHARE * config.num_expert_slots)
    return (b.dense + b.kv_cache + b.staging + b.workspace + (experts + 0.5) * b.expert) / 1e9


def run_calibration(out: Path, config: ModelConfig, quick: bool, measured: Path | None) -> Path:
    """The run folder's calibration, kept beside its results: every Fiddler policy of the run
    plans with the same latencies, and a resumed run with the ones it started with. A folder
    without one gets a copy of ``measured`` (this invocation's), else a new measurement."""
    path = out / "calibration.json"
    if path.exists():
        return path
    if measured is not None:
        write_json_atomic(path, read_json(measured, f"{measured} vanished", "run again"))
        return path
    counts = QUICK_TOKEN_COUNTS if quick else DEFAULT_TOKEN_COUNTS
    save_calibration(calibrate(config, "cuda", torch.bfloat16, token_counts=counts), path)
    return path


def plan(gpu: bool, quick: bool) -> list[tuple[str, dict]]:
    if quick:
        single = {"scenario": "single-batch", "inputs": (32,), "outputs": (64,)}
        return [("quick", single | {"systems": (*FIDDLER[:2], "expert-lru", "layer-streaming", "cpu-only")})]
    return [
        ("single-batch", {"scenario": "single-batch", "grid": "paper-v3", "systems": EVERY_SYSTEM}),
        ("long-prefill", {"scenario": "long-prefill", "systems": (*FIDDLER[:2], "layer-streaming", "expert-lru")}),
        ("beam-search", {"scenario": "beam-search", "systems": (*FIDDLER[:2], *STRONG_BASELINES[:3])}),
    ]


SIMULATED = (  # (hardware profile, grid, budget GB)
    ("paper-env1", "paper-v1", 24.0),
    ("paper-env2", "paper-v1", 24.0),
    ("paper-env3", "paper-v3", 48.0),
    ("h200-host", "paper-v3", 24.0),
)
SIMULATED_SYSTEMS = (
    "fiddler-paper",
    "fiddler-hybrid",
    "layer-streaming",
    "expert-lru",
    "accelerate-offload",
    "cpu-only",
    "gpu-resident",
)


def simulated_reproduction(out_root: Path = RESULTS / "simulated") -> list[Path]:
    import pandas as pd

    from fiddler.files import write_json_atomic, write_text_atomic
    from harness.cli import write_csv_atomic
    from harness.report import PAPER_V1, SUMMARY_COLUMNS, comparison_markdown, paper_comparison, plot, tables_markdown
    from harness.simulate import SimulationSpec, load_profile, simulate

    written = []
    for hardware, grid, budget in SIMULATED:
        out = out_root / hardware
        spec = SimulationSpec(
            systems=SIMULATED_SYSTEMS,
            cells=tuple(cells("single-batch", grid)),
            config=ModelConfig.preset(GPU_MODEL),
            hardware=hardware,
            gpu_memory_gb=budget,
        )
        summary = pd.DataFrame(simulate(spec), columns=SUMMARY_COLUMNS)
        write_csv_atomic(summary, out / "summary.csv")
        profile, _ = load_profile(hardware)
        write_json_atomic(
            out / "env.json",
            {
                "hardware": hardware,
                "profile": profile.get("profile"),
                "grid": grid,
                "gpu_memory_gb": budget,
                "routing": "uniform",
            },
        )
        text = tables_markdown(summary)
        if hardware in PAPER_V1:
            text += "\n## Against the paper's published v1 figures\n\n" + comparison_markdown(
                paper_comparison(summary, hardware), hardware
            )
        write_text_atomic(out / "tables.md", text)
        plot(summary, out)
        written.append(out / "tables.md")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few-minute subset")
    parser.add_argument("--simulated-only", action="store_true", help="only the simulated reproduction")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"folder for the run folders (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.simulated_only:
        for path in simulated_reproduction():
            print(f"simulated: {path}")
        return 0
    gpu = torch.cuda.is_available()
    stamp = datetime.date.today().isoformat()
    if not gpu:
        print(
            "No CUDA GPU here: running the functional sweep on the CPU with the small preset. The paper's "
            "numbers need a GPU host (see README).",
            file=sys.stderr,
        )
    measured: Path | None = None  # one calibration per invocation, copied into each part's folder
    for part, settings in plan(gpu, args.quick):
        cell_list = cells(settings["scenario"], settings.get("grid"), settings.get("inputs"), settings.get("outputs"))
        if not gpu and settings["scenario"] == "long-prefill":
            cell_list = cells("long-prefill", inputs=(512, 1024))
        model = GPU_MODEL if gpu else CPU_MODEL
        config = ModelConfig.preset(model)
        longest = max(c.input_tokens + c.output_tokens for c in cell_list)
        systems = tuple(s for s in settings["systems"] if s in SYSTEMS)
        out = args.results / f"{stamp}_{'gpu' if gpu else 'cpu'}_{model}_{part}"
        spec = SweepSpec(
            systems=systems,
            cells=tuple(cell_list),
            model=model,
            out=out,
            device="cuda" if gpu else "cpu",
            dtype=torch.bfloat16 if gpu else torch.float32,
            gpu_memory_gb=GPU_BUDGET_GB if gpu else cpu_budget_gb(config, longest),
            prompts_per_cell=3 if gpu and not args.quick else QUICK_PROMPTS_PER_CELL,
            reference="transformers-resident" if gpu else "cpu-only",
            run_time_limit_s=(QUICK_RUN_TIME_LIMIT_S if args.quick else RUN_TIME_LIMIT_S) if gpu else None,
            calibration=run_calibration(out, config, args.quick, measured) if gpu else None,
        )
        measured = spec.calibration or measured
        print(f"{part}: {run_sweep(spec) / 'tables.md'}")
    for path in simulated_reproduction():
        print(f"simulated: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
