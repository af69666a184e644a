"""Measure this machine's expert latencies; the latency model (``fiddler.cost_model``) reads
the result. No latency is a constant in code.

Contract: ``calibrate(config, device, dtype, ...)`` returns a JSON-serialisable dictionary,
schema ``fiddler-calibration`` version 1 (``save_calibration`` writes it atomically):

- ``schema``, ``version``; ``machine``: ``fiddler.machine.machine_identity``; ``created``.
- ``model``: ``hidden_size``, ``intermediate_size``, ``dtype``, ``expert_bytes``; latencies
  depend on the expert's shape, so a file only serves models of that shape.
- ``device`` (the accelerator, or ``cpu`` standing in), ``cpu_threads``,
  ``cpu_kernel_tiers`` (``[[max_tokens, kernel], ...]``, the last with ``null``: for each range
  of token counts the kernel that measured fastest there), ``cpu_kernel`` (their combined
  name), ``cpu_kernel_curves_s`` (every kernel's CPU curve as measured, ``null`` beyond what
  a kernel computes itself). Files from before the tiers carry ``cpu_kernel`` and
  ``cpu_kernel_max_tokens`` (that kernel up to that many tokens, torch beyond) instead;
  ``kernel_tiers`` reads both.
  ``split_blocks`` (experts are measured in the split layout of ``fiddler.expert_layout``).
- ``token_counts``: n values of the curves below (seconds, medians):
  ``cpu_expert_s`` one expert on the CPU for n tokens, weights not in cache;
  ``gpu_expert_s`` one expert on the accelerator for n tokens;
  ``act_d2h_s`` / ``act_h2d_s`` n hidden vectors accelerator->host / host->accelerator.
- ``copy_expert_s``: one expert's weights host->accelerator from page-locked memory.
- ``concurrent``: ``cpu_slowdown`` (CPU expert time while copies run / alone, one token) and
  ``copy_slowdown`` (copy time while CPU experts run / alone); ``measured`` false where there
  is no accelerator to copy to (then both are 1); ``cpu_slowdown_by_tokens`` (token count ->
  the CPU's slowdown at that count, recorded, not yet read by the planner; files from before
  it lack it); ``copy_slowdown_same_window`` (the copies' time per expert over the window in
  which ``cpu_slowdown`` was measured, the CPU computing throughout, / alone: with
  ``cpu_slowdown``, both paths' rates at one moment, where ``copy_slowdown`` is taken in a window
  of its own; recorded for ``fiddler.bounds.same_window_model``, not read by the planner; files
  from before it lack it).
- ``cpu_share``: ``shares`` (parts of an expert, in split blocks) and ``fraction_of_whole``
  (their CPU time for one token over the whole expert's); the planner reads it to divide an
  expert between the paths (added in this version; older files without it mean proportional).
- derived for reading: ``cpu_weight_gb_per_s`` per n, ``copy_gb_per_s``.
- ``host_memory``: ``huge_page_share``, the share of the measured experts' host memory on
  transparent huge pages (``fiddler.host_memory``; null where /proc does not say): the engine's
  rows record their process's, to compare.
- ``host_load``: ``fiddler.host_load.HostLoad``'s summary over the measurement kept (cores that
  other processes and the hypervisor took; empty where unknown); ``steadiness``: ``attempt``
  (which measurement was kept), ``attempts`` (how many were made), ``problems`` (what
  ``fiddler.steadiness`` found in the one kept: empty for a steady host), ``host_load_known``
  (false: the host's load could not be read, only the curve was judged). A disturbed
  measurement is taken again, up to ``attempts`` times; files from before these keys say nothing.

Later versions may add keys (the CPU kernel and simulator issues extend this schema); readers
ignore keys they do not know, and ``version`` changes only when a key changes meaning.
"""

from __future__ import annotations

