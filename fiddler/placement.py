"""Which experts live on the GPU under a memory budget.

Contract: ``plan_placement`` accounts, in bytes of the run's dtype, for everything the engine
allocates on the GPU besides resident experts: the non-expert weights, the KV cache for the
run's maximum sequence length and beam width, staging buffers for copied experts, and the
workspace of one forward pass over the longest chunk of tokens. What is left holds experts,
filled in popularity order (from a profile) or, without one, spread evenly over the layers.
A budget too small for the non-expert part raises one ``ValueError`` that says how much is
needed. Budgets are in GB of 1e9 bytes. ``budget_from_free_memory`` fits the machine: the
GPU's free memory less ``FREE_MEMORY_MARGIN``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fiddler.config import ModelConfig
from fiddler.files import read_json

GB = 1e9
# Left out of an automatic budget: the CUDA context and allocator fragmentation, which torch's
# allocation counters do not see.
FREE_MEMORY_MARGIN = 1.5 * GB
# Live activations per token in one forward pass, in hidden-size vectors: the residual stream,
# its normalised copy, the MoE output and the attention output.
RESIDUAL_COPIES = 4


@dataclasses.dataclass(frozen=True)
class BudgetBreakdown:
    budget: int
    dense: int
    kv_cache: int
    staging: int
    workspace: int
    expert: int  # bytes of one expert

    @property
    def for_experts(self) -> int:
        return self.budget - self.dense - self.kv_cache - self.staging - self.workspace

    def to_json(self) -> dict[str, float]:
        fields = dataclasses.asdict(self)
        return {f"{k}_gb": v / GB for k, v in fields.items()} | {"for_experts_gb": self.for_experts / GB}


@dataclasses.dataclass(frozen=True)
class Placement:
    resident: frozenset[tuple[int, int]]  # (layer, expert) pairs on the GPU
    breakdown: BudgetBreakdown
    order: str  # "popularity" or "uniform"

    @property
    def num_resident(self) -> int:
        return len(self.resident)

    def resident_in_layer(self, layer: int) -> set[int]:
        return {e for (lay, e) in self.resident if lay == layer}

    def expected_hit_rate(self, popularity: list[list[float]]) -> float:
        """Fraction of routed (token, expert) pairs that find their expert on the GPU."""
        total = sum(map(sum, popularity))
        hits = sum(popularity[layer][expert] for layer, expert in self.resident)
        return hits / total if total else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "num_resident": self.num_resident,
            "order": self.order,
            "resident": sorted(self.resident),
            **self.breakdown.to_json(),
        }


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def workspace_bytes(config: ModelConfig, max_chunk_tokens: int, dtype: torch.dtype) -> int:
    """Activations of one forward pass over ``max_chunk_tokens`` tokens: the residual stream
    and its copies, q/k/v, one expert's gate/up/product (all tokens may pick one expert), and
    float32 logits of the last position."""
    per_token = RESIDUAL_COPIES * config.hidden_size + config.q_size + 2 * config.kv_size
    per_token += 3 * config.intermediate_size
    return max_chunk_tokens * per_token * element_size(dtype) + config.vocab_size * 4


def budget_breakdown(
    config: ModelConfig,
    budget_bytes: int,
    dtype: torch.dtype,
    max_seq_len: int,
    beam_width: int,
    staging_experts: int,
) -> BudgetBreakdown:
    size = element_size(dtype)
    return BudgetBreakdown(
        budget=budget_bytes,
        dense=config.dense_params * size,
        kv_cache=config.kv_cache_bytes(max_seq_len, beam_width, size),
        staging=staging_experts * config.expert_params * size,
        workspace=workspace_bytes(config, max_seq_len * beam_width, dtype),
        expert=config.expert_params * size,
    )


def expert_order(config: ModelConfig, popularity: list[list[float]] | None) -> list[tuple[int, int]]:
    """Every (layer, expert), most wanted first. Without a profile: expert 0 of every layer,
    then expert 1 of every layer, ... so the GPU's share is even across layers."""
    if popularity is None:
        return [(layer, expert) for expert in range(config.num_experts) for layer in range(config.num_layers)]
    check_popularity(config, popularity)
    pairs = [(layer, expert) for layer in range(config.num_layers) for expert in range(config.num_experts)]
    return sorted(pairs, key=lambda p: -popularity[p[0]][p[1]])  # stable: ties keep layer order


def check_popularity(config: ModelConfig, popularity: list[list[float]]) -> None:
    if len(popularity) < config.num_layers or any(len(row) != config.num_experts for row in popularity):
        raise ValueError(
            f"the popularity profile is for another model shape; it needs {config.num_layers} layers x "
            f"{config.num_experts} experts. Run 'fiddler profile' for this model"
        )


def plan_placement(
    config: ModelConfig,
    budget_gb: float,
    dtype: torch.dtype,
    max_seq_len: int,
    beam_width: int = 1,
    staging_experts: int = 2,
    popularity: list[list[float]] | None = None,
) -> Placement:
    breakdown = budget_breakdown(config, int(budget_gb * GB), dtype, max_seq_len, beam_width, staging_experts)
    if breakdown.for_experts < 0:
        needed = (breakdown.budget - breakdown.for_experts) / GB
        raise ValueError(
            f"--gpu-memory-gb {budget_gb:g} cannot hold even the non-expert part of {config.name}: it needs "
            f"{needed:.2f} GB (weights {breakdown.dense / GB:.2f}, KV cache {breakdown.kv_cache / GB:.2f}, "
            f"staging {breakdown.staging / GB:.2f}, workspace {breakdown.workspace / GB:.2f}); "
            "raise the budget or shorten the sequence"
        )
    count = min(breakdown.for_experts // breakdown.expert, config.num_expert_slots)
    order = expert_order(config, popularity)
    return Placement(
        resident=frozenset(order[:count]),
        breakdown=breakdown,
        order="uniform" if popularity is None else "popularity",
    )


def budget_from_free_memory(device: torch.device) -> float:
    """GB to use when the user gives no budget: free memory less a margin."""
    free, _ = torch.cuda.mem_get_info(device)
    return max(free - FREE_MEMORY_MARGIN, 0) / GB


def load_popularity(path: str | Path) -> list[list[float]]:
    """The ``counts`` of a ``fiddler profile`` JSON file."""
    path = Path(path)
    data = read_json(
        path, f"popularity file {path} does not exist; make one with 'fiddler profile'", "run 'fiddler profile' again"
    )
    counts = data.get("counts") if isinstance(data, dict) else None
    if not isinstance(counts, list):
        raise ValueError(f"{path} is not a 'fiddler profile' output (no 'counts' table)")
    return [[float(c) for c in row] for row in counts]
