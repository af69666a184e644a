"""Where single-batch decode's time goes against the bandwidth bound, by simulation.

Issue 8 holds ``fiddler-hybrid``'s decode to 85% of the bound from the missing experts' bytes
alone (``fiddler.bounds``); the measured 24 GB sweep reaches 64-74% of it (medians over
prompts). This script asks the simulator (``harness.simulate``, the engine's own planner priced
on a run's calibration) what each term it adds beyond the bound costs, by removing them one at
a time, cumulatively:

1. as modelled (the profile's terms, the calibration as measured);
2. without the host work around the CPU path (``cpu_path_overhead_s_by_tokens`` at 0);
3. also without the per-layer host overhead every system pays (``step_overhead_per_layer_s`` 0);
4. also without the two paths' slowdown beside each other (the calibration's concurrent
   slowdowns at 1; the bound itself assumes them, so this row may pass 100%).

Each row: decode tokens/s, ms per decoder layer, and its share of the bound (the given
calibration's at the simulated generation's GPU hit rate, prefill included: decode's own
differs by under 0.1 points under uniform routing). What step 3 leaves is the paths' slowdown
(step 4), the plan's granularity (an expert is divided in the calibration's blocks), the
accelerator's work on copied experts after they land and the dense part. A what-if of the
model, not a measurement: it says how much each term would buy if it were removed, as far as
the simulator prices the engine correctly (see each run folder's validation.md).

Usage: python experiments/decode_gap.py --calibration results/h200-paper-v3-24gb/calibration.json
    [--hardware h200-host] [--system fiddler-hybrid] [--gpu-memory-gb 24] [--inputs 64]
    [--outputs 512] [--samples 16] [--model mixtral-8x7b] [--out FILE]   (markdown on stdout or FILE)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

from fiddler.bounds import decode_bound_tokens_per_s
from fiddler.config import ModelConfig
from fiddler.cost_model import LatencyModel
from fiddler.files import write_text_atomic
from harness.scenarios import cells
from harness.simulate import SimulationSpec, load_profile, simulate

NO_HANDOFF = [[1, 0.0]]  # the hand-off curve at zero for every pass
NO_OVERHEAD = 0.0
NO_SLOWDOWN = {"cpu_slowdown": 1.0, "copy_slowdown": 1.0}  # each path as fast beside the other as alone
# (name, hardware fields set, whether the calibration's concurrent slowdowns are removed)
STEPS: tuple[tuple[str, dict, bool], ...] = (
    ("as modelled", {}, False),
    ("without the host work around the CPU path", {"cpu_path_overhead_s_by_tokens": NO_HANDOFF}, False),
    ("also without the per-layer host overhead", {"step_overhead_per_layer_s": NO_OVERHEAD}, False),
    ("also without the paths' slowdown beside each other", {}, True),
)


def decode_gap(
    hardware: str,
    calibration: str | Path,
    config: ModelConfig,
    system: str = "fiddler-hybrid",
    gpu_memory_gb: float = 24.0,
    inputs: int = 64,
    outputs: int = 512,
    samples: int = 16,
) -> list[dict]:
    """One row per step above: its name, decode tokens/s, ms per decoder layer and share of the
    bound (the run's calibration as measured, at the first step's simulated GPU hit rate)."""
    profile = copy.deepcopy(load_profile(hardware)[0])
    measured = json.loads(Path(calibration).read_text())
    rows, bound = [], None
    with tempfile.TemporaryDirectory() as scratch:
        for name, removed, no_slowdown in STEPS:
            profile["hardware"].update(removed)  # cumulative: each step keeps the previous ones
            calibrated = copy.deepcopy(measured)
            if no_slowdown:  # the last step: nothing after it to keep it for
                calibrated["concurrent"] = calibrated["concurrent"] | NO_SLOWDOWN
            hardware_file, calibration_file = Path(scratch) / "profile.json", Path(scratch) / "calibration.json"
            hardware_file.write_text(json.dumps(profile))
            calibration_file.write_text(json.dumps(calibrated))
            spec = SimulationSpec(
                systems=(system,),
                cells=tuple(cells("single-batch", inputs=(inputs,), outputs=(outputs,))),
                config=config,
                hardware=str(hardware_file),
                gpu_memory_gb=gpu_memory_gb,
                samples=samples,
                calibration=str(calibration_file),
            )
            (row,) = simulate(spec)
            if bound is None:
                bound = decode_bound_tokens_per_s(config, LatencyModel.from_calibration(measured), row["gpu_hit_rate"])
            tokens_per_s = row["decode_tokens_per_s"]
            rows.append(
                {
                    "step": name,
                    "decode_tokens_per_s": tokens_per_s,
                    "ms_per_layer": 1e3 / tokens_per_s / config.num_layers,
                    "share_of_bound": tokens_per_s / bound,
                    "bound_tokens_per_s": bound,
                    "gpu_hit_rate": row["gpu_hit_rate"],
                }
            )
    return rows


def markdown(rows: list[dict], system: str, command: str, setting: str) -> str:
    lines = [
        f"# {system}'s decode against the bandwidth bound, by simulation",
        "",
        f"`{command}` ({setting}): bound {rows[0]['bound_tokens_per_s']:.2f} tokens/s (`fiddler.bounds`, "
        f"this calibration, at the simulated generation's GPU hit rate {rows[0]['gpu_hit_rate']:.1%}, "
        "prefill included). "
        "Steps are cumulative; a what-if of the model, not a measurement.",
        "",
        "| step | decode tokens/s | ms per layer | share of bound |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['step']} | {r['decode_tokens_per_s']:.2f} | {r['ms_per_layer']:.2f} | {r['share_of_bound']:.0%} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", required=True, help="the run's calibration.json")
    parser.add_argument("--hardware", default="h200-host", help="a profile name or file")
    parser.add_argument("--system", default="fiddler-hybrid")
    parser.add_argument("--gpu-memory-gb", type=float, default=24.0)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--outputs", type=int, default=512)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--out", help="markdown file (default: stdout)")
    args = parser.parse_args(argv)
    if not Path(args.calibration).exists():
        parser.error(f"--calibration {args.calibration} does not exist: give a run folder's calibration.json")
    rows = decode_gap(
        args.hardware,
        args.calibration,
        ModelConfig.preset(args.model),
        args.system,
        args.gpu_memory_gb,
        args.inputs,
        args.outputs,
        args.samples,
    )
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    setting = (
        f"{args.inputs} tokens in, {args.outputs} out, {args.gpu_memory_gb:g} GB, "
        f"{args.samples} sampled decode steps, profile {args.hardware}"
    )
    text = markdown(rows, args.system, f"python experiments/decode_gap.py {shown}", setting)
    if args.out:
        write_text_atomic(Path(args.out), text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
