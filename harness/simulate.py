"""Predict every system on a hardware profile: the paper's machines, or a measured one.

Contract: ``simulate(spec)`` returns summary rows with the columns of a measured run's
``summary.csv`` (``source`` = simulated) for each system and scenario cell. Inputs: the model
config, a hardware profile (``load_profile``: a calibration-schema JSON with a ``hardware``
section and, for profiles written from specifications, every assumption and its source), the
GPU budget and routing statistics (uniform; a ``fiddler profile`` popularity file; or a
routing trace: a JSON list of steps, each a list of layers, each a list of per-token expert
lists). Nothing is fitted to published tokens/s.

The model of each system, per decoder layer and forward pass over T new tokens:
- dense part on the GPU: max(layer bytes / memory bandwidth, FLOPs / throughput) plus the
  profile's per-layer host overhead;
- Fiddler's policies: the engine's own placement (``fiddler.placement``), latency model
  (``fiddler.cost_model``) and planner (``fiddler.planner``): the planner's predicted time,
  plus the profile's host overhead around the CPU path in a layer whose plan uses the CPU
  (``cpu_path_overhead_s_by_tokens`` at the pass's tokens: the planner counts the CPU's compute
  and the activations' transfers, not the hand-off around them, which sorts, gathers and sends
  down every row of the pass and brings the results up, so it grows from a decode step's one
  token to a beam step's few and a prompt's many); in the prefill pass
  the plan (made as the engine makes it, from the calibration) is priced with the CPU's
  compute scaled by ``prefill_cpu_factor_by_rows`` at the layer's rows per routed expert
  (measured: a prefill CPU job against decode's in the same run);
- ``gpu-resident``: every expert on the GPU (refused when it does not fit);
- ``expert-lru``: the LRU cache replayed over the sampled routing (the baseline's own slot
  count, ``baselines.expert_lru.lru_slots``); each miss costs a pinned copy, copies serialised;
- ``layer-streaming``: max(layer bytes / pinned bandwidth, layer compute), double buffered;
- ``accelerate-offload``: the layers that do not fit copied from pageable memory, no overlap
  (the budget less the room the baseline keeps for transformers' decode-step expert copies);
- ``cpu-only``: dense part and routed experts on the CPU, the experts at the calibration's
  torch curve where it has one (the baseline is transformers on the CPU, not this
  project's native kernels, which set the calibration's main curve).
Decode steps are averaged over ``samples`` sampled steps; TTFT is one prefill of the input.
``expert-lru-prefetch`` is not simulated (its hits depend on hidden states, not statistics).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import math
import random
import statistics
from pathlib import Path
from typing import Any

import torch

from baselines.accelerate_offload import weights_allowance
from baselines.base import SystemOptions, SystemRefused
from baselines.expert_lru import spread_slots
from fiddler.calibrate import calibration_matches
from fiddler.config import ModelConfig
from fiddler.cost_model import LatencyModel
from fiddler.placement import GB, budget_breakdown, check_popularity, plan_placement
from fiddler.planner import COPY_EXPERTS, POLICIES, plan_layer, predict_layer
from harness.scenarios import Cell, runs

log = logging.getLogger(__name__)
PROFILES = Path(__file__).parent / "hardware"
BF16_BYTES = 2
STAGING_SLOTS = 2
HARDWARE_FIELDS = (
    "gpu_memory_gb",
    "gpu_mem_gb_per_s",
    "gpu_tflops",
    "h2d_pinned_gb_per_s",
    "h2d_pageable_gb_per_s",
    "cpu_mem_gb_per_s",
    "cpu_tflops",
    "step_overhead_per_layer_s",
)


@dataclasses.dataclass(frozen=True)
class CurveRule:
    pairs: str  # what x and y are
    zero_allowed: bool  # whether y may be 0
    example: str  # a valid curve, for the error message


# curves beside the numbers above: lists of [x, y] pairs, x strictly increasing, interpolated
# linearly and held flat beyond the first and last points
CURVES = {
    "prefill_cpu_factor_by_rows": CurveRule("[rows per expert, factor]", False, "[[1, 1.0]]: no change"),
    "cpu_path_overhead_s_by_tokens": CurveRule(
        "[tokens in the pass, seconds per layer]", True, "[[1, 0.0]]: no overhead"
    ),
}
SIMULATED_SYSTEMS = (
    *(f"fiddler-{p}" for p in POLICIES),
    "gpu-resident",
    "expert-lru",
    "layer-streaming",
    "accelerate-offload",
    "cpu-only",
)


@dataclasses.dataclass(frozen=True)
class Hardware:
    gpu_memory_gb: float
    gpu_mem_gb_per_s: float
    gpu_tflops: float
    h2d_pinned_gb_per_s: float
    h2d_pageable_gb_per_s: float
    cpu_mem_gb_per_s: float
    cpu_tflops: float
    step_overhead_per_layer_s: float
    # (rows per expert, factor): a prefill CPU job's compute against decode's at the same
    # calibration
    prefill_cpu_factor_by_rows: tuple[tuple[float, float], ...] = ((1.0, 1.0),)
    # (tokens in the pass, seconds): the host's work around the CPU path in a layer that uses it
    cpu_path_overhead_s_by_tokens: tuple[tuple[float, float], ...] = ((1.0, 0.0),)

    def prefill_cpu_factor(self, rows_per_expert: float) -> float:
        """The prefill CPU factor at this many rows per routed expert (the layer's rows over every
        expert it routed to, resident or not, as the curve was measured)."""
        return _interpolate(self.prefill_cpu_factor_by_rows, rows_per_expert)

    def cpu_path_overhead(self, tokens: float) -> float:
        """Seconds of host work around the CPU path of a layer whose plan uses it, in a pass over
        this many tokens (decode: 1; a beam step: the width; a prefill: the prompt)."""
        return _interpolate(self.cpu_path_overhead_s_by_tokens, tokens)


def _interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    """The curve's value at x: linear between its points, flat beyond its ends."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.json"))


