"""CPU expert kernels: the native AVX512-BF16 kernel against a float64 reference on random
inputs (where this CPU can build it), the torch fallback, and calibration's choice."""

import pytest
import torch

from fiddler.calibrate import _choose_kernel
from fiddler.cpu_experts import make_kernel
from fiddler.expert_layout import split_ffn, to_split_layout
from fiddler.native import native_expert_module, native_unavailable_reason

BF16_TOL = 0.01  # relative L2 error; bf16 operands with float32 accumulation land near 0.003


def random_expert(d: int, f: int, blocks: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(2 * f, d, generator=generator) * 0.02).bfloat16()
    w2 = (torch.randn(d, f, generator=generator) * 0.02).bfloat16()
    w13b, w2b = torch.empty_like(w13), torch.empty(blocks, d, f // blocks, dtype=torch.bfloat16)
    to_split_layout(w13, w2, blocks, w13b, w2b)
    return w13b, w2b


def relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return float((value.double() - truth).norm() / truth.norm())


@pytest.mark.parametrize("kernel_name", ["torch", "avx512-bf16"])
@pytest.mark.parametrize(("d", "f", "blocks"), [(64, 128, 16), (512, 1792, 16), (96, 192, 12)])
def test_kernels_match_float64(kernel_name, d, f, blocks):
    if kernel_name != "torch" and native_expert_module() is None:
        pytest.skip(f"native kernel unavailable here: {native_unavailable_reason()}")
    kernel = make_kernel(kernel_name)
    w13b, w2b = random_expert(d, f, blocks, seed=d + f)
    g = f // blocks
    for tokens in (1, 2, 3, 7, 16, 20):  # 20: beyond the native kernel, served by torch
        x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(tokens)).bfloat16()
        truth = split_ffn(x.double(), w13b.double(), w2b.double())
        assert relative_error(kernel(x, w13b, w2b), truth) < BF16_TOL, tokens
        for cut in (1, blocks // 2, blocks - 1):  # a run of blocks: one side of a divided expert
            part = kernel(x, w13b[: 2 * cut * g], w2b[:cut])
            assert (
                relative_error(part, split_ffn(x.double(), w13b[: 2 * cut * g].double(), w2b[:cut].double())) < BF16_TOL
            )


def test_native_kernel_bound_and_bad_input():
    if native_expert_module() is None:
        pytest.skip(f"native kernel unavailable here: {native_unavailable_reason()}")
    kernel = make_kernel("avx512-bf16", max_tokens=2)
    assert kernel.max_tokens == 2
    w13b, w2b = random_expert(64, 128, 16, seed=0)
    with pytest.raises(RuntimeError, match="bf16"):
        native_expert_module().expert(torch.randn(1, 64), w13b, w2b)


def test_calibration_keeps_the_native_kernel_only_where_it_is_faster():
    counts = (1, 2, 4, 8)
    assert _choose_kernel({"torch": [4, 3, 3, 3], "avx512-bf16": [2, 2.5, 3.5, 2]}, counts) == ("avx512-bf16", 2)
    assert _choose_kernel({"torch": [1, 1, 1, 1], "avx512-bf16": [2, 2, 2, 2]}, counts) == ("torch", 0)
    assert _choose_kernel({"torch": [1, 1, 1, 1]}, counts) == ("torch", 8)
