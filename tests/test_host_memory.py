import pytest
import torch

from fiddler.host_memory import ALIGNMENT, HostArena
from fiddler.loading import load_host_weights
from fiddler.weights import RandomWeights, expert_name, load


def test_blocks_are_aligned_and_never_straddle_chunks():
    sizes = [100, 5000, 3, 9000, 17]
    arena = HostArena(sizes, pin=False, chunk_bytes=4096)
    assert all(offset % ALIGNMENT == 0 for offset in arena.offsets)
    for offset, size, chunk_index in zip(arena.offsets, sizes, arena._chunk_of_block, strict=True):
        chunk = arena._chunks[chunk_index]
        assert chunk.start <= offset and offset + size <= chunk.end
    views = [arena.take((size,), torch.uint8) for size in sizes]
    for i, view in enumerate(views):
        view.fill_(i + 1)
    assert [int(v[0]) for v in views] == [1, 2, 3, 4, 5]  # no overlap
    with pytest.raises(MemoryError):
        arena.take((1,), torch.uint8)
    arena.wait_ready()
    arena.close()


def test_take_checks_the_planned_size():
    arena = HostArena([64], pin=False)
    with pytest.raises(ValueError, match="holds 64 bytes"):
        arena.take((8,), torch.float32)
    arena.close()


def test_host_weights_hold_every_expert_in_the_split_layout(tiny_config):
    source = RandomWeights(tiny_config, seed=2)
    host = load_host_weights(source, torch.float32, pin=False, include_dense=True)
    g = tiny_config.intermediate_size // host.blocks
    for layer in range(tiny_config.num_layers):
        for expert in range(tiny_config.num_experts):
            w13b, w2b = host.experts[layer][expert]
            w1, w3, w2 = (load(source, expert_name(layer, expert, m), "cpu", torch.float32) for m in ("w1", "w3", "w2"))
            assert torch.equal(w13b[:g], w1[:g]) and torch.equal(w13b[g : 2 * g], w3[:g])
            assert torch.equal(w13b[-g:], w3[-g:])
            assert torch.equal(w2b[1], w2[:, g : 2 * g])
    assert torch.equal(host.dense["model.norm.weight"], torch.ones(tiny_config.hidden_size))
    host.close()