import datetime
import logging
import math
import statistics
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from fiddler.config import ModelConfig
from fiddler.cost_model import SHARE_CURVE_TOKENS
from fiddler.cpu_experts import AUTO, available_kernels, kernel_limit, make_kernel, set_cpu_threads, tiered_kernel
from fiddler.expert_layout import split_blocks, split_ffn, split_shapes, to_split_layout
from fiddler.files import read_json, write_json_atomic
from fiddler.host_load import HostLoad
from fiddler.host_memory import HostArena, nbytes_of
from fiddler.loading import expert_shapes, load_expert_into
from fiddler.machine import machine_identity
from fiddler.steadiness import steadiness_problems
from fiddler.streams import new_stream, on_stream
from fiddler.timing import Clock, synchronize
from fiddler.weights import RandomWeights

log = logging.getLogger(__name__)
SCHEMA = "fiddler-calibration"
VERSION = 1
DEFAULT_TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUICK_TOKEN_COUNTS = (1, 4, 16, 64, 256)
# Experts are read in rotation from a set larger than any CPU's last-level cache, so each
# CPU measurement streams its weights from memory as a real missing expert does.
COLD_SET_BYTES = 2_000_000_000
GPU_INNER_RUNS = 10  # GPU expert runs per timing sample: one run is too short to time alone
CONCURRENT_COPIES = 48  # copies queued while CPU experts are timed alongside them
CONCURRENT_SAMPLES = 12  # samples of each operation alone and together
# token counts at which the CPU's slowdown beside copies is also recorded: the long prefill's
# CPU jobs ran 1.4-1.6x slower beside copies where the one-token figure said 1.16
CONCURRENT_PROBE_TOKENS = (16, 128)
SHARES_MEASURED = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4)  # parts of an expert timed on the CPU
SHARE_REPEATS = 7
# a disturbed measurement is taken again, up to this many in all: a disturbance that outlasts
# three (~12 s each on the GPU host) is better reported than waited out
DEFAULT_ATTEMPTS = 3


