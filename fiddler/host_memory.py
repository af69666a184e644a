"""Large page-locked host buffers for expert weights, and filling them fast.

Contract: ``HostArena(nbytes, pin)`` is one anonymous mapping, advised to use transparent huge
pages, whose pages are touched in parallel and then registered with ``cudaHostRegister``
when ``pin`` is true and CUDA is present (torch's pinned allocator rounds every block up to a
power of two, so a 93 GB model would not fit a 125 GB host). ``take(shape, dtype)`` hands out
aligned tensor views in order, like a bump allocator. Without CUDA the arena is ordinary
memory, so the same code runs in CPU tests. ``HostArena.phases_s`` records how long each step
took (map, touch, register), for the run record.
"""

from __future__ import annotations

import contextlib
import math
import mmap

import torch

from fiddler.timing import Clock

ALIGNMENT = 4096  # bytes; page-aligned views keep DMA transfers on their fast path
TOUCH_STRIDE = 4096  # write one byte per base page: every page gets faulted in


class HostArena:
    def __init__(self, nbytes: int, pin: bool = True, huge_pages: bool = True, touch: bool = True):
        if nbytes <= 0:
            raise ValueError(f"arena size must be positive, got {nbytes}")
        self.nbytes = nbytes
        self.offset = 0
        self.pinned = False
        self.phases_s: dict[str, float] = {}
        clock = Clock("cpu")
        start = clock.now()
        self._map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
            self._map.madvise(mmap.MADV_HUGEPAGE)
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self.phases_s["map"] = clock.now() - start
        if touch:
            start = clock.now()
            # One strided fill: torch spreads it over its intra-op threads, so the kernel's page
            # zeroing runs on every core instead of one.
            self.bytes[::TOUCH_STRIDE].fill_(0)
            self.phases_s["touch"] = clock.now() - start
        if pin and torch.cuda.is_available():
            start = clock.now()
            err = torch.cuda.cudart().cudaHostRegister(self.bytes.data_ptr(), nbytes, 0)
            code = int(getattr(err, "value", err))
            if code != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes / 1e9:.1f} GB failed with CUDA error {code}")
            self.pinned = True
            self.phases_s["register"] = clock.now() - start

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next aligned view of ``shape`` (raises when the arena is full)."""
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        start = -(-self.offset // ALIGNMENT) * ALIGNMENT
        if start + size > self.nbytes:
            raise MemoryError(f"host arena of {self.nbytes} bytes cannot hold {size} more at offset {start}")
        self.offset = start + size
        return self.bytes[start : start + size].view(dtype).view(shape)

    def close(self) -> None:
        """Unregister and unmap. Views taken from the arena must not be used afterwards."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.bytes.data_ptr())
            self.pinned = False
        del self.bytes
        with contextlib.suppress(BufferError):  # views still alive: the mapping goes when they do
            self._map.close()


def aligned_size(sizes: list[int]) -> int:
    """Bytes an arena needs to hand out blocks of these sizes with ``take``."""
    total = 0
    for size in sizes:
        total = -(-total // ALIGNMENT) * ALIGNMENT + size
    return total
