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

from concurrent.futures import Executor
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


class _NativeKernel:
    """A path of the native module (fiddler/csrc/expert_bf16.cpp) for bf16 up to ``max_tokens``
    tokens (None: any count); more tokens, or another dtype, go to the torch path."""

    name: str
    max_tokens: int | None

    def __init__(self, entry):
        self.entry = entry
        self.fallback = TorchExpertKernel()

    def __call__(self, x: torch.Tensor, w13b: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or (self.max_tokens is not None and x.shape[0] > self.max_tokens):
            return self.fallback(x, w13b, w2b)
        return self.entry(x.contiguous(), w13b, w2b)


class NativeExpertKernel(_NativeKernel):
    """AVX512-BF16 dot products for both projections, every weight read once, in address
    order, for up to 16 tokens (compute-bound from about four)."""

    name = "avx512-bf16"

    def __init__(self, max_tokens: int | None = None):
        from fiddler.native import native_expert_module, native_unavailable_reason

        module = native_expert_module()
        if module is None:
            raise ValueError(f"the {self.name} CPU expert kernel is unavailable: {native_unavailable_reason()}")
        super().__init__(module.expert)
        self.max_tokens = module.max_tokens if max_tokens is None else min(max_tokens, module.max_tokens)


class AmxExpertKernel(_NativeKernel):
    """The AMX tile path: weights read once per pass of up to 64 tokens, tiles of 16 weight rows
    against 16 tokens, so compute stays far below the memory's pace."""

    name = "amx-bf16"

    def __init__(self, max_tokens: int | None = None):
        from fiddler.native import amx_unavailable_reason, native_expert_module

        reason = amx_unavailable_reason()
        if reason is not None:
            raise ValueError(f"the {self.name} CPU expert kernel is unavailable: {reason}")
        super().__init__(native_expert_module().expert_amx)
        self.max_tokens = max_tokens  # None: any count


class TieredExpertKernel:
    """A kernel per range of token counts, as calibration chose them: ``tiers`` is
    ``[(max_tokens, kernel), ...]`` in increasing order, the last with ``None`` (any count)."""

    def __init__(self, tiers: list[tuple[int | None, CpuExpertKernel]]):
        if not tiers or tiers[-1][0] is not None:
            raise ValueError("the last kernel tier must take any token count (max_tokens None)")
        self.tiers = tiers
        self.name = "+".join(k.name if m is None else f"{k.name}<={m}" for m, k in tiers)

    def __call__(self, x: torch.Tensor, w13b: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        kernel = next(k for m, k in self.tiers if m is None or n <= m)
        return kernel(x, w13b, w2b)


KERNELS: dict[str, type] = {"torch": TorchExpertKernel, "avx512-bf16": NativeExpertKernel, "amx-bf16": AmxExpertKernel}


def make_kernel(name: str, max_tokens: int | None = None) -> CpuExpertKernel:
    """A kernel by name; ``max_tokens`` bounds what a native kernel serves (torch beyond)."""
    if name not in KERNELS:
        raise ValueError(f"unknown CPU expert kernel {name!r}; choose one of {sorted(KERNELS)} or {AUTO}")
    return KERNELS[name](max_tokens) if name != "torch" else KERNELS[name]()


def tiered_kernel(tiers: list[list]) -> CpuExpertKernel:
    """The kernel a calibration's ``cpu_kernel_tiers`` ([[max_tokens or None, name], ...]) describe."""
    if len(tiers) == 1:
        return make_kernel(tiers[0][1])
    return TieredExpertKernel([(m, make_kernel(name)) for m, name in tiers])


def kernel_limit(name: str) -> int | None:
    """The most tokens kernel ``name`` computes itself (None: any), where it runs here."""
    return make_kernel(name).max_tokens if name == NativeExpertKernel.name else None


def available_kernels() -> list[str]:
    """Kernels that run on this machine (the native ones only where they build and the CPU has
    their instructions)."""
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


def set_cpu_threads_with(worker: Executor, threads: int | None) -> int:
    """``set_cpu_threads`` on the calling thread and on ``worker``'s (a one-thread executor);
    returns the worker's count. Torch takes its thread count up once per thread, at that
    thread's first parallel call: a change made here alone leaves a worker that has computed
    before at its old count."""
    set_cpu_threads(threads)
    return worker.submit(set_cpu_threads, threads).result()
