"""Per-layer plans: where each routed expert runs, and how long the layer should take.

Contract: ``plan_layer(tokens, resident, policy, model, staging_slots, blocks)`` takes the
tokens routed to each expert of one layer and returns a ``LayerPlan``: resident experts run on
the accelerator; each missing expert runs on the CPU (its activations cross) or after a copy
of its weights, as the policy decides, and ``hybrid`` may divide one expert between the two
(its first ``cpu_blocks`` of ``blocks`` on the CPU, the rest copied; see
``fiddler.expert_layout``). ``predicted_s`` comes from ``predict_layer``, the one timeline
model that the engine, the benchmarks and the simulator share. Policies:

- ``paper``: per expert, the cheaper of CPU (activations both ways + compute) and copy +
  accelerator compute, as in Fiddler's paper.
- ``hybrid``: the CPU path and the copy path run at the same time; the CPU takes the experts
  with the fewest tokens, whole or with one expert divided, whichever split is predicted to
  finish first.
- ``cpu-experts`` / ``copy-experts``: every missing expert on the CPU / copied (ablations).

Timeline (``predict_layer``): the CPU path waits for its rows' activations to come down (or,
given ``hidden_rows``, the whole pass's, as Fiddler's executor sends them all ahead of planning),
runs its experts one after another (a divided expert costs what the calibration measured for
that share) and moves the results up; the copy engine brings the divided expert's
remainder first, then whole experts, at most ``staging_slots`` ahead of the accelerator using
them; the accelerator runs resident experts first, then each copied one once it has landed.
When both paths are busy, each runs at its calibrated concurrent slowdown. Each path's end
is moved by the model's offsets for it (``cpu_offset_s``, ``copy_offset_s``: how late the run
measured that path against the rest of the model; zero unless the executor learned them). The
layer finishes when both paths have. A plan keeps, besides the layer's predicted end, when its
CPU path stops computing and when its last copy lands (``cpu_done_s``, ``copies_landed_s``),
against which the executor measures those offsets.
"""

from __future__ import annotations

import dataclasses
import math

from fiddler.cost_model import LatencyModel

COPY_EXPERTS = "copy-experts"  # the one policy that never computes on the CPU
HYBRID = "hybrid"  # both paths at once (the policy beyond the paper)
POLICIES = ("paper", HYBRID, "cpu-experts", COPY_EXPERTS)
BALANCE_NEIGHBOURS = 2  # block counts tried on each side of the proportional balance point


@dataclasses.dataclass(frozen=True)
class Split:
    expert: int
    cpu_blocks: int  # blocks [0, cpu_blocks) on the CPU, the rest copied
    blocks: int

    @property
    def cpu_fraction(self) -> float:
        return self.cpu_blocks / self.blocks


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    gpu: tuple[int, ...]  # resident experts that received tokens
    cpu: tuple[int, ...]  # whole experts on the CPU
    copy: tuple[int, ...]  # whole experts copied, in copy order
    predicted_s: float
    split: Split | None = None
    cpu_done_s: float = 0.0  # when the CPU path stops computing (0: no CPU path)
    copies_landed_s: float = 0.0  # when the last copy lands (0: no copies)


@dataclasses.dataclass(frozen=True)
class LayerTimeline:
    """When, by the model, a layer's CPU path stops computing, its last copy lands, and it ends."""

    cpu_done_s: float
    copies_landed_s: float
    end_s: float


def predict_layer(*args: object, **kwargs: object) -> float:
    """The layer's predicted seconds: ``layer_timeline``'s end, from the same arguments."""
    return layer_timeline(*args, **kwargs).end_s


def layer_timeline(
    tokens: dict[int, int],
    gpu: tuple[int, ...],
    cpu: tuple[int, ...],
    copy: tuple[int, ...],
    model: LatencyModel,
    staging_slots: int,
    split: Split | None = None,
    hidden_rows: int | None = None,
) -> LayerTimeline:
    both = bool(cpu or split) and bool(copy or split)
    cpu_slow = model.cpu_slowdown if both else 1.0
    copy_time = model.copy * (model.copy_slowdown if both else 1.0)
    cpu_rows = sum(tokens[e] for e in cpu) + (tokens[split.expert] if split else 0)
    cpu_compute = sum(model.cpu(tokens[e]) for e in cpu)
    if split:
        cpu_compute += model.cpu_part(tokens[split.expert], split.cpu_fraction)
    # the CPU path starts once the hidden states it reads are in host memory: its own rows, or
    # the whole pass's when the executor sends every row down ahead of planning
    down = cpu_rows if hidden_rows is None else hidden_rows
    cpu_done = (model.cpu_offset_s + model.act_d2h(down) + cpu_compute * cpu_slow) if cpu_rows else 0.0
    cpu_end = (cpu_done + model.act_h2d(cpu_rows)) if cpu_rows else 0.0

    # (copy seconds, accelerator seconds) per copied item, the divided expert's remainder first
    items = [(copy_time, model.gpu(tokens[e])) for e in copy]
    if split:
        rest = 1.0 - split.cpu_fraction
        items.insert(0, (copy_time * rest, model.gpu(tokens[split.expert]) * rest))
    accelerator = sum(model.gpu(tokens[e]) for e in gpu)
    copy_end = model.copy_offset_s if items else 0.0
    compute_end: list[float] = []
    for i, (copy_s, compute_s) in enumerate(items):
        # a slot not used before in the layer is free from its start (the offset may be negative)
        slot_free = compute_end[i - staging_slots] if i >= staging_slots else -math.inf
        copy_end = max(copy_end, slot_free) + copy_s
        accelerator = max(accelerator, copy_end) + compute_s
        compute_end.append(accelerator)
    return LayerTimeline(cpu_done, copy_end, max(accelerator, cpu_end))


