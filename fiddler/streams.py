"""CUDA streams and events that become no-ops on the CPU.

Contract: executors and calibration order their work with these helpers only, so the same
code path runs on a GPU (asynchronous copies on a side stream, ordered by events) and in CPU
tests (everything synchronous, every helper a no-op). ``release_cached_memory`` returns what
a closed system left in torch's caches before the next one loads.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch


def new_stream(device: torch.device) -> torch.cuda.Stream | None:
    return torch.cuda.Stream(device) if device.type == "cuda" else None


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream | None) -> Iterator[None]:
    if stream is None:
        yield
    else:
        with torch.cuda.stream(stream):
            yield


def record(
    device: torch.device, stream: torch.cuda.Stream | None = None, timing: bool = False
) -> torch.cuda.Event | None:
    """An event marking the work queued so far on ``stream`` (default: the current stream);
    with ``timing``, one that ``elapsed_ms`` can read."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=timing)
    event.record(stream if stream is not None else torch.cuda.current_stream(device))
    return event


def elapsed_ms(start: torch.cuda.Event | None, end: torch.cuda.Event | None) -> float | None:
    """Milliseconds between two timing events that have both happened (None on the CPU)."""
    if start is None or end is None:
        return None
    return start.elapsed_time(end)


def wait(event: torch.cuda.Event | None, stream: torch.cuda.Stream | None = None) -> None:
    """Make ``stream`` (default: the current one) wait for ``event`` without blocking the host."""
    if event is not None:
        (stream if stream is not None else torch.cuda.current_stream()).wait_event(event)


def host_wait(event: torch.cuda.Event | None) -> None:
    """Block the calling host thread until ``event`` has happened."""
    if event is not None:
        event.synchronize()


def release_cached_memory() -> None:
    """Collect unreachable objects and hand torch's cached GPU memory back to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
