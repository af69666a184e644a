"""The split layout of an expert: any run of F-blocks is one contiguous slice of every matrix,
so one expert can be divided between the CPU and the accelerator.

Contract: for an expert with FFN size F divided into ``blocks`` blocks of G = F / blocks rows,

- ``w13b`` [2F, D] holds, block after block, G rows of w1 (gate) then the same G rows of w3
  (up): block b is rows [2bG, 2bG + 2G);
- ``w2t`` [F, D] is w2 transposed: block b is rows [bG, bG + G).

Blocks [i, j) are ``w13b[2iG:2jG]`` and ``w2t[iG:jG]``; ``split_ffn`` computes the expert's
output restricted to those intermediate rows, and the outputs of disjoint block ranges sum
to the whole expert's output. Fiddler keeps its experts in this layout (host memory, resident
GPU experts, staging slots); ``fiddler.moe.ResidentExperts`` keeps the plain layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fiddler.config import ModelConfig

MAX_SPLIT_BLOCKS = 16  # the finest division of an expert between the two paths


def split_blocks(config: ModelConfig) -> int:
    """The largest number of equal blocks, at most ``MAX_SPLIT_BLOCKS``, that divides F."""
    return max(b for b in range(1, MAX_SPLIT_BLOCKS + 1) if config.intermediate_size % b == 0)


def split_shapes(config: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(w13b shape, w2t shape)."""
    f, d = config.intermediate_size, config.hidden_size
    return (2 * f, d), (f, d)


def to_split_layout(w13: torch.Tensor, w2: torch.Tensor, blocks: int, w13b: torch.Tensor, w2t: torch.Tensor) -> None:
    """Write a plain expert (w13 = [w1; w3] [2F, D], w2 [D, F]) into split-layout buffers,
    which may live on another device: the rearrangement happens where the source is."""
    f = w2.shape[1]
    g = f // blocks
    w1, w3 = w13[:f].view(blocks, g, -1), w13[f:].view(blocks, g, -1)
    w13b.copy_(torch.stack((w1, w3), dim=1).reshape(2 * f, -1), non_blocking=True)
    w2t.copy_(w2.t().contiguous(), non_blocking=True)


def split_ffn(x: torch.Tensor, w13b: torch.Tensor, w2t: torch.Tensor, block: int) -> torch.Tensor:
    """x [n, D] through the blocks held by w13b [2kG, D] and w2t [kG, D] (G = ``block``)."""
    n = x.shape[0]
    gate_up = F.linear(x, w13b).view(n, -1, 2, block)
    hidden = (F.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]).reshape(n, -1)
    return hidden @ w2t