def load_profile(name_or_path: str) -> tuple[dict, Hardware]:
    path = PROFILES / f"{name_or_path}.json" if name_or_path in profile_names() else Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"--hardware {name_or_path!r} is neither a profile ({', '.join(profile_names())}) nor a file"
        )
    data = json.loads(path.read_text())
    validate_profile(data, str(path))
    section = data["hardware"]
    curves = {name: tuple((float(x), float(y)) for x, y in section[name]) for name in CURVES}
    return data, Hardware(**{k: float(section[k]) for k in HARDWARE_FIELDS}, **curves)


def profile_with_calibration(name_or_path: str, calibration_path: str | Path) -> tuple[dict, Hardware]:
    """A measured machine's profile with a run's own calibration in place of the profile's
    measured latencies: the hardware section stays, every calibrated key comes from the file."""
    from fiddler.calibrate import load_calibration

    data, hw = load_profile(name_or_path)
    merged = load_calibration(calibration_path) | {
        "hardware": data["hardware"],
        "profile": {"measured": True, "hardware_from": name_or_path, "calibration": str(calibration_path)},
    }
    validate_profile(merged, f"{name_or_path} with {calibration_path}")
    return merged, hw


def validate_profile(data: dict, where: str) -> None:
    """A profile is a calibration (schema fiddler-calibration) with a complete hardware section,
    and, unless measured, the assumptions it rests on."""
    if data.get("schema") != "fiddler-calibration":
        raise ValueError(f"{where} is not a calibration-schema profile")
    missing = [
        k for k in ("token_counts", "cpu_expert_s", "gpu_expert_s", "copy_expert_s", "concurrent") if k not in data
    ]
    hardware = data.get("hardware", {})
    missing += [f"hardware.{k}" for k in (*HARDWARE_FIELDS, *CURVES) if k not in hardware]
    if missing:
        raise ValueError(f"{where} lacks {missing}: add them (see harness/hardware/*.json)")
    for name, rule in CURVES.items():
        _check_curve(hardware[name], f"{where}: hardware.{name}", rule)
    profile = data.get("profile", {})
    if not profile.get("measured", False) and not profile.get("assumptions"):
        raise ValueError(f"{where} is written from specifications but states no assumptions")
    for key in ("cpu_expert_s", "gpu_expert_s"):
        if len(data[key]) != len(data["token_counts"]) or min(data[key]) <= 0:
            raise ValueError(f"{where}: {key} must give a positive time for every token count")


