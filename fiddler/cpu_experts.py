"""Expert FFNs computed on the CPU.

Contract: a ``CpuExpertKernel`` computes one expert, or a run of its blocks, for a few tokens
on CPU tensors in the split layout of ``fiddler.expert_layout``:
``kernel(x [n, D], w13b [2kG, D], w2t [kG, D], G) -> [n, D]``, with w1 and w3 fused into one
matrix so the gate and up projections read their weights in one pass. Kernels are chosen by
name (``KERNELS``) and calibration records which one ran and how fast it read weights; the
engine never branches on a flag in its hot loop. ``set_cpu_threads`` sets the intra-op
threads used for this work (torch's pool is process-wide).
"""

from __future__ import annotations

from typing import Protocol

import torch

from fiddler.expert_layout import split_ffn


class CpuExpertKernel(Protocol):
    name: str

    def __call__(self, x: torch.Tensor, w13b: torch.Tensor, w2t: torch.Tensor, block: int) -> torch.Tensor: ...


class TorchExpertKernel:
    """torch's own matmuls (oneDNN bf16 where the CPU has it), w1|w3 fused."""

    name = "torch"

    def __call__(self, x: torch.Tensor, w13b: torch.Tensor, w2t: torch.Tensor, block: int) -> torch.Tensor:
        with torch.inference_mode():
            return split_ffn(x, w13b, w2t, block)


KERNELS: dict[str, type] = {"torch": TorchExpertKernel}


def make_kernel(name: str) -> CpuExpertKernel:
    if name not in KERNELS:
        raise ValueError(f"unknown CPU expert kernel {name!r}; choose one of {sorted(KERNELS)}")
    return KERNELS[name]()


def set_cpu_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: all cores); returns the count in effect."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--cpu-threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
