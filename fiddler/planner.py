"""Per-layer plans: where each routed expert runs, and how long the layer should take.

Contract: ``plan_layer(tokens, resident, policy, model, staging_slots)`` takes the tokens
routed to each expert of one layer and returns a ``LayerPlan``: resident experts run on the
accelerator; each missing expert runs on the CPU (its activations cross) or after a copy of
its weights, as the policy decides; ``predicted_s`` comes from ``predict_layer``, the one
timeline model that the engine, the benchmarks and the simulator share. Policies:

- ``paper``: per expert, the cheaper of CPU (activations both ways + compute) and copy +
  accelerator compute, as in Fiddler's paper.
- ``hybrid``: the CPU path and the copy path run at the same time; of the splits that give
  the CPU the experts with the fewest tokens, the one with the earliest predicted finish.
- ``cpu-experts`` / ``copy-experts``: every missing expert on the CPU / copied (ablations).

Timeline (``predict_layer``): the CPU path moves its experts' activations down in one
transfer, runs them one after another and moves the results up; the copy engine brings
copied experts in order, at most ``staging_slots`` ahead of the accelerator using them; the
accelerator runs resident experts first, then each copied expert once it has landed. When
both paths are busy, each runs at its calibrated concurrent slowdown. The layer finishes when
both paths have.
"""

from __future__ import annotations

import dataclasses

from fiddler.cost_model import LatencyModel

POLICIES = ("paper", "hybrid", "cpu-experts", "copy-experts")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    gpu: tuple[int, ...]  # resident experts that received tokens
    cpu: tuple[int, ...]
    copy: tuple[int, ...]  # in the order they are copied
    predicted_s: float


def predict_layer(
    tokens: dict[int, int],
    gpu: tuple[int, ...],
    cpu: tuple[int, ...],
    copy: tuple[int, ...],
    model: LatencyModel,
    staging_slots: int,
) -> float:
    both = bool(cpu) and bool(copy)
    cpu_tokens = sum(tokens[e] for e in cpu)
    cpu_compute = sum(model.cpu(tokens[e]) for e in cpu) * (model.cpu_slowdown if both else 1.0)
    cpu_end = (model.act_d2h(cpu_tokens) + cpu_compute + model.act_h2d(cpu_tokens)) if cpu else 0.0

    copy_time = model.copy * (model.copy_slowdown if both else 1.0)
    accelerator = sum(model.gpu(tokens[e]) for e in gpu)
    copy_end = 0.0
    compute_end: list[float] = []
    for i, expert in enumerate(copy):
        slot_free = compute_end[i - staging_slots] if i >= staging_slots else 0.0
        copy_end = max(copy_end, slot_free) + copy_time
        accelerator = max(accelerator, copy_end) + model.gpu(tokens[expert])
        compute_end.append(accelerator)
    return max(accelerator, cpu_end)


def plan_layer(
    tokens: dict[int, int],
    resident: set[int] | frozenset[int],
    policy: str,
    model: LatencyModel,
    staging_slots: int,
) -> LayerPlan:
    """tokens: expert -> number of tokens routed to it (experts with none are left out)."""
    if staging_slots < 1:
        raise ValueError("at least one staging slot is needed to run copied experts")
    gpu = tuple(sorted(e for e in tokens if e in resident))
    missing = sorted((e for e in tokens if e not in resident), key=lambda e: (tokens[e], e))

    def make(cpu: list[int], copy: list[int]) -> LayerPlan:
        copy_order = tuple(sorted(copy, key=lambda e: (-tokens[e], e)))  # big ones first: overlap
        cpu_order = tuple(sorted(cpu))
        return LayerPlan(
            gpu, cpu_order, copy_order, predict_layer(tokens, gpu, cpu_order, copy_order, model, staging_slots)
        )

    if policy == "cpu-experts":
        return make(missing, [])
    if policy == "copy-experts":
        return make([], missing)
    if policy == "paper":
        on_cpu = [e for e in missing if model.cpu_path(tokens[e]) <= model.copy_path(tokens[e])]
        return make(on_cpu, [e for e in missing if e not in on_cpu])
    if policy == "hybrid":
        candidates = [make(missing[:k], missing[k:]) for k in range(len(missing) + 1)]
        return min(candidates, key=lambda plan: plan.predicted_s)
    raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