def _check_curve(curve: Any, where: str, rule: CurveRule) -> None:
    def is_number(v: object) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    pairs_ok = (
        isinstance(curve, list)
        and bool(curve)
        and all(isinstance(p, list) and len(p) == 2 and all(is_number(v) for v in p) for p in curve)
    )
    if pairs_ok:
        xs, ys = [p[0] for p in curve], [p[1] for p in curve]
        if xs == sorted(set(xs)) and min(xs) > 0 and min(ys) >= 0 and (rule.zero_allowed or min(ys) > 0):
            return
    value = "every value non-negative, x positive" if rule.zero_allowed else "every value positive"
    raise ValueError(
        f"{where} must list {rule.pairs} pairs of finite numbers, x strictly increasing, {value} (e.g. {rule.example})"
    )


class RoutingSampler:
    """Expert choices per (step, layer): uniform, by popularity, or replayed from a trace."""

    def __init__(self, config: ModelConfig, source: str, seed: int = 0):
        self.config, self.rng = config, random.Random(seed)
        self.weights: list[list[float]] | None = None
        self.trace: list | None = None
        self.kind = "uniform"
        if source != "uniform":
            data = json.loads(Path(source).read_text())
            if isinstance(data, dict) and "counts" in data:
                check_popularity(config, data["counts"])
                self.weights, self.kind = data["counts"], "popularity"
            elif isinstance(data, list):
                self.trace, self.kind = data, "trace"
            else:
                raise ValueError(f"{source} is neither a popularity profile nor a routing trace")
        self._step = 0

    def step(self, num_tokens: int) -> list[dict[int, int]]:
        """Per layer: expert -> tokens routed to it, for one forward pass over ``num_tokens``."""
        cfg = self.config
        layers = []
        for layer in range(cfg.num_layers):
            counts: collections.Counter = collections.Counter()
            for token in range(num_tokens):
                counts.update(self._choose(layer, token))
            layers.append(dict(counts))
        self._step += 1
        return layers

    def _choose(self, layer: int, token: int) -> list[int]:
        k, experts = self.config.num_experts_per_token, range(self.config.num_experts)
        if self.trace is not None:
            step = self.trace[self._step % len(self.trace)]
            choices = step[layer]
            return list(choices[token % len(choices)])
        if self.weights is None:
            return self.rng.sample(experts, k)
        pool, weights, chosen = list(experts), list(self.weights[layer]), []
        for _ in range(k):
            pick = self.rng.choices(range(len(pool)), weights=[w + 1e-9 for w in weights])[0]
            chosen.append(pool.pop(pick))
            weights.pop(pick)
        return chosen


@dataclasses.dataclass(frozen=True)
class SimulationSpec:
    systems: tuple[str, ...]
    cells: tuple[Cell, ...]
    config: ModelConfig
    hardware: str
    gpu_memory_gb: float
    routing: str = "uniform"
    samples: int = 8
    seed: int = 0
    calibration: str | None = None  # a run's calibration file, replacing the profile's latencies
    # (system, CPU curve scale, CPU slowdown beside copies) that a run's executor learned: the
    # plans are then made as that run's were (an explanation of a measured run, not a prediction)
    cpu_corrections: tuple[tuple[str, float, float], ...] = ()


