"""Does a CPU expert kernel slow down when it computes for longer than calibration's bursts? (issue 7)

On the GPU host the CPU jobs of long prefills and beam-search steps took 1.2-1.6x their
calibrated time (the executor's in-run corrections, ``stats.cpu_factor`` / ``cpu_slowdown`` in
results/h200-long-prefill-24gb/ and results/h200-beam-search-24gb/), while single-token decode
jobs ran as calibrated. Calibration times each token count in a burst (one warm-up call, then a
few); those runs keep the CPU computing for seconds, at several tokens per expert, and
compute-bound vector or tile work may run at a lower clock when sustained. Per kernel and token
count this measures:

- ``burst``: calibration's own measurement (``fiddler.calibrate.median_time``);
- ``sustained``: calls back to back on cold experts (``fiddler.calibrate.ColdExperts``, as
  calibration rotates them) for ``--seconds``: the median call in the first quarter second and
  in the last second, each against the burst;
- ``gapped``: the same with the CPU idle between calls for a share ``1 - --duty`` of the time,
  as in a beam step (the CPU computing ~12 of each ~16 ms layer).

Writes ``<out>/cpu_sustained.json`` (atomically, after each kernel), with each series' call
times thinned to at most ``SERIES_POINTS`` points, and ``<out>/cpu_sustained.md`` (a table of
the ratios; ``--report DIR`` renders it again from DIR's json, anywhere).
Usage: ``python experiments/cpu_sustained.py --out DIR [--kernels amx-bf16,avx512-bf16]
[--tokens 1,4,16,128] [--seconds 3] [--duty 0.75] [--device cuda]``, or ``--report DIR``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fiddler.calibrate import ColdExperts, median_time
from fiddler.config import resolve_model
from fiddler.cpu_experts import CpuExpertKernel, available_kernels, kernel_limit, make_kernel, set_cpu_threads
from fiddler.files import write_json_atomic, write_text_atomic
from fiddler.machine import machine_identity
from fiddler.timing import Clock

BURST_REPEATS = 5  # calibration's default
FIRST_WINDOW_S = 0.25  # "the start" of a sustained series
LAST_WINDOW_S = 1.0  # "the end" of it
SERIES_POINTS = 200
REST_S = 1.0  # idle before each series


def run_series(
    kernel: CpuExpertKernel, cold: ColdExperts, x: torch.Tensor, seconds: float, duty: float
) -> list[tuple[float, float]]:
    """(start since the series began, duration) of each call, for ``seconds``, after the CPU
    rested ``REST_S`` (a series must not begin warm from the one before); after each call the
    CPU idles for (1 - duty) / duty of the call's time."""
    time.sleep(REST_S)
    clock = Clock("cpu")
    series, origin = [], clock.now()
    while (now := clock.now()) - origin < seconds:
        kernel(x, *cold.next())
        took = clock.now() - now
        series.append((now - origin, took))
        if duty < 1.0:
            time.sleep(took * (1.0 - duty) / duty)
    return series


