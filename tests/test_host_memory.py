from pathlib import Path

import pytest
import torch

from fiddler.host_memory import ALIGNMENT, HostArena, smaps_huge_page_share
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


SMAPS_TEXT = """\
7f0000000000-7f0040000000 rw-p 00000000 00:00 0
Rss:             1048576 kB
Anonymous:       1048576 kB
AnonHugePages:    786432 kB
7f0040000000-7f0040001000 r--p 00000000 08:01 1234                       /usr/lib/libc.so
Rss:                   4 kB
Anonymous:             0 kB
AnonHugePages:         0 kB
7f0050000000-7f0050100000 rw-p 00000000 00:00 0
Anonymous:          1024 kB
AnonHugePages:         0 kB
"""


def test_huge_page_share_of_a_range_and_of_the_whole():
    """The arena's own mappings (within its addresses) against the process's whole."""
    arena = smaps_huge_page_share(SMAPS_TEXT, 0x7F0000000000, 0x7F0040000000)
    assert arena == pytest.approx(0.75)
    assert smaps_huge_page_share(SMAPS_TEXT) == pytest.approx(786432 / (1048576 + 1024))
    assert smaps_huge_page_share(SMAPS_TEXT, 0x7F0040000000, 0x7F0040001000) is None  # nothing anonymous
    # a range that ends inside a mapping (an arena whose size is not whole pages) still finds it
    assert smaps_huge_page_share(SMAPS_TEXT, 0x7F0000000000, 0x7F0000000100) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both ends"):
        smaps_huge_page_share(SMAPS_TEXT, 0x7F0000000000)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc")
def test_an_arenas_huge_page_share_is_read_from_proc():
    arena = HostArena([1 << 22, (1 << 22) + 100], pin=False)  # not whole pages
    arena.wait_ready()
    share = arena.huge_page_share()
    assert share is not None and 0.0 <= share <= 1.0
    arena.close()
