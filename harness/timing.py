"""The timing protocol's arithmetic: cell metrics from one generation's clock readings.

Contract: this module reads no clock (``fiddler.timing`` is the one that does; generations
record TTFT and per-step times with it after a warm-up, synchronising the device). Given a
generation's TTFT and per-step decode times, ``cell_metrics`` reports a cell of
``output_tokens`` new tokens: TTFT; decode tokens/s over the steps after the first token;
and the paper's end-to-end metric, output tokens / (prefill + decode time). A cell shorter
than the generation is read off its prefix (``derived``, exact for greedy decoding). A cell
longer than the steps measured (a slow system under a time limit) is ``extrapolated`` from
the mean measured step, and says how many steps stand behind it. ``host_disturbance(row)``
reads a raw row's record of the cores other processes and the hypervisor took while it ran,
and ``disturbed(row)`` says whether a measured row ran with more than ``BUSY_CORES_LIMIT`` of
either taken (the limit calibration holds its own measurements to).
"""

from __future__ import annotations

import dataclasses
import json
import statistics

from fiddler.steadiness import BUSY_CORES_LIMIT

# a raw row's statuses for a generation that ran: whole, or cut short by the run's time limit
# (its measured steps stand; the report extrapolates the cells beyond them)
MEASURED_ROW_STATUSES = ("ok", "time-limited")


@dataclasses.dataclass(frozen=True)
class CellMetrics:
    ttft_s: float
    decode_tokens_per_s: float | None  # None when the cell has a single token
    e2e_tokens_per_s: float
    steps_measured: int
    status: str  # ok, derived or extrapolated


def cell_metrics(ttft_s: float, step_times_s: list[float], output_tokens: int, generated_tokens: int) -> CellMetrics:
    needed = output_tokens - 1
    measured = step_times_s[:needed]
    if len(measured) == needed:
        decode = sum(measured)
        status = "ok" if output_tokens == generated_tokens else "derived"
    elif measured:
        decode = sum(measured) + statistics.mean(measured) * (needed - len(measured))
        status = "extrapolated"
    else:
        raise ValueError(f"no decode step was measured; cannot extrapolate to {output_tokens} tokens")
    return CellMetrics(
        ttft_s=ttft_s,
        decode_tokens_per_s=needed / decode if needed else None,
        e2e_tokens_per_s=output_tokens / (ttft_s + decode),
        steps_measured=len(measured),
        status=status,
    )


def steps_within(limit_s: float | None, ttft_s: float, step_s: float, wanted_steps: int) -> int:
    """Decode steps that fit a per-run time limit, given a probe's TTFT and step time (at
    least one step, so there is something to extrapolate from)."""
    if limit_s is None or step_s <= 0:
        return wanted_steps
    return max(1, min(wanted_steps, int((limit_s - ttft_s) / step_s)))


def row_telemetry(row: dict) -> dict:
    """A raw row's telemetry (what the host recorded beside it); empty where none was."""
    return json.loads(row.get("telemetry") or "{}")


def host_disturbance(row: dict) -> tuple[float, float]:
    """(cores other processes kept busy, cores the hypervisor took) while a raw row ran; zeros
    where nothing was recorded (rows from before the harness recorded it, or a generation too
    short for ``fiddler.host_load`` to know)."""
    load = row_telemetry(row)
    return float(load.get("host_other_busy_cores", 0.0)), float(load.get("host_steal_cores", 0.0))


def disturbed(row: dict) -> bool:
    """A measured row during which other processes or the hypervisor took more than
    ``BUSY_CORES_LIMIT`` cores on average."""
    return row.get("status") in MEASURED_ROW_STATUSES and max(host_disturbance(row)) > BUSY_CORES_LIMIT
