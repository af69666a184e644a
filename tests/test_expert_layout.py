import pytest
import torch

from fiddler.config import ModelConfig
from fiddler.expert_layout import split_blocks, split_ffn, to_split_layout
from fiddler.moe import expert_ffn


@pytest.mark.parametrize("name", ["mixtral-8x7b", "mixtral-8x22b", "mixtral-small", "mixtral-tiny"])
def test_block_counts_divide_the_ffn(name):
    cfg = ModelConfig.preset(name)
    blocks = split_blocks(cfg)
    assert 1 < blocks <= 16 and cfg.intermediate_size % blocks == 0


def test_split_layout_computes_the_same_expert_and_its_parts_sum_to_it():
    d, f, blocks = 32, 64, 8
    g = f // blocks
    generator = torch.Generator().manual_seed(0)
    w13 = torch.randn(2 * f, d, generator=generator, dtype=torch.float64)
    w2 = torch.randn(d, f, generator=generator, dtype=torch.float64)
    x = torch.randn(5, d, generator=generator, dtype=torch.float64)
    w13b, w2b = torch.empty(2 * f, d, dtype=torch.float64), torch.empty(blocks, d, g, dtype=torch.float64)
    to_split_layout(w13, w2, blocks, w13b, w2b)
    whole = expert_ffn(x, w13, w2)
    assert torch.allclose(split_ffn(x, w13b, w2b), whole)
    for cut in range(1, blocks):
        first = split_ffn(x, w13b[: 2 * cut * g], w2b[:cut])
        rest = split_ffn(x, w13b[2 * cut * g :], w2b[cut:])
        assert torch.allclose(first + rest, whole)
