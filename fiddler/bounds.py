"""Bandwidth bounds of decode: how fast the missing experts' weights can move at best.

Contract: ``missing_experts_s(model, experts)`` is the least time, under a calibration
(``fiddler.cost_model.LatencyModel``), to run ``experts`` missing experts at one token each when
the work may be divided freely between the CPU path (reading the weights in host memory) and
the copy path (moving them to the accelerator): the faster of either path alone and both at
once at their calibrated concurrent slowdowns. ``decode_bound_tokens_per_s(config, model,
gpu_hit_rate)`` is single-batch decode's bound from it: every layer's routed experts that the
accelerator does not hold (``1 - gpu_hit_rate`` of ``num_layers * num_experts_per_token``) at
that least time, and nothing else (dense part, resident experts and per-layer overheads count
as free), so any real decode is slower. Issue 8 holds ``fiddler-hybrid`` to 85% of it.
``prefill_copy_bound_s(config, model, resident)`` is issue 8's yardstick for a long prefill:
every expert the accelerator does not hold copied once at the calibrated copy time (a long
prompt routes tokens to every expert), the time a copy-only prefill cannot beat; Fiddler is
held to 1.2x of it, using the CPU path for experts with few tokens.

``same_window_model(calibration)`` is the calibration's model with the copies' slowdown taken
in the window where the CPU's was measured (``concurrent.copy_slowdown_same_window``): both
paths' rates at one moment, where the calibration's own pair comes from two windows, each
path timed while the other loads the host's memory. Its bound tells whether the host gives both
rates at once; issue 8's target stays on the calibration's bound. None for files without it.
"""

from __future__ import annotations

import dataclasses
import math

from fiddler.config import ModelConfig
from fiddler.cost_model import LatencyModel

DECODE_TOKENS = 1  # one token per routed expert in single-batch decode


def missing_experts_s(model: LatencyModel, experts: float) -> float:
    """Least seconds for ``experts`` missing experts (one token each), divided freely."""
    if experts <= 0:
        return 0.0
    cpu_alone = model.cpu(DECODE_TOKENS)
    copy_alone = model.copy
    if cpu_alone <= 0 or copy_alone <= 0:
        raise ValueError(
            f"the calibration's CPU expert ({cpu_alone} s) and copy ({copy_alone} s) times must be positive: "
            "calibrate again"
        )
    both = 1.0 / (1.0 / (cpu_alone * model.cpu_slowdown) + 1.0 / (copy_alone * model.copy_slowdown))
    return experts * min(cpu_alone, copy_alone, both)


def decode_bound_tokens_per_s(config: ModelConfig, model: LatencyModel, gpu_hit_rate: float) -> float:
    """Upper bound on single-batch decode tokens/s from the missing experts' bytes alone."""
    if not 0.0 <= gpu_hit_rate <= 1.0:
        raise ValueError(f"gpu_hit_rate must lie in [0, 1], got {gpu_hit_rate}")
    missing = config.num_layers * config.num_experts_per_token * (1.0 - gpu_hit_rate)
    seconds = missing_experts_s(model, missing)
    return math.inf if seconds == 0 else 1.0 / seconds


def same_window_model(calibration: dict[str, object]) -> LatencyModel | None:
    """The calibration's model with both paths' slowdowns from one window (the module's contract)."""
    slowdown = (calibration.get("concurrent") or {}).get("copy_slowdown_same_window")
    if slowdown is None:
        return None
    return dataclasses.replace(LatencyModel.from_calibration(calibration), copy_slowdown=float(slowdown))


def prefill_copy_bound_s(config: ModelConfig, model: LatencyModel, resident: int) -> float:
    """Seconds to copy every expert the accelerator does not hold, once, at the calibrated rate."""
    if not 0 <= resident <= config.num_expert_slots:
        raise ValueError(f"resident experts must lie in [0, {config.num_expert_slots}], got {resident}")
    return (config.num_expert_slots - resident) * model.copy
