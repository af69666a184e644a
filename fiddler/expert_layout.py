"""The split layout of an expert: any run of its F-blocks is one contiguous slice of both of
its matrices, so one expert can be divided between the CPU and the accelerator.

Contract: for an expert with FFN size F divided into ``blocks`` blocks of G = F / blocks rows,

- ``w13b`` [2F, D] holds, block after block, G rows of w1 (gate) then the same G rows of w3
  (up): blocks [i, j) are ``w13b[2iG:2jG]``;
- ``w2b`` [blocks, D, G] holds w2's columns block by block (block b is w2[:, bG:bG+G], row
  major): blocks [i, j) are ``w2b[i:j]``.

``split_ffn`` computes the expert's output restricted to the blocks it is given, and outputs
of disjoint block ranges sum to the whole expert's output. Both matrices are read row by row
in dot-product form, the access pattern of the native CPU kernel. Fiddler keeps its experts in
this layout (host memory, resident GPU experts, staging slots); ``fiddler.moe.ResidentExperts``
keeps the plain layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fiddler.config import ModelConfig

MAX_SPLIT_BLOCKS = 16  # the finest division of an expert between the two paths


def split_blocks(config: ModelConfig) -> int:
    """The largest number of equal blocks, at most ``MAX_SPLIT_BLOCKS``, that divides F."""
    return max(b for b in range(1, MAX_SPLIT_BLOCKS + 1) if config.intermediate_size % b == 0)


def split_shapes(config: ModelConfig) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """(w13b shape, w2b shape)."""
    f, d, blocks = config.intermediate_size, config.hidden_size, split_blocks(config)
    return (2 * f, d), (blocks, d, f // blocks)


def to_split_layout(w13: torch.Tensor, w2: torch.Tensor, blocks: int, w13b: torch.Tensor, w2b: torch.Tensor) -> None:
    """Write a plain expert (w13 = [w1; w3] [2F, D], w2 [D, F]) into split-layout buffers,
    which may live on another device: the rearrangement happens where the source is."""
    d, f = w2.shape
    g = f // blocks
    w1, w3 = w13[:f].view(blocks, g, -1), w13[f:].view(blocks, g, -1)
    w13b.copy_(torch.stack((w1, w3), dim=1).reshape(2 * f, -1), non_blocking=True)
    w2b.copy_(w2.view(d, blocks, g).permute(1, 0, 2).contiguous(), non_blocking=True)


def split_ffn(x: torch.Tensor, w13b: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
    """x [n, D] through the k blocks held by w13b [2kG, D] and w2b [k, D, G]."""
    n = x.shape[0]
    blocks, _, g = w2b.shape
    gate_up = F.linear(x, w13b).view(n, blocks, 2, g)
    hidden = F.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]  # [n, k, G]
    # One batched matmul over the blocks (einsum takes a path that copies w2b on the CPU).
    return torch.bmm(hidden.transpose(0, 1), w2b.transpose(1, 2)).sum(dim=0)
