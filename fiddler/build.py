"""Build an engine from user-level options: the one place that turns a model, a device, a
GPU budget and a policy into a ready ``Engine``.

Contract: ``build_engine(options)`` returns ``(engine, record)``. ``record`` says what was
built (policy, placement, budget, calibration used) for run records. Policy ``resident``
puts the whole model on the device (graph-captured decode); the Fiddler policies plan a
placement under ``gpu_memory_gb`` (default on CUDA: free memory less a margin), calibrate
the latency model quickly at start-up unless a calibration file is given, and use the
popularity profile when one is given. When no policy is asked for, the whole model runs
resident if it fits the budget, else ``hybrid``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from fiddler.calibrate import QUICK_TOKEN_COUNTS, calibrate, calibration_matches, kernel_tiers, load_calibration
from fiddler.config import ModelConfig
from fiddler.cost_model import LatencyModel
from fiddler.cpu_experts import AUTO, CpuExpertKernel, set_cpu_threads, tiered_kernel
from fiddler.engine import Engine
from fiddler.orchestrator import THREAD
from fiddler.placement import budget_from_free_memory, load_popularity, plan_placement
from fiddler.planner import POLICIES
from fiddler.steadiness import recorded_problems
from fiddler.weights import open_weights

log = logging.getLogger(__name__)
RESIDENT = "resident"
QUICK_CALIBRATION_REPEATS = 3


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    config: ModelConfig
    max_seq_len: int  # prompt + new tokens: sizes the KV cache and the budget's workspace
    checkpoint: Path | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.bfloat16
    beam_width: int = 1
    gpu_memory_gb: float | None = None
    policy: str | None = None  # resident, or one of fiddler.planner.POLICIES; None: choose
    calibration: Path | None = None
    popularity: Path | None = None
    cpu_threads: int | None = None
    cpu_kernel: str = AUTO  # the calibration's choice, or a kernel it was measured with
    staging_experts: int = 2
    layer_timing: bool = False
    cpu_mode: str = THREAD  # how the CPU rows meet the main thread (fiddler.orchestrator.CPU_MODES)
    adapt_paths: bool = False  # learn where the CPU and copy paths end (fiddler.orchestrator)


def build_engine(options: EngineOptions) -> tuple[Engine, dict[str, object]]:
    cfg, device = options.config, torch.device(options.device)
    if options.policy not in (None, RESIDENT, *POLICIES):
        raise ValueError(f"--policy must be one of {RESIDENT}, {', '.join(POLICIES)}; got {options.policy!r}")
    threads = set_cpu_threads(options.cpu_threads)
    source = open_weights(cfg, options.checkpoint, options.seed, generator_device=device.type)
    record: dict[str, object] = {"weights": source.describe(), "device": device.type, "cpu_threads": threads}
    budget = options.gpu_memory_gb
    if budget is None and device.type == "cuda":
        budget = budget_from_free_memory(device)
        record["budget_source"] = "free memory less margin"
    record["gpu_memory_gb"] = budget
    if options.policy == RESIDENT or (options.policy is None and budget is None):
        return _resident(source, device, options, record)
    if budget is None:
        raise ValueError("a Fiddler policy on the CPU needs --gpu-memory-gb (the budget of the stand-in device)")
    popularity = load_popularity(options.popularity) if options.popularity else None
    placement = plan_placement(
        cfg, budget, options.dtype, options.max_seq_len, options.beam_width, options.staging_experts, popularity
    )
    record["placement"] = placement.to_json() | {"resident": None}  # the list is long; counts suffice
    if options.policy is None and placement.num_resident == cfg.num_expert_slots:
        return _resident(source, device, options, record)
    policy = options.policy or "hybrid"
    latency, cpu_kernel, record["calibration"] = latency_model(options, device)
    log.info(
        "placement: %d of %d experts on %s (%s order)",
        placement.num_resident,
        cfg.num_expert_slots,
        device.type,
        placement.order,
    )
    engine = Engine.fiddler(
        source,
        device,
        options.dtype,
        options.max_seq_len,
        placement,
        latency,
        policy,
        cpu_kernel,
        options.staging_experts,
        options.layer_timing,
        cpu_mode=options.cpu_mode,
        adapt_paths=options.adapt_paths,
    )
    record["policy"] = policy
    record["cpu_mode"] = options.cpu_mode
    record["adapt_paths"] = options.adapt_paths
    return engine, record


def _resident(source, device, options: EngineOptions, record: dict[str, object]) -> tuple[Engine, dict]:
    record["policy"] = RESIDENT
    return Engine.resident(source, device, options.dtype, options.max_seq_len), record


def latency_model(
    options: EngineOptions, device: torch.device
) -> tuple[LatencyModel, CpuExpertKernel, dict[str, object]]:
    """The latency model and the CPU kernel it was measured with, from a file or measured now,
    and where it came from (for the run's record); a file for another expert shape or kernel is
    refused, and one measured on a disturbed host is warned of."""
    if options.calibration is not None:
        calibration = load_calibration(options.calibration)
        mismatch = calibration_matches(calibration, options.config, options.dtype)
        if mismatch:
            raise ValueError(
                f"calibration {options.calibration} was measured for another expert shape ({mismatch}); "
                "run 'fiddler calibrate' for this model"
            )
        chosen = {name for _, name in kernel_tiers(calibration)}
        # torch is every native kernel's fallback beyond its token limit: not a choice of its own
        if options.cpu_kernel != AUTO and (chosen - {"torch"} or {"torch"}) != {options.cpu_kernel}:
            raise ValueError(
                f"calibration {options.calibration} was measured with the {calibration['cpu_kernel']} CPU kernel; "
                f"run 'fiddler calibrate --cpu-kernel {options.cpu_kernel}' to use that one"
            )
        source = {"file": str(options.calibration)}
    else:
        log.info("calibrating this machine quickly (pass --calibration FILE to reuse a full calibration)")
        calibration = calibrate(
            options.config,
            device,
            options.dtype,
            options.cpu_threads,
            options.cpu_kernel,
            QUICK_TOKEN_COUNTS,
            QUICK_CALIBRATION_REPEATS,
            options.seed,
        )
        # nothing else keeps a quick calibration: the run record carries it (without the machine)
        source = {"file": None, "quick": True, "measured": {k: v for k, v in calibration.items() if k != "machine"}}
    problems = recorded_problems(calibration)
    if problems:  # its latencies steer every split: a disturbed file misleads the policies
        log.warning(
            "calibration %s was measured on a disturbed host (%s): its policies follow wrong latencies; "
            "run 'fiddler calibrate' again on an idle host",
            options.calibration or "(quick)",
            "; ".join(problems),
        )
    tiers = kernel_tiers(calibration)
    kernel = tiered_kernel(tiers)
    source.update(
        copy_gb_per_s=calibration["copy_gb_per_s"],
        cpu_kernel=kernel.name,
        cpu_kernel_tiers=tiers,
        disturbed=problems,
    )
    return LatencyModel.from_calibration(calibration), kernel, source
