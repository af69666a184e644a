"""The latency model: predicted seconds for each way of running an expert, read from a
calibration (``fiddler.calibrate``), never from constants.

Contract: ``LatencyModel`` answers ``cpu(n)``, ``gpu(n)``, ``act_d2h(n)``, ``act_h2d(n)`` for
n tokens (piecewise-linear interpolation over the measured token counts; linear
extrapolation beyond the largest from its last two points; the smallest measurement below
it), ``cpu_part(n, share)`` for a share of an expert on the CPU (interpolated over the
calibration's measured shares when it has them, else proportional), ``copy`` for one
expert's weights, and the slowdowns of the CPU and copy paths when both run at once.
``with_cpu_factor(f, s)`` is the same model with every CPU time scaled by f and, when given,
the CPU's slowdown beside copies set to s; ``with_path_offsets(cpu, copy)`` the same model with
each path's end moved by the seconds the run measured it late against the model (both the
executor's in-run corrections; zero in a calibration).
"""

from __future__ import annotations

import bisect
import dataclasses

# calibration times the shares of a divided expert at this many tokens; ``cpu_part`` applies
# that curve at every count, where fixed per-call costs weigh less (so it prices parts high)
SHARE_CURVE_TOKENS = 1


def _share_curve(calibration: dict[str, object]) -> dict[str, tuple[float, ...]]:
    """(0, 0) plus the calibration's measured (share, cost of share / cost of whole) points."""
    shares = calibration.get("cpu_share")
    if not shares:
        return {}
    pairs = sorted(zip(shares["shares"], shares["fraction_of_whole"], strict=True))
    return {"cpu_shares": (0.0, *(p[0] for p in pairs)), "cpu_share_cost": (0.0, *(p[1] for p in pairs))}


def _interpolate(xs: list[float], ys: list[float], x: float) -> float:
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
    cpu_shares: tuple[float, ...] = (0.0, 1.0)  # measured shares of an expert on the CPU ...
    cpu_share_cost: tuple[float, ...] = (0.0, 1.0)  # ... and their cost as a fraction of the whole
    # seconds each path ends later than the rest of this model says, from the routing read: what
    # a run measured (its CPU job's hand-off and start; the copies' queueing and their rate
    # beside the CPU), which the planner's division between the paths must see
    cpu_offset_s: float = 0.0
    copy_offset_s: float = 0.0
    # answers already interpolated, by (curve, n): the hybrid planner asks the same few token
    # counts hundreds of times per plan, on the CPU path's critical path in a layer
    _memo: dict[tuple[str, float], float] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

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
            **_share_curve(calibration),
        )

    def with_cpu_factor(self, factor: float, cpu_slowdown: float | None = None) -> LatencyModel:
        """Every CPU time scaled by ``factor``; the CPU's slowdown beside copies replaced when given."""
        slowdown = self.cpu_slowdown if cpu_slowdown is None else cpu_slowdown
        return dataclasses.replace(self, cpu_expert_s=[t * factor for t in self.cpu_expert_s], cpu_slowdown=slowdown)

    def with_path_offsets(self, cpu_offset_s: float, copy_offset_s: float) -> LatencyModel:
        """Each path's end moved by the seconds given (``cpu_offset_s``, ``copy_offset_s``)."""
        return dataclasses.replace(self, cpu_offset_s=cpu_offset_s, copy_offset_s=copy_offset_s)

    def _at(self, curve: str, n: float) -> float:
        """``curve`` (a field of per-token-count seconds) at n tokens, interpolated once."""
        value = self._memo.get((curve, n))
        if value is None:
            value = self._memo[(curve, n)] = _interpolate(self.token_counts, getattr(self, curve), n)
        return value

    def cpu_part(self, n: int, share: float) -> float:
        """A share (0..1] of one expert's blocks on the CPU for n tokens."""
        cost = self._memo.get(("share", share))
        if cost is None:
            cost = self._memo[("share", share)] = _interpolate(list(self.cpu_shares), list(self.cpu_share_cost), share)
        return self.cpu(n) * cost

    def cpu(self, n: int) -> float:
        return self._at("cpu_expert_s", n)

    def gpu(self, n: int) -> float:
        return self._at("gpu_expert_s", n)

    def act_d2h(self, n: int) -> float:
        return self._at("act_d2h_s", n) if n else 0.0

    def act_h2d(self, n: int) -> float:
        return self._at("act_h2d_s", n) if n else 0.0

    def cpu_path(self, n: int) -> float:
        """One expert on the CPU, activations there and back."""
        return self.act_d2h(n) + self.cpu(n) + self.act_h2d(n)

    def copy_path(self, n: int) -> float:
        """One expert's weights copied, then run on the accelerator."""
        return self.copy + self.gpu(n)
