"""Large page-locked host buffers for weights, prepared in parallel with filling them.

Contract: ``HostArena(block_sizes, pin)`` lays the blocks out (page-aligned, in order) in one
anonymous mapping advised to use transparent huge pages. The mapping is prepared in chunks of
whole blocks by worker threads: each chunk's pages are touched (the kernel zeroes fresh
memory; a fresh VM also backs it on first touch) and, when ``pin`` is true and CUDA is
present, registered with ``cudaHostRegister`` by one thread, in order (torch's pinned
allocator rounds every block up to a power of two, so a 93 GB model would not fit a 125 GB
host that way). Touching runs on several threads; registering does not, because concurrent
registrations were measured to slow each other down on a fresh VM (28 s vs 21 s for 93 GB).
``take(shape, dtype)`` returns the next block as a tensor view once its chunk is ready, so the
caller fills early chunks while later ones are still being prepared. No block straddles two
registrations, so every copy from a block is one DMA. Without CUDA the arena is ordinary
memory and the same code runs in CPU tests. ``timings`` records the preparation work.

``huge_page_share()`` is the share of this process's resident anonymous memory that the kernel
backs with transparent huge pages (an arena's own with ``HostArena.huge_page_share()``): the
CPU path streams experts from this memory, and on small pages it pays a TLB miss every 4 KB, so
a calibration whose arena got huge pages and an engine whose 93 GB did not would disagree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import mmap
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from fiddler.timing import Clock

ALIGNMENT = 4096  # bytes; page-aligned views keep DMA transfers on their fast path
TOUCH_STRIDE = 4096  # write one byte per base page: every page gets faulted in
CHUNK_BYTES = 1 << 30  # unit of parallel preparation and of registration
HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every device, not just the current
TOUCH_WORKERS = 8


@dataclasses.dataclass
class _Chunk:
    start: int
    end: int
    ready: Future | None = None
    registered: bool = False


SMAPS = Path("/proc/self/smaps")  # per mapping
SMAPS_ROLLUP = Path("/proc/self/smaps_rollup")  # the whole process, summed by the kernel


def smaps_huge_page_share(text: str, start: int | None = None, end: int | None = None) -> float | None:
    """AnonHugePages / Anonymous over the mappings of an smaps text that overlap [start, end)
    (every mapping when no range is given; the kernel may have merged a neighbour into the
    range's mapping, whose pages then count too); None when nothing anonymous is resident."""
    if (start is None) != (end is None):
        raise ValueError("give both ends of the address range, or neither")
    anonymous = huge = 0
    inside = start is None
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in head and not head.endswith(":"):  # a mapping's header: lo-hi perms ...
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = start is None or (lo < end and hi > start)
        elif inside and head == "Anonymous:":
            anonymous += int(line.split()[1])
        elif inside and head == "AnonHugePages:":
            huge += int(line.split()[1])
    return huge / anonymous if anonymous else None


def huge_page_share(start: int | None = None, end: int | None = None) -> float | None:
    """This process's share (or that of its mappings within [start, end)) of resident anonymous
    memory on transparent huge pages; None where /proc does not say."""
    try:
        return smaps_huge_page_share((SMAPS if start is not None else SMAPS_ROLLUP).read_text(), start, end)
    except OSError:
        return None


def _unregister(pointers: list[int]) -> None:
    if pointers:
        torch.cuda.synchronize()  # no copy may still be reading the memory
    for pointer in pointers:
        torch.cuda.cudart().cudaHostUnregister(pointer)
    pointers.clear()


def nbytes_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


class HostArena:
    def __init__(
        self,
        block_sizes: list[int],
        pin: bool = True,
        huge_pages: bool = True,
        chunk_bytes: int = CHUNK_BYTES,
        workers: int = TOUCH_WORKERS,
    ):
        if not block_sizes or min(block_sizes) <= 0:
            raise ValueError("an arena needs at least one block, all of positive size")
        self.offsets: list[int] = []
        end = 0
        for size in block_sizes:
            self.offsets.append(_align(end))
            end = self.offsets[-1] + size
        self.sizes = list(block_sizes)
        self.nbytes = end
        self.next_block = 0
        self.pin = pin and torch.cuda.is_available()
        self.timings: dict[str, float] = {"touch_s_sum": 0.0, "register_s_sum": 0.0}
        self._clock = Clock("cpu")
        self._started = self._clock.now()
        self._map = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
            self._map.madvise(mmap.MADV_HUGEPAGE)
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._chunks, self._chunk_of_block = self._plan_chunks(chunk_bytes)
        # Registrations must be undone even if close() is never called: a later mapping at the
        # same addresses could not be registered again ("resource already mapped").
        self._registered: list[int] = []
        self._finalizer = weakref.finalize(self, _unregister, self._registered)
        self._lock = threading.Lock()
        self._touch_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="arena-touch")
        self._register_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="arena-register")
        for chunk in self._chunks:
            touched = self._touch_pool.submit(self._touch, chunk)
            chunk.ready = self._register_pool.submit(self._register, chunk, touched)

    def _plan_chunks(self, chunk_bytes: int) -> tuple[list[_Chunk], list[int]]:
        """Group consecutive whole blocks into chunks of about ``chunk_bytes``;
        returns the chunks and, per block, the index of its chunk."""
        chunks: list[_Chunk] = []
        chunk_of_block: list[int] = []
        start = 0
        for offset, size in zip(self.offsets, self.sizes, strict=True):
            chunk_of_block.append(len(chunks))
            end = offset + size
            if end - start >= chunk_bytes:
                chunks.append(_Chunk(start, _align(end)))
                start = _align(end)
        if start < self.nbytes:
            chunks.append(_Chunk(start, self.nbytes))
        chunks[-1].end = self.nbytes
        return chunks, chunk_of_block

    def _touch(self, chunk: _Chunk) -> None:
        t0 = self._clock.now()
        self.bytes[chunk.start : chunk.end : TOUCH_STRIDE].fill_(0)
        with self._lock:
            self.timings["touch_s_sum"] += self._clock.now() - t0

    def _register(self, chunk: _Chunk, touched: Future) -> None:
        touched.result()
        t1 = self._clock.now()
        if self.pin:
            pointer = self.bytes[chunk.start :].data_ptr()
            err = torch.cuda.cudart().cudaHostRegister(pointer, chunk.end - chunk.start, HOST_REGISTER_PORTABLE)
            code = int(getattr(err, "value", err))
            if code != 0:
                raise RuntimeError(
                    f"cudaHostRegister of {(chunk.end - chunk.start) / 1e9:.2f} GB failed with CUDA error {code}"
                )
            chunk.registered = True
            self._registered.append(pointer)
            with self._lock:
                self.timings["register_s_sum"] += self._clock.now() - t1

    @property
    def pinned(self) -> bool:
        return self.pin and all(c.registered for c in self._chunks)

    def huge_page_share(self) -> float | None:
        """The share of this arena's resident memory on transparent huge pages."""
        base = self.bytes.data_ptr()
        return huge_page_share(base, base + self.nbytes)

    def wait_ready(self) -> float:
        """Block until every chunk is prepared; seconds since the arena was created."""
        for chunk in self._chunks:
            chunk.ready.result()
        self.timings["prepared_after_s"] = self._clock.now() - self._started
        return self.timings["prepared_after_s"]

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next block, as a tensor of ``shape`` and ``dtype``, once its memory is ready."""
        index = self.next_block
        if index >= len(self.sizes):
            raise MemoryError(f"host arena has only {len(self.sizes)} blocks")
        size = nbytes_of(shape, dtype)
        if size != self.sizes[index]:
            raise ValueError(f"block {index} holds {self.sizes[index]} bytes, not {size} for {shape} {dtype}")
        self._chunks[self._chunk_of_block[index]].ready.result()  # re-raises a preparation error
        self.next_block += 1
        start = self.offsets[index]
        return self.bytes[start : start + size].view(dtype).view(shape)

    def close(self) -> None:
        """Unregister and unmap. Views taken from the arena must not be used afterwards."""
        self._touch_pool.shutdown(wait=True)
        self._register_pool.shutdown(wait=True)
        self._finalizer()  # unregisters every chunk, once
        for chunk in self._chunks:
            chunk.registered = False
        del self.bytes
        with contextlib.suppress(BufferError):  # views still alive: the mapping goes when they do
            self._map.close()
