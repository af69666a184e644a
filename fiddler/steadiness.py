"""Whether a calibration was measured on a steady host: what says it was not.

Contract: ``steadiness_problems(measured, expert_bytes)`` lists, in words, what in one
measurement of ``fiddler.calibrate`` shows a disturbed host (empty: nothing does):
``host_load`` (``fiddler.host_load``'s summary) with other processes or the hypervisor keeping
more than ``BUSY_CORES_LIMIT`` cores busy on average; or, for experts streamed from memory, a
CPU expert measured slower for fewer tokens than for more by over ``CURVE_TOLERANCE`` (more
tokens never need less work). ``recorded_problems(calibration)`` is what a saved file says of
itself (``steadiness.problems``), or for files from before that key, what its curve shows.
"""

from __future__ import annotations

# one busy core already delays every expert, which the kernels split over all cores; half a
# core on average is more than a steady host's background
BUSY_CORES_LIMIT = 0.5
# repeats on a steady host differ by a few percent; the disturbed calibration of 2026-12-01 by 30%
CURVE_TOLERANCE = 0.2
# below this an expert's time is call overhead, where the order of token counts is noise; above,
# the calibration's rotation of cold experts makes it the time to stream the weights from memory
CURVE_CHECK_MIN_BYTES = 64 * 2**20


def steadiness_problems(calibration: dict[str, object], expert_bytes: int) -> list[str]:
    """What shows a disturbed host in one measurement (the module's contract)."""
    problems = []
    load = calibration.get("host_load") or {}
    for key, what in (("other_busy_cores", "other processes"), ("steal_cores", "the hypervisor")):
        if load.get(key, 0.0) > BUSY_CORES_LIMIT:
            problems.append(f"{what} kept {load[key]:.2f} cores busy (limit {BUSY_CORES_LIMIT})")
    if expert_bytes >= CURVE_CHECK_MIN_BYTES:
        points = list(zip(calibration["token_counts"], calibration["cpu_expert_s"], strict=True))
        for i, (n, t) in enumerate(points):
            faster_for_more = next(((m, u) for m, u in points[i + 1 :] if t > u * (1 + CURVE_TOLERANCE)), None)
            if faster_for_more:
                m, u = faster_for_more
                problems.append(
                    f"a CPU expert took {t * 1e3:.2f} ms for {n} token(s) but {u * 1e3:.2f} ms for {m}: "
                    "the host was disturbed while the smaller count was timed"
                )
                break
    return problems


def recorded_problems(calibration: dict[str, object]) -> list[str]:
    """What the file says disturbed its measurement; for files from before ``steadiness``, what
    their curve shows."""
    if "steadiness" in calibration:
        return list(calibration["steadiness"]["problems"])
    return steadiness_problems(calibration, calibration["model"]["expert_bytes"])