def median_time(clock: Clock, fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call (calibration's burst)."""
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = clock.now()
        fn()
        samples.append(clock.now() - start)
    return statistics.median(samples)


class ColdExperts:
    """Two rotations of distinct experts (split layout) in (page-locked) host memory: the CPU
    reads one while copies read the other, each set larger than any last-level cache."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, seed: int, device: torch.device):
        w13_shape, w2_shape = split_shapes(config)
        self.blocks = split_blocks(config)
        self.block = config.intermediate_size // self.blocks
        self.expert_bytes = nbytes_of(w13_shape, dtype) + nbytes_of(w2_shape, dtype)
        per_set = max(2, math.ceil(COLD_SET_BYTES / self.expert_bytes))
        count = min(2 * per_set, config.num_expert_slots)
        self.arena = HostArena([nbytes_of(w13_shape, dtype), nbytes_of(w2_shape, dtype)] * count, pin=True)
        source = RandomWeights(config, seed=seed, generator_device=device.type)
        plain13, plain2 = (torch.empty(s, dtype=dtype, device=device.type) for s in expert_shapes(config))
        experts = []
        for index in range(count):
            layer, expert = divmod(index, config.num_experts)
            w13b, w2b = self.arena.take(w13_shape, dtype), self.arena.take(w2_shape, dtype)
            load_expert_into(source, layer, expert, plain13, plain2)
            to_split_layout(plain13, plain2, self.blocks, w13b, w2b)
            experts.append((w13b, w2b))
        synchronize(device)
        half = max(1, count // 2)
        self.sets = [experts[:half], experts[half:] or experts[:half]]
        self._next = [0, 0]

    def next(self, which: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.sets[which][self._next[which]]
        self._next[which] = (self._next[which] + 1) % len(self.sets[which])
        return pair


def calibrate(
    config: ModelConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    cpu_threads: int | None = None,
    cpu_kernel: str = AUTO,
    token_counts: tuple[int, ...] = DEFAULT_TOKEN_COUNTS,
    repeats: int = 5,
    seed: int = 0,
    attempts: int = DEFAULT_ATTEMPTS,
) -> dict[str, object]:
    """``cpu_kernel`` ``auto`` measures every kernel that runs here and keeps, for each token
    count, the fastest (``cpu_kernel_tiers``). A measurement that ``fiddler.steadiness`` finds
    disturbed is taken again, up to ``attempts`` in all; the least disturbed is kept and
    ``steadiness`` says what was found (a disturbed file plans every run that reads it)."""
    if attempts < 1:
        raise ValueError(f"attempts is {attempts}: a calibration needs at least 1")
    device = torch.device(device)
    threads = set_cpu_threads(cpu_threads)
    cold = ColdExperts(config, dtype, seed, device)
    generator = torch.Generator().manual_seed(seed)
    kept: tuple[int, float, dict[str, object]] | None = None
    for attempt in range(1, attempts + 1):
        with HostLoad() as load:
            measured = _measure(config, device, dtype, cold, cpu_kernel, token_counts, repeats, generator)
        measured["host_load"] = load.summary()
        problems = steadiness_problems(measured, cold.expert_bytes)
        # an empty host_load (no /proc, a window too short to tell) is unknown, not steady
        measured["steadiness"] = {
            "attempt": attempt,
            "problems": problems,
            "host_load_known": bool(measured["host_load"]),
        }
        # disturbance only ever slows a measurement: of two disturbed ones the faster is nearer
        rank = (len(problems), measured["cpu_expert_s"][0])
        if kept is None or rank < kept[:2]:
            kept = (*rank, measured)
        if not problems:
            break
        log.warning("calibration attempt %d of %d disturbed: %s", attempt, attempts, "; ".join(problems))
    huge_pages = cold.arena.huge_page_share()
    cold.arena.close()
    calibration = kept[2]
    calibration["steadiness"]["attempts"] = attempt
    bytes_ = cold.expert_bytes
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_identity(device),
        "model": {
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "dtype": str(dtype).removeprefix("torch."),
            "expert_bytes": bytes_,
        },
        "device": device.type,
        "cpu_threads": threads,
        **calibration,
        "host_memory": {"huge_page_share": huge_pages},
        "split_blocks": cold.blocks,
        "cpu_weight_gb_per_s": [bytes_ / s / 1e9 for s in calibration["cpu_expert_s"]],
        "copy_gb_per_s": bytes_ / calibration["copy_expert_s"] / 1e9,
    }


def _measure(
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    cold: ColdExperts,
    cpu_kernel: str,
    token_counts: tuple[int, ...],
    repeats: int,
    generator: torch.Generator,
) -> dict[str, object]:
    """One whole measurement of the latencies (every key of the file that is timed)."""
    host_clock, device_clock = Clock("cpu"), Clock(device)
    hidden = config.hidden_size
    native_dtype = dtype == torch.bfloat16  # the native kernel computes bf16 only
    candidates = available_kernels() if cpu_kernel == AUTO and native_dtype else [cpu_kernel]
    if candidates == [AUTO]:
        candidates = ["torch"]
    curves: dict[str, list[float | None]] = {}

    def measure(name: str, counts: set[int]) -> list[float | None]:
        kernel, curve = make_kernel(name), []
        for n in token_counts:
            if n not in counts:
                curve.append(None)
                continue
            x = torch.randn(n, hidden, generator=generator).to(dtype)
            curve.append(median_time(host_clock, lambda x=x, k=kernel: k(x, *cold.next()), repeats))
        return curve

    for name in candidates:
        limit = kernel_limit(name)  # beyond it the kernel hands over to torch's
        curves[name] = measure(name, {n for n in token_counts if limit is None or n <= limit})
    uncovered = {n for i, n in enumerate(token_counts) if all(c[i] is None for c in curves.values())}
    if uncovered:  # a kernel asked for by name that stops short: torch's fallback, as it runs
        curves["torch"] = measure("torch", uncovered)
    tiers = choose_tiers(curves, token_counts)
    kernel = tiered_kernel(tiers)
    cpu_s = [_fastest(curves, i)[1] for i in range(len(token_counts))]

    slot13, slot2 = (torch.empty_like(w, device=device) for w in cold.sets[1][0])

    def copy_one() -> None:
        w13, w2 = cold.next(1)
        slot13.copy_(w13, non_blocking=True)
        slot2.copy_(w2, non_blocking=True)

    copy_s = median_time(device_clock, copy_one, repeats)

    gpu_s, d2h_s, h2d_s = [], [], []
    staging = torch.empty(max(token_counts), hidden, dtype=dtype, pin_memory=device.type == "cuda")
    for n in token_counts:
        x = torch.randn(n, hidden, generator=generator).to(device=device, dtype=dtype)

        def gpu_runs(x=x) -> None:
            for _ in range(GPU_INNER_RUNS):
                split_ffn(x, slot13, slot2)

        gpu_s.append(median_time(device_clock, gpu_runs, repeats) / GPU_INNER_RUNS)
        d2h_s.append(median_time(device_clock, lambda x=x, n=n: staging[:n].copy_(x, non_blocking=True), repeats))
        h2d_s.append(median_time(device_clock, lambda x=x, n=n: x.copy_(staging[:n], non_blocking=True), repeats))

    return {
        "cpu_kernel": kernel.name,
        "cpu_kernel_tiers": tiers,
        "cpu_kernel_curves_s": curves,
        "token_counts": list(token_counts),
        "cpu_expert_s": cpu_s,
        "gpu_expert_s": gpu_s,
        "act_d2h_s": d2h_s,
        "act_h2d_s": h2d_s,
        "copy_expert_s": copy_s,
        "concurrent": _measure_concurrency(device, kernel, cold, slot13, slot2, repeats, token_counts),
        "cpu_share": _measure_shares(kernel, cold, hidden, dtype, repeats, generator),
    }


def _fastest(curves: dict[str, list[float | None]], i: int) -> tuple[str, float]:
    timed = [(name, curve[i]) for name, curve in curves.items() if curve[i] is not None]
    return min(timed, key=lambda item: item[1])


def choose_tiers(curves: dict[str, list[float | None]], token_counts: tuple[int, ...]) -> list[list]:
    """At each measured token count the fastest kernel; a run of counts with the same winner is
    one tier reaching up to the last of them, and the last tier takes any count beyond."""
    tiers: list[list] = []
    for i, n in enumerate(token_counts):
        name = _fastest(curves, i)[0]
        if tiers and tiers[-1][1] == name:
            tiers[-1][0] = n
        else:
            tiers.append([n, name])
    tiers[-1][0] = None
    return tiers


def kernel_tiers(calibration: dict[str, object]) -> list[list]:
    """The calibration's kernel tiers; files from before tiers name one kernel up to a count."""
    if "cpu_kernel_tiers" in calibration:
        return calibration["cpu_kernel_tiers"]
    name, max_tokens = calibration["cpu_kernel"], calibration.get("cpu_kernel_max_tokens")
    if name == "torch" or max_tokens is None:
        return [[None, name]]
    return [[max_tokens, name], [None, "torch"]] if max_tokens else [[None, "torch"]]


def _measure_concurrency(device, kernel, cold, slot13, slot2, repeats, token_counts) -> dict[str, object]:
    """CPU experts (1 token) while copies stream, and copies while the CPU computes experts,
    each against the same operation alone measured right before (the host is noisy). The CPU
    reads one set of experts and the copies the other, as in a real layer. The CPU's slowdown is
    also taken, for the record, at the larger ``CONCURRENT_PROBE_TOKENS`` the calibration
    measures (the planner reads the one-token figure; runs found multi-token jobs slowed more),
    and the copies' time over the one-token window (``copy_slowdown_same_window``, where the CPU
    ran inside it: both paths' rates at one moment)."""
    if device.type != "cuda":
        return {"measured": False, "cpu_slowdown": 1.0, "copy_slowdown": 1.0}
    host_clock = Clock("cpu")
    samples = max(repeats, CONCURRENT_SAMPLES)
    x = torch.randn(1, slot13.shape[1]).to(slot13.dtype)
    stream = new_stream(device)

    def cpu_once(rows: torch.Tensor) -> float:
        start = host_clock.now()
        kernel(rows, *cold.next(0))
        return host_clock.now() - start

    def cpu_beside_copies(rows: torch.Tensor) -> tuple[float, list[float], float]:
        """The CPU alone (median), then its runs that overlapped queued copies from start to end,
        and the copies' mean time over that window (the CPU computing throughout)."""
        alone = statistics.median(cpu_once(rows) for _ in range(samples))
        with on_stream(stream):  # keep the copy engine busy for the whole CPU measurement
            began = torch.cuda.Event(enable_timing=True)
            began.record(stream)
            for _ in range(CONCURRENT_COPIES):
                w13, w2 = cold.next(1)
                slot13.copy_(w13, non_blocking=True)
                slot2.copy_(w2, non_blocking=True)
            done = torch.cuda.Event(enable_timing=True)
            done.record(stream)
        together = []
        while not done.query():
            elapsed = cpu_once(rows)
            if not done.query():
                together.append(elapsed)
        done.synchronize()
        return alone, together, began.elapsed_time(done) / 1e3 / CONCURRENT_COPIES

    def timed_copies(count: int) -> list[float]:
        times = []
        with on_stream(stream):
            for _ in range(count):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                w13, w2 = cold.next(1)
                start.record(stream)
                slot13.copy_(w13, non_blocking=True)
                slot2.copy_(w2, non_blocking=True)
                end.record(stream)
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
        return times

    cpu_alone, cpu_samples, copy_same_window = cpu_beside_copies(x)
    by_tokens = {}
    for n in sorted(set(CONCURRENT_PROBE_TOKENS) & set(token_counts)):
        alone, together, _ = cpu_beside_copies(torch.randn(n, slot13.shape[1]).to(slot13.dtype))
        if together:
            by_tokens[str(n)] = statistics.median(together) / alone

    copy_alone = statistics.median(timed_copies(samples))
    stop = threading.Event()

    def cpu_load() -> None:
        while not stop.is_set():
            kernel(x, *cold.next(0))

    worker = threading.Thread(target=cpu_load, daemon=True)
    worker.start()
    copy_together = statistics.median(timed_copies(samples))
    stop.set()
    worker.join()
    cpu_together = statistics.median(cpu_samples) if cpu_samples else cpu_alone
    found = {
        "measured": bool(cpu_samples),
        "cpu_slowdown": cpu_together / cpu_alone,
        "copy_slowdown": copy_together / copy_alone,
        "cpu_alone_s": cpu_alone,
        "cpu_samples": len(cpu_samples),
        "cpu_slowdown_by_tokens": by_tokens,
    }
    if cpu_samples:  # one operating point only where the CPU was timed inside the copies' window
        found["copy_slowdown_same_window"] = copy_same_window / copy_alone
    return found


def _measure_shares(kernel, cold, hidden: int, dtype, repeats: int, generator) -> dict[str, list[float]]:
    """CPU time of the first b of B blocks of an expert (``SHARE_CURVE_TOKENS``), as a fraction of the whole:
    a part costs more than its share (fixed costs per call), which the planner must know."""
    clock = Clock("cpu")
    x = torch.randn(SHARE_CURVE_TOKENS, hidden, generator=generator).to(dtype)
    counts = sorted({max(1, round(cold.blocks * s)) for s in SHARES_MEASURED} | {cold.blocks})

    def run(blocks: int) -> None:
        w13b, w2b = cold.next()
        kernel(x, w13b[: 2 * blocks * cold.block], w2b[:blocks])

    times = {b: median_time(clock, lambda b=b: run(b), max(repeats, SHARE_REPEATS)) for b in counts}
    whole = times[cold.blocks]
    return {"shares": [b / cold.blocks for b in counts], "fraction_of_whole": [times[b] / whole for b in counts]}


def save_calibration(calibration: dict[str, object], path: str | Path) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    write_json_atomic(path, calibration)


def load_calibration(path: str | Path) -> dict[str, object]:
    path = Path(path)
    data = read_json(
        path,
        f"calibration file {path} does not exist; make one with 'fiddler calibrate'",
        "run 'fiddler calibrate' again",
    )
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a fiddler calibration file (schema {SCHEMA!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"{path} has calibration version {data.get('version')}; this code reads {VERSION}")
    return data


def calibration_matches(calibration: dict[str, object], config: ModelConfig, dtype: torch.dtype) -> str | None:
    """None when the file serves this model, else what differs."""
    model = calibration["model"]
    wanted = {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "dtype": str(dtype).removeprefix("torch."),
    }
    diffs = [f"{k} {model.get(k)} != {v}" for k, v in wanted.items() if model.get(k) != v]
    return "; ".join(diffs) or None
