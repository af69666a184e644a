"""The latency model: predicted seconds for each way of running an expert, read from a
calibration (``fiddler.calibrate``), never from constants.

Contract: ``LatencyModel`` answers ``cpu(n)``, ``gpu(n)``, ``act_d2h(n)``, ``act_h2d(n)`` for
n tokens (piecewise-linear interpolation over the measured token counts; linear
extrapolation beyond the largest from its last two points; the smallest measurement below
it), ``copy`` for one expert's weights, and the slowdowns of the CPU and copy paths when both
run at once.
"""

from __future__ import annotations

import bisect
import dataclasses


def _interpolate(xs: list[int], ys: list[float], x: float) -> float:
    if x <= xs[0]:
        return ys[0]
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = min(bisect.bisect_left(xs, x), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    token_counts: list[int]
    cpu_expert_s: list[float]
    gpu_expert_s: list[float]
    act_d2h_s: list[float]
    act_h2d_s: list[float]
    copy: float
    cpu_slowdown: float
    copy_slowdown: float

    @classmethod
    def from_calibration(cls, calibration: dict[str, object]) -> LatencyModel:
        concurrent = calibration["concurrent"]
        return cls(
            token_counts=list(calibration["token_counts"]),
            cpu_expert_s=list(calibration["cpu_expert_s"]),
            gpu_expert_s=list(calibration["gpu_expert_s"]),
            act_d2h_s=list(calibration["act_d2h_s"]),
            act_h2d_s=list(calibration["act_h2d_s"]),
            copy=float(calibration["copy_expert_s"]),
            cpu_slowdown=float(concurrent["cpu_slowdown"]),
            copy_slowdown=float(concurrent["copy_slowdown"]),
        )

    def cpu(self, n: int) -> float:
        return _interpolate(self.token_counts, self.cpu_expert_s, n)

    def gpu(self, n: int) -> float:
        return _interpolate(self.token_counts, self.gpu_expert_s, n)

    def act_d2h(self, n: int) -> float:
        return _interpolate(self.token_counts, self.act_d2h_s, n) if n else 0.0

    def act_h2d(self, n: int) -> float:
        return _interpolate(self.token_counts, self.act_h2d_s, n) if n else 0.0

    def cpu_path(self, n: int) -> float:
        """One expert on the CPU, activations there and back."""
        return self.act_d2h(n) + self.cpu(n) + self.act_h2d(n)

    def copy_path(self, n: int) -> float:
        """One expert's weights copied, then run on the accelerator."""
        return self.copy + self.gpu(n)