class _Simulator:
    def __init__(self, spec: SimulationSpec, calibration: dict, hw: Hardware):
        self.spec, self.cfg, self.hw = spec, spec.config, hw
        self.model = LatencyModel.from_calibration(calibration)
        self.corrected = {name: self.model.with_cpu_factor(f, d) for name, f, d in spec.cpu_corrections}
        self.torch_cpu_model = self._torch_cpu_model(calibration)
        self.blocks = int(calibration.get("split_blocks", 1))
        self.expert_bytes = self.cfg.expert_params * BF16_BYTES
        self.layer_dense_bytes = self.cfg.layer_dense_params * BF16_BYTES

    def _torch_cpu_model(self, calibration: dict) -> LatencyModel:
        """The latency model with the calibration's torch CPU curve (what transformers runs on
        the CPU); the main curve where the calibration measured no whole torch curve."""
        torch_curve = calibration.get("cpu_kernel_curves_s", {}).get("torch")
        if torch_curve and None not in torch_curve:
            return dataclasses.replace(self.model, cpu_expert_s=list(torch_curve))
        if calibration.get("cpu_kernel", "torch") != "torch":
            log.warning(
                "the calibration has no whole torch CPU curve: cpu-only is priced at the %s kernel's, "
                "faster than transformers on the CPU",
                calibration["cpu_kernel"],
            )
        return self.model

    # ---- shared costs -------------------------------------------------------------------

    def dense_layer_s(self, tokens: int, kv_len: int, on_cpu: bool = False) -> float:
        cfg = self.cfg
        flops = 2 * cfg.layer_dense_params * tokens + 4 * tokens * kv_len * cfg.q_size
        bandwidth, tflops = (
            (self.hw.cpu_mem_gb_per_s, self.hw.cpu_tflops) if on_cpu else (self.hw.gpu_mem_gb_per_s, self.hw.gpu_tflops)
        )
        return (
            max(self.layer_dense_bytes / (bandwidth * GB), flops / (tflops * 1e12)) + self.hw.step_overhead_per_layer_s
        )

    def head_s(self, tokens: int, on_cpu: bool = False) -> float:
        bytes_ = self.cfg.vocab_size * self.cfg.hidden_size * BF16_BYTES
        bandwidth = self.hw.cpu_mem_gb_per_s if on_cpu else self.hw.gpu_mem_gb_per_s
        return bytes_ / (bandwidth * GB)

    def budget_bytes(self) -> int:
        return int(self.spec.gpu_memory_gb * GB)

    # ---- systems: each returns (seconds of one forward pass, counters) --------------------

    def forward(
        self, system: str, layers: list[dict[int, int]], tokens: int, kv_len: int, state: dict, prefill: bool = False
    ) -> tuple:
        on_cpu = system == "cpu-only"
        total = self.head_s(tokens, on_cpu)
        hits = rows = h2d = 0
        for layer, routed in enumerate(layers):
            moe, layer_hits, layer_h2d = self.moe_layer(system, layer, routed, state, tokens, prefill)
            dense = self.dense_layer_s(tokens, kv_len, on_cpu)
            if system == "layer-streaming":  # the next layer's copy runs under this layer's compute
                total += max(state["layer_bytes"] / (self.hw.h2d_pinned_gb_per_s * GB), dense + moe)
            else:
                total += dense + moe
            hits += layer_hits
            rows += sum(routed.values())
            h2d += layer_h2d
        if system == "layer-streaming" and not state.get("streamed"):  # the very first layer's copy
            total += state["layer_bytes"] / (self.hw.h2d_pinned_gb_per_s * GB)  # is not hidden; later
            state["streamed"] = True  # passes find it prefetched during the previous pass's last layer
        return total, hits, rows, h2d

    def moe_layer(
        self, system: str, layer: int, routed: dict[int, int], state: dict, tokens: int, prefill: bool = False
    ) -> tuple[float, int, int]:
        m = self.model
        if system.startswith("fiddler-") or system == "gpu-resident":
            resident = state["resident"][layer]
            policy = system.removeprefix("fiddler-") if system != "gpu-resident" else COPY_EXPERTS
            # the executor sends every row of the pass down when its policy may use the CPU
            down = tokens if policy != COPY_EXPERTS else None
            model = self.corrected.get(system, m)
            plan = plan_layer(routed, resident, policy, model, STAGING_SLOTS, self.blocks, down)
            predicted = plan.predicted_s
            if prefill and (plan.cpu or plan.split):  # planned as the engine would, priced at prefill's CPU speed
                factor = self.hw.prefill_cpu_factor(sum(routed.values()) / len(routed))
                if factor != 1.0:  # (1.0: the plan's own price)
                    priced = model.with_cpu_factor(factor)
                    predicted = predict_layer(
                        routed, plan.gpu, plan.cpu, plan.copy, priced, STAGING_SLOTS, plan.split, down
                    )
            hits = sum(routed[e] for e in plan.gpu)
            copied = len(plan.copy) + ((self.blocks - plan.split.cpu_blocks) / self.blocks if plan.split else 0)
            # the host work around a CPU job (hand-off, gathering rows, results up) that the
            # planner does not count: the plan is the engine's, its price the host's
            handoff = self.hw.cpu_path_overhead(tokens) if plan.cpu or plan.split else 0.0
            return predicted + handoff, hits, int(copied * self.expert_bytes)
        if system == "expert-lru":  # as baselines.expert_lru: hits first, then misses in order
            cache: collections.OrderedDict = state["lru"][layer]
            needed = sorted(routed)
            hit_experts = [e for e in needed if e in cache]
            time = sum(m.gpu(routed[e]) for e in hit_experts)
            for expert in hit_experts:
                cache.move_to_end(expert)
            pending = {e for e in needed if e not in cache}
            for expert in sorted(pending):
                if len(cache) >= state["slots"][layer]:  # evict the least recent expert this layer no longer needs
                    victim = next(e for e in cache if e not in pending)
                    del cache[victim]
                cache[expert] = True
                pending.discard(expert)
                time += m.copy + m.gpu(routed[expert])
            misses = len(needed) - len(hit_experts)
            return time, sum(routed[e] for e in hit_experts), misses * self.expert_bytes
        if system == "layer-streaming":  # compute only; forward() overlaps it with the copy
            return sum(m.gpu(n) for n in routed.values()), sum(routed.values()), state["layer_bytes"]
        if system == "accelerate-offload":
            compute = sum(m.gpu(n) for n in routed.values())
            if layer < state["layers_on_gpu"]:
                return compute, sum(routed.values()), 0
            return compute + state["layer_bytes"] / (self.hw.h2d_pageable_gb_per_s * GB), 0, state["layer_bytes"]
        if system == "cpu-only":
            return sum(self.torch_cpu_model.cpu(n) for n in routed.values()), 0, 0
        raise ValueError(f"system {system!r} is not simulated; choose from {', '.join(SIMULATED_SYSTEMS)}")

    def setup(self, system: str, max_seq_len: int, beams: int) -> tuple[dict, str | None]:
        cfg, budget = self.cfg, self.budget_bytes()
        b = budget_breakdown(cfg, budget, torch.bfloat16, max_seq_len, beams, staging_experts=0)
        layer_bytes = self.layer_dense_bytes + cfg.num_experts * self.expert_bytes
        state: dict = {"layer_bytes": layer_bytes}
        if system.startswith("fiddler-"):
            try:
                placement = plan_placement(
                    cfg, self.spec.gpu_memory_gb, torch.bfloat16, max_seq_len, beams, STAGING_SLOTS
                )
            except ValueError as err:
                return state, str(err)
            state["resident"] = [placement.resident_in_layer(layer) for layer in range(cfg.num_layers)]
            state["peak_gb"] = self.spec.gpu_memory_gb
        elif system == "gpu-resident":
            needed = b.dense + b.kv_cache + b.workspace + cfg.num_expert_slots * b.expert
            if needed > budget:
                return state, f"gpu-resident needs {needed / GB:.3g} GB"
            state["resident"] = [set(range(cfg.num_experts))] * cfg.num_layers
            state["peak_gb"] = needed / GB
        elif system == "expert-lru":
            slots = spread_slots(b.for_experts // b.expert, cfg.num_layers, cfg.num_experts)  # the baseline's rule
            if min(slots) < 1:
                return state, "expert-lru: no expert slot per layer fits"
            state["slots"] = slots
            state["lru"] = [collections.OrderedDict((e, True) for e in range(count)) for count in slots]
        elif system == "layer-streaming":
            needed = 2 * layer_bytes + 2 * cfg.vocab_size * cfg.hidden_size * BF16_BYTES + b.kv_cache + b.workspace
            if needed > budget:
                return state, f"layer-streaming needs {needed / GB:.3g} GB"
        elif system == "accelerate-offload":
            # the baseline's own allowance for weights (room kept for generate's decode copies)
            options = SystemOptions(config=cfg, max_seq_len=max_seq_len, dtype=torch.bfloat16, beam_width=beams)
            try:
                allowance = weights_allowance(options, budget)
            except SystemRefused:
                allowance = 0
            for_weights = allowance - 2 * cfg.vocab_size * cfg.hidden_size * BF16_BYTES
            state["layers_on_gpu"] = max(0, min(cfg.num_layers, for_weights // layer_bytes - 1))  # one for offload
        return state, None


def simulate(spec: SimulationSpec) -> list[dict]:
    if spec.calibration:
        calibration, hw = profile_with_calibration(spec.hardware, spec.calibration)
        # the shape must match; the simulator itself models bf16 weights whatever the run's dtype
        mismatch = calibration_matches(calibration, spec.config, getattr(torch, calibration["model"]["dtype"]))
        if mismatch:
            raise ValueError(f"{spec.calibration} was measured for another expert shape ({mismatch})")
    else:
        calibration, hw = load_profile(spec.hardware)
    sim = _Simulator(spec, calibration, hw)
    rows = []
    for system in spec.systems:
        for run in runs(list(spec.cells)):
            longest = run.input_tokens + run.output_tokens
            state, refusal = sim.setup(system, longest, run.beam_width)
            base = {
                "system": system,
                "scenario": run.scenario,
                "model": spec.config.name,
                "num_layers": spec.config.num_layers,
                "dtype": "bfloat16",
                "device": f"simulated:{spec.hardware}",
                "gpu_memory_gb": spec.gpu_memory_gb,
                "source": "simulated",
                "prompts": None,  # sampled steps, not prompts: see steps_measured
            }
            if refusal:
                rows += [
                    base
                    | {
                        "input_tokens": c.input_tokens,
                        "output_tokens": c.output_tokens,
                        "beam_width": c.beam_width,
                        "status": "refused",
                    }
                    for c in run.cells
                ]
                continue
            sampler = RoutingSampler(spec.config, spec.routing, spec.seed)
            ttft, prefill_hits, prefill_rows, prefill_h2d = sim.forward(
                system, sampler.step(run.input_tokens), run.input_tokens, run.input_tokens, state, prefill=True
            )
            steps, hit_rows, all_rows, decode_h2d = [], 0, 0, 0
            for i in range(spec.samples):
                kv_len = run.input_tokens + 1 + i * max(1, run.output_tokens // spec.samples)
                seconds, hits, routed, h2d = sim.forward(
                    system, sampler.step(run.beam_width), run.beam_width, kv_len, state
                )
                steps.append(seconds)
                hit_rows, all_rows, decode_h2d = hit_rows + hits, all_rows + routed, decode_h2d + h2d
            step = statistics.mean(steps)
            step_h2d = decode_h2d / spec.samples
            step_hits, step_rows = hit_rows / spec.samples, all_rows / spec.samples
            tracks_hits = system != "layer-streaming"  # it streams every expert: no cache to hit
            for cell in run.cells:
                decode = step * (cell.output_tokens - 1)
                steps_after = cell.output_tokens - 1
                rows_total = prefill_rows + step_rows * steps_after
                rows.append(
                    base
                    | {
                        "input_tokens": cell.input_tokens,
                        "output_tokens": cell.output_tokens,
                        "beam_width": cell.beam_width,
                        "ttft_s": ttft,
                        "decode_tokens_per_s": 1 / step if cell.output_tokens > 1 else None,
                        "e2e_tokens_per_s": cell.output_tokens / (ttft + decode),
                        # as a measured run: the whole generation (prefill and decode)
                        "gpu_hit_rate": (prefill_hits + step_hits * steps_after) / rows_total
                        if tracks_hits and rows_total
                        else None,
                        "h2d_bytes_per_token": (prefill_h2d + step_h2d * steps_after)
                        / (cell.input_tokens + cell.output_tokens),
                        "peak_gpu_memory_gb": state.get("peak_gb", spec.gpu_memory_gb),
                        "status": "ok",
                        "steps_measured": spec.samples,
                    }
                )
    return rows