def plan_layer(
    tokens: dict[int, int],
    resident: set[int] | frozenset[int],
    policy: str,
    model: LatencyModel,
    staging_slots: int,
    blocks: int = 1,
    hidden_rows: int | None = None,
) -> LayerPlan:
    """tokens: expert -> number of tokens routed to it (experts with none are left out);
    hidden_rows: the hidden-state rows the CPU path waits for (None: only its own rows)."""
    if staging_slots < 1:
        raise ValueError("at least one staging slot is needed to run copied experts")
    gpu = tuple(sorted(e for e in tokens if e in resident))
    missing = sorted((e for e in tokens if e not in resident), key=lambda e: (tokens[e], e))

    def make(cpu: list[int], copy: list[int], split: Split | None = None) -> LayerPlan:
        copy_order = tuple(sorted(copy, key=lambda e: (-tokens[e], e)))  # big ones first: overlap
        cpu_order = tuple(sorted(cpu))
        timeline = layer_timeline(tokens, gpu, cpu_order, copy_order, model, staging_slots, split, hidden_rows)
        return LayerPlan(
            gpu, cpu_order, copy_order, timeline.end_s, split, timeline.cpu_done_s, timeline.copies_landed_s
        )

    if policy == "cpu-experts":
        return make(missing, [])
    if policy == COPY_EXPERTS:
        return make([], missing)
    if policy == "paper":
        on_cpu = [e for e in missing if model.cpu_path(tokens[e]) <= model.copy_path(tokens[e])]
        return make(on_cpu, [e for e in missing if e not in on_cpu])
    if policy == HYBRID:
        whole = [make(missing[:k], missing[k:]) for k in range(len(missing) + 1)]
        candidates = list(whole)
        # Dividing expert k lies between the whole plans k and k + 1, both paths busy. There the
        # CPU path grows and the copy path shrinks with k (assumed: true of every calibration
        # measured, whose transfer terms are microseconds against milliseconds of CPU compute),
        # so the best division borders the best whole plan that keeps both busy (not the ends,
        # where one path runs alone and unslowed): only the experts on either side of it are
        # tried. The planner runs on the CPU path's critical path in every layer whose routing
        # is new; tests check this against trying every expert.
        both_busy = range(1, len(missing))
        pivot = min(both_busy, key=lambda k: whole[k].predicted_s) if both_busy else 0
        for k in (pivot - 1, pivot) if blocks > 1 else ():
            if 0 <= k < len(missing):
                for cpu_blocks in _balanced_blocks(tokens, missing[:k], missing[k], missing[k + 1 :], model, blocks):
                    candidates.append(make(missing[:k], missing[k + 1 :], Split(missing[k], cpu_blocks, blocks)))
        return min(candidates, key=lambda plan: plan.predicted_s)
    raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")


def _balanced_blocks(
    tokens: dict[int, int], cpu: list[int], divided: int, copied: list[int], model: LatencyModel, blocks: int
) -> set[int]:
    """Block counts around the share of ``divided`` that makes the CPU path and the copy path
    take equally long (both busy, each at its concurrent rate), estimated as if cost were
    proportional to the share; neighbours are included since it is not quite."""
    cpu_base = sum(model.cpu(tokens[e]) for e in cpu) * model.cpu_slowdown
    cpu_divided = model.cpu(tokens[divided]) * model.cpu_slowdown
    copy_one = model.copy * model.copy_slowdown
    lag = model.copy_offset_s - model.cpu_offset_s  # the copies' lateness beyond the CPU's
    share = (lag + copy_one + len(copied) * copy_one - cpu_base) / (cpu_divided + copy_one)
    share = min(max(share, 0.0), 1.0) * blocks
    low = math.floor(share)
    return {b for b in range(low - BALANCE_NEIGHBOURS, low + BALANCE_NEIGHBOURS + 2) if 0 < b < blocks}