def summarise(series: list[tuple[float, float]], burst: float, seconds: float) -> dict[str, object]:
    first = [d for t, d in series if t < FIRST_WINDOW_S] or [series[0][1]]
    last = [d for t, d in series if t >= seconds - LAST_WINDOW_S] or [series[-1][1]]
    step = max(1, -(-len(series) // SERIES_POINTS))  # rounded up: at most SERIES_POINTS points
    elapsed = series[-1][0] + series[-1][1]
    return {
        "calls": len(series),
        # the computing share achieved: sleeps of tens of microseconds overshoot
        "duty": sum(d for _, d in series) / elapsed,
        "first_s": statistics.median(first),
        "last_s": statistics.median(last),
        "first_over_burst": statistics.median(first) / burst,
        "last_over_burst": statistics.median(last) / burst,
        "series": [[round(t, 4), round(d, 6)] for t, d in series[::step]],
    }


def _share(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0%}"


def report(record: dict[str, object]) -> str:
    """The ratios of a record as a markdown table: each series' start and end against the burst."""
    lines = [
        f"# CPU kernels in bursts and sustained ({record['machine'].get('cpu_model', 'CPU')}, "
        f"{record['threads']} threads)",
        "",
        f"Median call time in the first {FIRST_WINDOW_S} s and the last {LAST_WINDOW_S} s of "
        f"{record['seconds']} s of calls, over the burst's (calibration's measurement); gapped: idle "
        f"between calls, asked {record['duty']:.0%} computing (achieved in brackets). The experts' memory "
        f"on huge pages: {_share(record.get('huge_page_share_start'))} as it began, "
        f"{_share(record.get('huge_page_share_end'))} as it ended.",
        "",
        "| kernel | tokens | burst ms | sustained start | sustained end | gapped start | gapped end (duty) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in record["results"]:
        sustained, gapped = row["sustained"], row["gapped"]
        lines.append(
            f"| {row['kernel']} | {row['tokens']} | {row['burst_s'] * 1e3:.2f} | "
            f"{sustained['first_over_burst']:.2f}x | {sustained['last_over_burst']:.2f}x | "
            f"{gapped['first_over_burst']:.2f}x | {gapped['last_over_burst']:.2f}x ({gapped['duty']:.0%}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for cpu_sustained.json and .md")
    parser.add_argument("--report", type=Path, help="only render DIR/cpu_sustained.md from DIR's json")
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--kernels", help="comma-separated; default every kernel that runs here")
    parser.add_argument("--tokens", default="1,4,16,128")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--duty", type=float, default=0.75, help="computing share of the gapped series")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the random experts are generated (then kept in host memory)",
    )
    args = parser.parse_args()
    if args.report:
        source = args.report / "cpu_sustained.json"
        if not source.exists():
            parser.error(f"{source} does not exist: give the folder a run of this script wrote")
        write_text_atomic(args.report / "cpu_sustained.md", report(json.loads(source.read_text())))
        return 0
    if args.out is None:
        parser.error("give --out DIR to measure, or --report DIR to render a measurement")
    if not 0.0 < args.duty <= 1.0:
        parser.error(f"--duty must lie in (0, 1], got {args.duty}")
    if args.seconds <= LAST_WINDOW_S:
        parser.error(f"--seconds must exceed the last window ({LAST_WINDOW_S} s), got {args.seconds}")
    names = args.kernels.split(",") if args.kernels else available_kernels()
    unavailable = sorted(set(names) - set(available_kernels()))
    if unavailable:
        parser.error(f"kernels {unavailable} do not run here; this machine has {available_kernels()}")
    tokens = [int(t) for t in args.tokens.split(",")]

    config, _ = resolve_model(args.model)
    threads = set_cpu_threads(args.threads)
    cold = ColdExperts(config, torch.bfloat16, 0, torch.device(args.device))
    record: dict[str, object] = {
        "machine": machine_identity(torch.device(args.device)),
        "model": args.model,
        "threads": threads,
        "seconds": args.seconds,
        "duty": args.duty,
        # the experts' memory on transparent huge pages, as the measurement began (and "_end"
        # as it ended): the kernel may collapse small pages into huge ones in the background
        "huge_page_share_start": cold.arena.huge_page_share(),
        "results": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        measure(names, tokens, cold, config.hidden_size, args.seconds, args.duty, args.out, record)
    finally:
        cold.arena.close()
    return 0


def measure(
    names: list[str],
    tokens: list[int],
    cold: ColdExperts,
    hidden: int,
    seconds: float,
    duty: float,
    out: Path,
    record: dict[str, object],
) -> None:
    """Every kernel and token count: burst, sustained and gapped; the record written after each kernel."""
    generator = torch.Generator().manual_seed(0)
    clock = Clock("cpu")
    for name in names:
        kernel, limit = make_kernel(name), kernel_limit(name)
        for n in tokens:
            if limit is not None and n > limit:
                continue  # beyond its limit the kernel hands over to torch's: not this kernel
            x = torch.randn(n, hidden, generator=generator).bfloat16()
            burst = median_time(clock, lambda x=x, k=kernel: k(x, *cold.next()), BURST_REPEATS)
            row = {"kernel": name, "tokens": n, "burst_s": burst}
            for label, share in (("sustained", 1.0), ("gapped", duty)):
                row[label] = summarise(run_series(kernel, cold, x, seconds, share), burst, seconds)
            record["results"].append(row)
            print(
                f"{name} {n:>4} tokens: burst {burst * 1e3:.2f} ms; sustained start/end "
                f"{row['sustained']['first_over_burst']:.2f}x / {row['sustained']['last_over_burst']:.2f}x; "
                f"gapped {row['gapped']['first_over_burst']:.2f}x / {row['gapped']['last_over_burst']:.2f}x",
                flush=True,
            )
        record["huge_page_share_end"] = cold.arena.huge_page_share()
        write_json_atomic(out / "cpu_sustained.json", record)
        write_text_atomic(out / "cpu_sustained.md", report(record))


if __name__ == "__main__":
    sys.exit(main())
