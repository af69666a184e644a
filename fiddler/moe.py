"""The MoE executor interface, the expert FFN, and the executor for experts that all live on
the model's device.

Contract: the model routes each layer's tokens (``Routing``) and hands them to an
``ExpertExecutor``, which returns the weighted sum of the chosen experts' outputs for every
token. Where an expert runs (GPU-resident, CPU, after a copy) is the executor's business; the
model never forks. An executor says whether a call is ``capturable`` (no host synchronisation,
static shapes), which decides if the engine may record decode steps as CUDA graphs.

Shape legend: N tokens, K experts per token, D hidden, F expert FFN size, X experts per layer.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class Routing:
    experts: torch.Tensor  # [N, K] int64 expert ids
    weights: torch.Tensor  # [N, K] float32, rows sum to 1


class ExpertExecutor(Protocol):
    capturable: bool

    def __call__(self, layer: int, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        """hidden: [N, D] -> [N, D] in hidden's dtype."""
        ...

    def stats(self) -> dict[str, object]: ...


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert: x [n, D], w13 [2F, D] (w1 rows then w3 rows), w2 [D, F] -> [n, D]."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def combine(outputs: torch.Tensor, routing: Routing, dtype: torch.dtype) -> torch.Tensor:
    """outputs: [N, K, D] per (token, slot) -> routing-weighted sum [N, D] (in float32, then cast)."""
    return (outputs.float() * routing.weights[..., None]).sum(dim=1).to(dtype)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs for this device and dtype (probed, not assumed)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.ones(2, 16, device=device, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device, dtype=dtype).transpose(-2, -1)  # the layout used below
        torch._grouped_mm(a, b, offs=torch.tensor([1, 2], device=device, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


class ResidentExperts:
    """Every expert on one device, stacked per layer: w13 [X, 2F, D] and w2 [X, D, F].

    ``grouped`` sorts the (token, slot) pairs by expert and runs two grouped matmuls: no host
    synchronisation, so decode steps can be captured as CUDA graphs. ``loop`` runs the
    experts that received tokens one by one (it reads the routing on the host).
    """

    def __init__(self, w13: list[torch.Tensor], w2: list[torch.Tensor], strategy: str = "auto"):
        self.w13, self.w2 = w13, w2
        if strategy == "auto":
            strategy = "grouped" if grouped_mm_supported(w13[0].device, w13[0].dtype) else "loop"
        if strategy not in ("grouped", "loop"):
            raise ValueError(f"expert strategy must be auto, grouped or loop, got {strategy!r}")
        self.strategy = strategy
        self.capturable = strategy == "grouped"

    def __call__(self, layer: int, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.strategy == "grouped":
            return self._grouped(layer, hidden, routing)
        return self._loop(layer, hidden, routing)

    def _grouped(self, layer: int, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        num_tokens, top_k = routing.experts.shape
        num_experts = self.w13[layer].shape[0]
        flat = routing.experts.reshape(-1)  # [N*K]
        order = torch.argsort(flat, stable=True)
        # A comparison, not bincount or one_hot: those read values on the host (no graph capture).
        counts = (flat[:, None] == torch.arange(num_experts, device=flat.device)).sum(dim=0)
        offsets = counts.cumsum(dim=0).to(torch.int32)
        rows = hidden.index_select(0, order // top_k)
        gate_up = torch._grouped_mm(rows, self.w13[layer].transpose(-2, -1), offs=offsets)
        gate, up = gate_up.chunk(2, dim=-1)
        sorted_out = torch._grouped_mm(F.silu(gate) * up, self.w2[layer].transpose(-2, -1), offs=offsets)
        outputs = torch.empty_like(sorted_out).index_copy_(0, order, sorted_out)
        return combine(outputs.view(num_tokens, top_k, -1), routing, hidden.dtype)

    def _loop(self, layer: int, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        num_tokens, top_k = routing.experts.shape
        outputs = hidden.new_empty(num_tokens, top_k, hidden.shape[-1])
        for expert in torch.unique(routing.experts).tolist():
            token_idx, slot_idx = torch.nonzero(routing.experts == expert, as_tuple=True)
            outputs[token_idx, slot_idx] = expert_ffn(
                hidden[token_idx], self.w13[layer][expert], self.w2[layer][expert]
            )
        return combine(outputs, routing, hidden.dtype)

    def stats(self) -> dict[str, object]:
        return {"executor": "resident", "strategy": self.strategy}

    def reset_stats(self) -> None:
        """Nothing is counted: every expert is resident."""

    def close(self) -> None:
        """Nothing to release beyond the tensors."""
