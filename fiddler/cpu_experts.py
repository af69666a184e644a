"""Expert FFNs computed on the CPU.

Contract: a ``CpuExpertKernel`` computes one expert, or a run of its blocks, for a few tokens
on CPU tensors in the split layout of ``fiddler.expert_layout``:
``kernel(x [n, D], w13b [2kG, D], w2b [k, D, G]) -> [n, D]``, with w1 and w3 fused into one
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

    def __call__(self, x: torch.Tensor, w13b: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor: ...


class TorchExpertKernel:
    """torch's own matmuls (oneDNN bf16 where the CPU has it), w1|w3 fused."""

    name = "torch"

    def __call__(self, x: torch.Tensor, w13b: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return split_ffn(x, w13b, w2b)


AUTO = "auto"  # let calibration choose


class NativeExpertKernel:
    """fiddler/csrc/expert_bf16.cpp: AVX512-BF16 dot products for both projections, every
    weight read once, in address order, for up to 16 tokens. More tokens, or another dtype,
    go to the torch path (oneDNN's AMX kernels serve them well)."""

    name = "avx512-bf16"

    def __init__(self, max_tokens: int | None = None):
        from fiddler.native import native_expert_module, native_unavailable_reason

        self.module = native_expert_module()
        if self.module is None:
            raise ValueError(f"the {self.name} CPU expert kernel is unavailable: {native_unavailable_reason()}")
        limit = self.module.max_tokens
        self.max_tokens = limit if max_tokens is None else min(max_tokens, limit)
        self.fallback = TorchExpertKernel()

    def __call__(self, x: torch.Tensor, w13b: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_tokens or x.dtype != torch.bfloat16:
            return self.fallback(x, w13b, w2b)
        return self.module.expert(x.contiguous(), w13b, w2b)


KERNELS: dict[str, type] = {"torch": TorchExpertKernel, "avx512-bf16": NativeExpertKernel}


def make_kernel(name: str, max_tokens: int | None = None) -> CpuExpertKernel:
    """A kernel by name; ``max_tokens`` (from calibration) bounds what the native kernel serves."""
    if name not in KERNELS:
        raise ValueError(f"unknown CPU expert kernel {name!r}; choose one of {sorted(KERNELS)} or {AUTO}")
    return KERNELS[name](max_tokens) if name != "torch" else KERNELS[name]()


def available_kernels() -> list[str]:
    """Kernels that run on this machine (the native one only where it builds)."""
    names = []
    for name in KERNELS:
        try:
            make_kernel(name)
        except ValueError:
            continue
        names.append(name)
    return names


def set_cpu_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: all cores); returns the count in effect."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--cpu-threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
