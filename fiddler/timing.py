"""The one place the project reads time.

Contract: ``Clock.now()`` first waits for the device's queued work (so a reading after a step
includes that step's GPU time), then reads a monotonic host clock in seconds. Everything that
reports a duration (generation, calibration, the harness) uses a ``Clock``.
"""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()
