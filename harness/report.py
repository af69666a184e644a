"""From a run folder's raw rows to its summary, tables, plots and the comparison with the paper.

Contract: ``render(run_dir)`` reads ``raw.csv`` and ``matrix.json`` and (re)writes, atomically:
``summary.csv`` (one row per system x cell: ``system, scenario, model, num_layers, dtype,
device, input_tokens, output_tokens, beam_width, gpu_memory_gb, prompts, ttft_s,
decode_tokens_per_s, e2e_tokens_per_s, gpu_hit_rate, h2d_bytes_per_token,
peak_gpu_memory_gb, output_matches_reference, source, status``, medians over prompts;
``status`` is ok, derived, extrapolated (with ``steps_measured``), refused, unsupported or
failed (``NOT_MEASURED``: the row says why, and the cell has no figures);
``output_matches_reference`` is the fraction of the cell's new tokens equal, position by
position, to the reference system's for the same prompt), ``tables.md`` (systems x
[input, output] like the paper's figure, Fiddler's speedup over each baseline, the paper's
published figures beside ours, which commit measured which rows, Fiddler's CPU path per layer
on the host clock, and, with the run's calibration, decode and long prefill against their
bounds; what disturbed the host, where anything did) and one PNG per scenario. Nothing is
measured here.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import zlib
from pathlib import Path

import pandas as pd

from fiddler.files import write_text_atomic
from fiddler.orchestrator import CPU_PATH_COUNTERS
from fiddler.steadiness import BUSY_CORES_LIMIT, recorded_problems
from harness.scenarios import Cell, Run
from harness.telemetry import DIRTY
from harness.timing import MEASURED_ROW_STATUSES, cell_metrics, disturbed, host_disturbance, row_telemetry

SUMMARY_COLUMNS = [
    "system",
    "scenario",
    "model",
    "num_layers",
    "dtype",
    "device",
    "input_tokens",
    "output_tokens",
    "beam_width",
    "gpu_memory_gb",
    "prompts",
    "ttft_s",
    "decode_tokens_per_s",
    "e2e_tokens_per_s",
    "gpu_hit_rate",
    "h2d_bytes_per_token",
    "peak_gpu_memory_gb",
    "output_matches_reference",
    "source",
    "status",
    "steps_measured",
]
PAPER_FILE = Path(__file__).resolve().parent.parent / "results" / "paper" / "published.csv"
# Our systems standing for the paper's baselines (../shared/PAPER.md).
PAPER_BASELINES = {"layer-streaming": "DeepSpeed-MII", "expert-lru": "Mixtral-offloading"}
FIDDLER_PREFIX = "fiddler-"

NOT_MEASURED = ("refused", "unsupported", "failed")  # statuses of a cell with no figures


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _int(value) -> int:
    """CSV columns that mix blanks and numbers come back as floats or strings."""
    return int(float(value))


def _agreement(tokens: list[int], reference: list[int] | None, length: int) -> float | None:
    """Fraction of the first ``length`` positions where both have a token and they agree."""
    if reference is None:
        return None
    n = min(length, len(tokens), len(reference))
    return sum(x == y for x, y in zip(tokens[:n], reference[:n], strict=True)) / n if n else None


def summarize(raw: list[dict], matrix: dict) -> pd.DataFrame:
    plan = [
        Run(r["scenario"], r["input_tokens"], r["output_tokens"], r["beam_width"], tuple(Cell(**c) for c in r["cells"]))
        for r in matrix["runs"]
    ]
    reference = matrix.get("reference")
    by_run: dict[tuple, list[dict]] = {}
    for row in raw:
        key = (
            row["system"],
            row["scenario"],
            int(row["input_tokens"]),
            int(row["run_output_tokens"]),
            int(row["beam_width"]),
        )
        by_run.setdefault(key, []).append(row)
    summary = []
    for (_system, scenario, inputs, run_output, beams), rows in sorted(by_run.items()):
        run = next(
            (
                r
                for r in plan
                if (r.scenario, r.input_tokens, r.output_tokens, r.beam_width) == (scenario, inputs, run_output, beams)
            ),
            None,
        )
        if run is None:
            continue
        ref_rows = {
            int(r["prompt_index"]): r
            for r in by_run.get((reference, scenario, inputs, run_output, beams), [])
            if r["status"] in MEASURED_ROW_STATUSES
        }
        first = rows[0]
        for cell in run.cells:
            out = {
                k: first[k] for k in ("system", "scenario", "model", "num_layers", "dtype", "device", "gpu_memory_gb")
            }
            out.update(
                input_tokens=cell.input_tokens,
                output_tokens=cell.output_tokens,
                beam_width=cell.beam_width,
                source="measured",
                prompts=len(rows),
            )
            failed = [r for r in rows if r["status"] in NOT_MEASURED]
            if failed:
                summary.append(out | {"status": failed[0]["status"]})
                continue
            metrics, agree, hit, h2d, peak = [], [], [], [], []
            for r in rows:
                steps = json.loads(r["step_times_s"])
                generated = _int(r["generated_tokens"])
                wanted = _int(r["run_output_tokens"])
                metrics.append(
                    cell_metrics(
                        float(r["ttft_s"]),
                        steps,
                        cell.output_tokens,
                        generated,
                    )
                )
                ref = ref_rows.get(_int(r["prompt_index"]))
                if cell.beam_width > 1 and (generated < wanted or (ref and _int(ref["generated_tokens"]) < wanted)):
                    ref = None  # a shortened beam search is another search, not a prefix of the full one
                agree.append(
                    _agreement(
                        json.loads(r["token_ids"]),
                        json.loads(ref["token_ids"]) if ref else None,
                        min(cell.output_tokens, generated),
                    )
                )
                hit.append(_number(r.get("gpu_hit_rate")))
                h2d_bytes = _number(r.get("h2d_bytes"))
                h2d.append(h2d_bytes / (cell.input_tokens + generated) if h2d_bytes is not None else None)
                peak.append(_number(r.get("peak_allocated_gb")))
            statuses = {m.status for m in metrics}
            status = "extrapolated" if "extrapolated" in statuses else "derived" if "derived" in statuses else "ok"
            summary.append(
                out
                | {
                    "ttft_s": _median([m.ttft_s for m in metrics]),
                    "decode_tokens_per_s": _median([m.decode_tokens_per_s for m in metrics]),
                    "e2e_tokens_per_s": _median([m.e2e_tokens_per_s for m in metrics]),
                    "gpu_hit_rate": _median(hit),
                    "h2d_bytes_per_token": _median(h2d),
                    "peak_gpu_memory_gb": max((p for p in peak if p is not None), default=None),
                    "output_matches_reference": _median(agree),
                    "status": status,
                    "steps_measured": min(m.steps_measured for m in metrics),
                }
            )
    return pd.DataFrame(summary, columns=SUMMARY_COLUMNS)


def speedups(summary: pd.DataFrame, scenario: str, metric: str, compared: list[str] | None = None) -> pd.DataFrame:
    """Per baseline: best Fiddler policy / baseline on ``metric`` over the cells both have
    (for TTFT the ratio is inverted, so > 1 always means Fiddler is better). Only ``compared``
    systems count (a sweep's reference system is not a baseline)."""
    measured = summary[(summary.scenario == scenario) & summary[metric].notna()]
    if compared is not None:
        measured = measured[measured.system.isin(compared)]
    cell = ["input_tokens", "output_tokens", "beam_width"]
    fiddler = measured[measured.system.str.startswith(FIDDLER_PREFIX)]
    if fiddler.empty:
        return pd.DataFrame()
    best = fiddler.groupby(cell)[metric].min() if metric == "ttft_s" else fiddler.groupby(cell)[metric].max()
    rows = []
    for system, group in measured[~measured.system.str.startswith(FIDDLER_PREFIX)].groupby("system"):
        ratios = []
        for _, row in group.iterrows():
            key = tuple(row[c] for c in cell)
            if key in best.index and row[metric] > 0:
                ours = best[key]
                ratios.append(row[metric] / ours if metric == "ttft_s" else ours / row[metric])
        if ratios:
            rows.append(
                {
                    "baseline": system,
                    "cells": len(ratios),
                    "min": min(ratios),
                    "median": statistics.median(ratios),
                    "max": max(ratios),
                }
            )
    return pd.DataFrame(rows)


def speedups_markdown(ratios: pd.DataFrame) -> list[str]:
    """The lines of a ``speedups`` table."""
    return ["| baseline | cells | min | median | max |", "|---|---|---|---|---|"] + [
        f"| {r.baseline} | {r.cells} | {r['min']:.2f}x | {r['median']:.2f}x | {r['max']:.2f}x |"
        for _, r in ratios.iterrows()
    ]


def load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """A run folder's matrix and raw rows; a folder without a matrix is refused."""
    from harness.runner import read_raw

    if not (run_dir / "matrix.json").exists():
        raise FileNotFoundError(f"{run_dir} has no matrix.json: is it a run folder written by 'python -m harness run'?")
    return json.loads((run_dir / "matrix.json").read_text()), read_raw(run_dir / "raw.csv")


def _display(row: pd.Series, value: str) -> str:
    """A number (marked when extrapolated), or why there is none."""
    if pd.isna(row[value]):
        return row["status"] if row["status"] in NOT_MEASURED else "-"
    mark = "*" if row["status"] == "extrapolated" else ""
    beams = f" (w{row['beam_width']})" if row["beam_width"] > 1 else ""
    return f"{row[value]:.3g}{mark}{beams}"


def _pivot_markdown(frame: pd.DataFrame, value: str) -> str:
    shown = frame.assign(shown=[_display(row, value) for _, row in frame.iterrows()])
    table = shown.pivot_table(
        index="system", columns=["input_tokens", "output_tokens"], values="shown", aggfunc=" / ".join
    )
    header = "| system | " + " | ".join(f"{i}/{o}" for i, o in table.columns) + " |"
    lines = [header, "|" + "---|" * (len(table.columns) + 1)]
    for system, row in table.iterrows():
        lines.append(f"| {system} | " + " | ".join("-" if pd.isna(v) else v for v in row) + " |")
    return "\n".join(lines)


def paper_figures() -> pd.DataFrame:
    return pd.read_csv(PAPER_FILE) if PAPER_FILE.exists() else pd.DataFrame()


def tables_markdown(summary: pd.DataFrame, compared: list[str] | None = None) -> str:
    parts = [
        "# Tables",
        "",
        "Medians over prompts. `input/output` tokens per column; * marks a figure extrapolated from the "
        "decode steps measured under the time limit (summary.csv says how many); derived cells are read "
        "off a longer greedy run (exact).",
    ]
    for scenario, frame in summary.groupby("scenario"):
        metric = "ttft_s" if scenario == "long-prefill" else "e2e_tokens_per_s"
        label = "TTFT, s" if metric == "ttft_s" else "end-to-end tokens/s = output / (prefill + decode)"
        parts += ["", f"## {scenario}: {label}", "", _pivot_markdown(frame, metric)]
        if scenario != "long-prefill":
            parts += ["", f"## {scenario}: decode tokens/s", "", _pivot_markdown(frame, "decode_tokens_per_s")]
        ratios = speedups(summary, scenario, metric, compared)
        if not ratios.empty:
            parts += ["", f"### Fiddler (best policy per cell) over each baseline, {scenario}", ""]
            parts += speedups_markdown(ratios)
    paper = paper_figures()
    if not paper.empty:
        parts += [
            "",
            "## The paper's published figures (results/paper/published.csv)",
            "",
            "| version | environment | quantity | value | source |",
            "|---|---|---|---|---|",
        ]
        parts += [
            f"| {r.version} | {r.environment} | {r.quantity} | {r.value} | {r.source} |" for _, r in paper.iterrows()
        ]
        parts += [
            "",
            "Our systems standing for the paper's baselines: "
            + ", ".join(f"`{ours}` for {theirs}" for ours, theirs in PAPER_BASELINES.items())
            + ".",
        ]
    return "\n".join(parts) + "\n"


def provenance_markdown(raw: list[dict]) -> str:
    """Which commit measured how many rows of each system: a sweep resumed over several sessions
    can span versions of the code, and a table mixing them must say so."""
    counts: dict[str, dict[str, int]] = {}
    for row in raw:
        if row.get("status") in MEASURED_ROW_STATUSES:
            commit = _short_commit(str(row.get("git_commit") or ""))
            per_system = counts.setdefault(row["system"], {})
            per_system[commit] = per_system.get(commit, 0) + 1
    if not counts:
        return ""
    commits = {c for per_system in counts.values() for c in per_system}
    parts = [
        "",
        "## Measured by",
        "",
        (
            "Rows measured by more than one commit:"
            if len(commits) > 1
            else "The measuring commit was not recorded."
            if commits == {NOT_RECORDED}
            else "One commit measured every row."
        ),
        "",
        "| system | commit: measured rows |",
        "|---|---|",
    ]
    for system, per_system in counts.items():
        cells = ", ".join(f"`{c}`: {n}" for c, n in sorted(per_system.items()))
        parts.append(f"| {system} | {cells} |")
    return "\n".join(parts) + "\n"


COMMIT_CHARS = 7  # commits shown abbreviated, as git does
NOT_RECORDED = "not recorded"


def _short_commit(commit: str) -> str:
    dirty = commit.endswith(DIRTY)
    short = commit.removesuffix(DIRTY)[:COMMIT_CHARS]
    return (short + DIRTY if dirty else short) or NOT_RECORDED


BOUND_SYSTEMS = ("fiddler-hybrid", "fiddler-hybrid-stream", "fiddler-paper")
BOUND_TARGET = 0.85  # issue 8: fiddler-hybrid's decode at least 85% of the bound
PREFILL_TARGET = 1.2  # issue 8: Fiddler's long-prefill TTFT within 1.2x of the copy-bound limit


def _decode_hit_rates(raw: list[dict]) -> dict[tuple, float]:
    """Median decode-only GPU hit rate per (system, scenario, input tokens, beam width), from
    the rows' stats where the runner recorded it."""
    rates: dict[tuple, list[float]] = {}
    for row in raw:
        rate = json.loads(row.get("stats") or "{}").get("decode_gpu_hit_rate")
        if rate is not None:
            key = (row["system"], row["scenario"], _int(row["input_tokens"]), _int(row["beam_width"]))
            rates.setdefault(key, []).append(float(rate))
    return {k: statistics.median(v) for k, v in rates.items()}


def row_machines(raw: list[dict]) -> dict[tuple, list[tuple[int, str | None]]]:
    """Per (system, scenario, input tokens, beam width): each measured row's run length and the
    machine calibration it names (``telemetry.machine_calibration``; None where it names none)."""
    found: dict[tuple, list[tuple[int, str | None]]] = {}
    for row in raw:
        if row["status"] in MEASURED_ROW_STATUSES:
            name = row_telemetry(row).get("machine_calibration")
            key = (row["system"], row["scenario"], _int(row["input_tokens"]), _int(row["beam_width"]))
            found.setdefault(key, []).append((_int(row["run_output_tokens"]), name))
    return found


def machines_of_cell(machines: dict[tuple, list[tuple[int, str | None]]], cell: tuple) -> list[str | None]:
    """The machine calibrations (``row_machines``) of the rows that measured ``cell`` (system,
    scenario, input tokens, output tokens, beam width): a greedy cell by the runs that generated
    toward at least its output (``harness.scenarios.runs``' prefix rule), a beam cell by its own."""
    system, scenario, inputs, outputs, width = cell
    rows = machines.get((system, scenario, inputs, width), [])
    return [name for out, name in rows if (out >= outputs if width == 1 else out == outputs)]


def machine_calibrations_named(raw: list[dict], run_dir: Path) -> dict[str, dict]:
    """The machine calibrations the rows name that the run folder holds, by name."""
    names = {n for pairs in row_machines(raw).values() for _, n in pairs if n}
    found = {}
    for name in sorted(names):
        with contextlib.suppress(OSError, ValueError):  # missing or unreadable: its rows take the run's
            found[name] = json.loads((run_dir / name).read_text())
    return found


def steady_machine_calibrations(machines: dict[str, dict]) -> dict[str, dict]:
    """Those of ``machines`` (name -> contents) measured on a steady host: a calibration that
    says it was disturbed (``fiddler.steadiness``) prices its machine slower than it was and
    would lower the bound of the rows measured there, so those rows take the run's instead (as
    do a file's rows when it cannot be judged)."""

    def steady(machine: dict) -> bool:
        try:
            return not recorded_problems(machine)
        except (KeyError, TypeError, ValueError):  # malformed: not judged steady
            return False

    return {name: machine for name, machine in machines.items() if steady(machine)}


def _resident_experts(raw: list[dict], compared: list[str]) -> int | None:
    """How many experts Fiddler's placement kept on the accelerator under the run's budget (the
    compared Fiddler systems' rows); None when no such row says, or they disagree."""
    counts = {
        json.loads(row.get("stats") or "{}").get("experts_resident")
        for row in raw
        if row["system"].startswith("fiddler-") and row["system"] in compared and row["status"] == "ok"
    } - {None}
    return int(counts.pop()) if len(counts) == 1 else None


def prefill_bound_markdown(summary: pd.DataFrame, config, model, raw: list[dict], compared: list[str]) -> str:
    """Long-prefill TTFT of every system against the copy-bound limit (``fiddler.bounds``) at
    the run's Fiddler placement; empty without long-prefill cells, without a Fiddler row to
    read the placement from, or when the GPU holds every expert (no limit to compare with)."""
    from fiddler.bounds import prefill_copy_bound_s

    cells = summary[(summary.scenario == "long-prefill") & summary.ttft_s.notna()]
    resident = _resident_experts(raw, compared)
    if cells.empty or resident is None:
        return ""
    limit = prefill_copy_bound_s(config, model, resident)
    if limit <= 0:
        return ""
    lines = [
        "",
        "## Long prefill against the copy-bound limit",
        "",
        f"Limit: the {config.num_expert_slots - resident} experts the GPU does not hold (Fiddler's placement), "
        f"each copied once at the calibration's rate: {limit:.3g} s. Issue 8's target for Fiddler: TTFT "
        f"within {PREFILL_TARGET}x of it.",
        "",
        "| system | input tokens | TTFT s | TTFT / limit |",
        "|---|---|---|---|",
    ]
    for r in cells.sort_values(["system", "input_tokens"]).itertuples():
        lines.append(f"| {r.system} | {r.input_tokens} | {r.ttft_s:.3g} | {r.ttft_s / limit:.2f}x |")
    return "\n".join(lines) + "\n"


def bounds_markdown(
    summary: pd.DataFrame,
    calibration: dict,
    raw: list[dict],
    compared: list[str],
    machines: dict[str, dict] | None = None,
) -> str:
    """Fiddler's single-batch decode against the bandwidth bound of the run's own calibration
    (``fiddler.bounds``), per cell, at decode's GPU hit rate (the whole run's, marked, where the
    rows do not record decode's own), then every system's long-prefill TTFT against the
    copy-bound limit; empty when the run has no such cells, or its model does not resolve or
    does not match the calibration. ``machines`` (a machine calibration's run-folder-relative
    name -> its contents, for rows that name one: ``harness run --calibrate-machine``; ``render``
    passes the steady ones, ``steady_machine_calibrations``): a cell's bound is then the median
    over its rows of the bound on each row's machine, the run's calibration's for a row whose
    machine is not among them."""
    import torch

    from fiddler.bounds import decode_bound_tokens_per_s, same_window_model
    from fiddler.calibrate import calibration_matches
    from fiddler.config import resolve_recorded_model
    from fiddler.cost_model import LatencyModel

    if summary.empty or summary.model.nunique() != 1:
        return ""
    name, layers = summary.model.iloc[0], int(summary.num_layers.iloc[0])
    try:
        config, _ = resolve_recorded_model(name, layers)
        if calibration_matches(calibration, config, getattr(torch, calibration["model"]["dtype"])):
            return ""
        model = LatencyModel.from_calibration(calibration)
        window = same_window_model(calibration)
    except (FileNotFoundError, ValueError, KeyError, AttributeError):
        return ""
    on_machine, window_on_machine = {}, {}
    for name, machine in (machines or {}).items():
        with contextlib.suppress(ValueError, KeyError):  # an unreadable one: its rows take the run's
            both = LatencyModel.from_calibration(machine), same_window_model(machine)
            on_machine[name], window_on_machine[name] = both
    prefill = prefill_bound_markdown(summary, config, model, raw, compared)
    cells = summary[
        summary.system.isin(BOUND_SYSTEMS) & (summary.scenario == "single-batch") & summary.gpu_hit_rate.notna()
    ]
    if cells.empty:
        return prefill
    decode_rates = _decode_hit_rates(raw)
    measured_by = row_machines(raw)
    lines = [
        "",
        "## Decode against the bandwidth bound (single-batch)",
        "",
        "Bound: the routed experts the GPU does not hold in decode (1 - the GPU hit rate) moved at the "
        "calibration's best division between the CPU path and the copy path, nothing else counted "
        f"(`fiddler.bounds`). Issue 8's target for fiddler-hybrid: {BOUND_TARGET:.0%} of it. "
        "A hit rate marked + is the whole run's (prefill included): the rows did not record decode's own. "
        "Where rows name the calibration of the machine that measured them (`harness run --calibrate-machine`), "
        "a cell's bound is the median over its rows of each machine's (the run's, for a row whose machine "
        "calibration was measured on a disturbed host or cannot be read).",
    ]
    rows = []
    for r in cells.sort_values(["system", "input_tokens", "output_tokens"]).itertuples():
        key = (r.system, r.scenario, int(r.input_tokens), int(r.beam_width))
        hit, mark = (decode_rates[key], "") if key in decode_rates else (float(r.gpu_hit_rate), "+")
        cell = (r.system, r.scenario, int(r.input_tokens), int(r.output_tokens), int(r.beam_width))
        names = machines_of_cell(measured_by, cell) or [None]
        bound = statistics.median(decode_bound_tokens_per_s(config, on_machine.get(n, model), hit) for n in names)
        one_window = [window_on_machine.get(n, window) for n in names]
        same = (
            statistics.median(decode_bound_tokens_per_s(config, m, hit) for m in one_window)
            if all(one_window)
            else None
        )
        rows.append((r, hit, mark, bound, same))
    with_window = any(same is not None for *_, same in rows)
    header = "| system | input/output | GPU hit rate | decode tokens/s | bound | share of bound |"
    if with_window:
        lines += [
            "",
            "One window: the bound with the copies' slowdown taken in the window where the CPU's was "
            "(`fiddler.bounds.same_window_model`: both paths' rates at one moment), for calibrations that "
            "record it; it tells whether the host gives both paths' calibrated rates at once (the target "
            "stays on the bound).",
        ]
        header += " one-window bound | share of it |"
    lines += ["", header, "|---" * header.count(" | ") + "|---|"]

    def figure(bound: float | None, tokens_per_s: float) -> str:
        if bound is None or not math.isfinite(bound):
            return "- | -"
        return f"{bound:.3g} | {tokens_per_s / bound:.0%}"

    for r, hit, mark, bound, same in rows:
        line = (
            f"| {r.system} | {r.input_tokens}/{r.output_tokens} | {hit:.1%}{mark} | "
            f"{r.decode_tokens_per_s:.3g} | {figure(bound, r.decode_tokens_per_s)} |"
        )
        lines.append(line + (f" {figure(same, r.decode_tokens_per_s)} |" if with_window else ""))
    return "\n".join(lines) + "\n" + prefill


# one colour per system in every plot (tab20's pairs: a system and its variant share a hue);
# a system not named here takes one of the colours after these, chosen by its name
SYSTEM_COLOURS = (
    "fiddler-hybrid",
    "fiddler-paper",
    "expert-lru",
    "expert-lru-prefetch",
    "llama-cpp",
    "llama-cpp-cpu-moe",
    "layer-streaming",
    "accelerate-offload",
    "cpu-only",
    "transformers-resident",
    "fiddler-cpu-experts",
    "fiddler-copy-experts",
    "gpu-resident",
)


def system_colours(systems: list[str]) -> list[tuple[float, float, float]]:
    """Colours for ``systems``, the same system the same colour in every plot (two systems
    not named in ``SYSTEM_COLOURS`` may share one)."""
    import matplotlib

    palette = matplotlib.colormaps["tab20"].colors
    spare = len(palette) - len(SYSTEM_COLOURS)

    def index(system: str) -> int:
        if system in SYSTEM_COLOURS:
            return SYSTEM_COLOURS.index(system)
        return len(SYSTEM_COLOURS) + zlib.crc32(system.encode()) % spare

    return [palette[index(s)] for s in systems]


def plot(summary: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for scenario, frame in summary.groupby("scenario"):
        frame = frame.dropna(subset=["e2e_tokens_per_s"])
        if frame.empty:
            continue
        metric = "ttft_s" if scenario == "long-prefill" else "e2e_tokens_per_s"
        table = frame.pivot_table(
            index=["input_tokens", "output_tokens", "beam_width"], columns="system", values=metric, aggfunc="first"
        )
        table.index = [f"{i}/{o}" + (f" w{b}" if b > 1 else "") for i, o, b in table.index]
        fig, ax = plt.subplots(figsize=(max(7.5, 0.9 * len(table) + 2.0), 4.0))
        table.plot.bar(ax=ax, width=0.85, rot=45 if len(table) > 6 else 0, color=system_colours(list(table.columns)))
        ax.set_xlabel("input/output tokens" + (", beam width" if (frame.beam_width > 1).any() else ""))
        ax.set_ylabel("TTFT (s)" if metric == "ttft_s" else "tokens/s (output / (prefill + decode))")
        ax.set_title(f"{scenario}: {frame.model.iloc[0]}, {frame.gpu_memory_gb.iloc[0]:.3g} GB budget")
        # beside the bars, not over them
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        path = out / f"{scenario}.png"
        tmp = out / f".{scenario}.tmp.png"
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written


def render(run_dir: str | Path) -> pd.DataFrame:
    from harness.runner import DISTURBED_RAW, REPLACED_RAW, read_raw, same_measurement

    run_dir = Path(run_dir)
    matrix, raw = load_run(run_dir)
    summary = summarize(raw, matrix)
    tmp = run_dir / ".summary.csv.tmp"
    summary.to_csv(tmp, index=False)
    tmp.replace(run_dir / "summary.csv")  # atomically, like every result file
    tables = (
        tables_markdown(summary, matrix.get("compared"))
        + provenance_markdown(raw)
        + budget_markdown(raw)
        + cpu_path_markdown(raw)
    )
    calibration = None
    if (run_dir / "calibration.json").exists():  # a sweep's own calibration (experiments/gpu_campaign.sh)
        calibration = json.loads((run_dir / "calibration.json").read_text())
        machines = steady_machine_calibrations(machine_calibrations_named(raw, run_dir))
        tables += bounds_markdown(summary, calibration, raw, matrix.get("compared") or matrix["systems"], machines)

    # a kept row raw.csv still holds was not replaced (the sweep stopped between the two writes)
    def replaced(kept: str) -> list[dict]:
        return [r for r in read_raw(run_dir / kept) if not any(same_measurement(r, x) for x in raw)]

    tables += replaced_markdown(raw, replaced(REPLACED_RAW))
    tables += disturbance_markdown(raw, calibration, replaced(DISTURBED_RAW))
    write_text_atomic(run_dir / "tables.md", tables)
    plot(summary, run_dir)
    return summary


def budget_markdown(raw: list[dict]) -> str:
    """Each system's peak GPU memory against the run's budget (issue 8: every run within it):
    torch's peak allocation over the run's rows (load and generation), and the device's memory
    in use after a generation (the CUDA context and the allocator's cache besides), and the peak
    from loading alone where rows record it (their telemetry, since the fifteenth session). Empty
    where no row recorded a peak (runs with ``cpu`` standing in for the GPU)."""
    peaks: dict[str, dict[str, float | None]] = {}
    for row in raw:
        peak, budget = _number(row.get("peak_allocated_gb")), _number(row.get("gpu_memory_gb"))
        if row.get("status") not in MEASURED_ROW_STATUSES or peak is None or budget is None:
            continue
        seen = peaks.setdefault(row["system"], {"budget": budget, "peak": 0.0, "device": 0.0, "load": None})
        seen["budget"] = min(seen["budget"], budget)
        seen["peak"] = max(seen["peak"], peak)
        seen["device"] = max(seen["device"], _number(row.get("device_used_gb")) or 0.0)
        load = _number(row_telemetry(row).get("load_peak_allocated_gb"))
        if load is not None:
            seen["load"] = max(seen["load"] or 0.0, load)
    if not peaks:
        return ""
    lines = [
        "",
        "## Peak GPU memory against the budget",
        "",
        "GB (10^9 bytes); torch's peak allocation over every row of the system (load and generation), "
        "that of loading alone (where recorded), and the device's memory in use after a generation (with "
        "the CUDA context and the allocator's cache).",
        "",
        "| system | budget | peak allocated | peak loading | device in use | within budget |",
        "|---|---|---|---|---|---|",
    ]
    for system, seen in peaks.items():
        over = seen["peak"] - seen["budget"]
        verdict = "yes" if over <= 0 else f"**no**, {over:.2f} over"
        load = "-" if seen["load"] is None else f"{seen['load']:.2f}"
        lines.append(
            f"| {system} | {seen['budget']:.3g} | {seen['peak']:.2f} | {load} | {seen['device']:.1f} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def replaced_markdown(raw: list[dict], replaced: list[dict]) -> str:
    """The rows measured again after a fix to their system (``--remeasure-systems``; the old
    ones in the run folder's raw-replaced.csv, out of the tables): per system, how many, which
    commits measured the old and the new (a new one that failed is not counted: the resume
    retries it). Empty when none were."""
    from harness.runner import run_key

    if not replaced:
        return ""
    lines = [
        "",
        "## Rows measured again after a fix",
        "",
        "Replaced rows are kept in raw-replaced.csv, out of the tables.",
        "",
        "| system | rows replaced | measured before by | measured again | by |",
        "|---|---|---|---|---|",
    ]
    for system in dict.fromkeys(r["system"] for r in replaced):
        old = [r for r in replaced if r["system"] == system]
        keys = {run_key(r) for r in old}
        new = [
            r for r in raw if r["system"] == system and run_key(r) in keys and r.get("status") in MEASURED_ROW_STATUSES
        ]
        lines.append(f"| {system} | {len(old)} | {_commits(old)} | {len(new)} | {_commits(new)} |")
    return "\n".join(lines) + "\n"


def _commits(rows: list[dict]) -> str:
    return ", ".join(sorted({str(r.get("git_commit", ""))[:7] or "?" for r in rows})) or "-"


def disturbance_markdown(raw: list[dict], calibration: dict | None, replaced: list[dict] = ()) -> str:
    """What disturbed the measurements, where anything did: a calibration measured on a busy
    host (every Fiddler row planned with its latencies), the rows during which other processes
    or the hypervisor kept more than ``BUSY_CORES_LIMIT`` cores busy (rows from before the
    harness recorded it say nothing), and such rows that were measured again (``replaced``: the
    run folder's raw-disturbed.csv, out of the tables). Empty when nothing is known to have
    disturbed them."""
    lines = []
    problems = recorded_problems(calibration) if calibration else []
    if problems:
        lines += [
            f"The run's calibration was measured on a disturbed host ({'; '.join(problems)}): Fiddler's "
            "policies in these rows divided the work by its latencies, not the host's.",
            "",
        ]
    tables = 0
    for rows, heading in (
        (raw, "Rows measured while other processes or the hypervisor kept over {} cores busy:"),
        (replaced, "Rows measured again (`--remeasure-disturbed`), kept in raw-disturbed.csv, over {} cores busy:"),
    ):
        busy = []
        for row in filter(disturbed, rows):
            other, steal = host_disturbance(row)
            cell = f"{_int(row['input_tokens'])}/{_int(row['run_output_tokens'])} w{_int(row['beam_width'])}"
            busy.append(f"| {row['system']} | {cell} | {_int(row['prompt_index'])} | {other:.2f} | {steal:.2f} |")
        if busy:
            lines += [""] * bool(tables) + [
                heading.format(BUSY_CORES_LIMIT),
                "",
                "| system | input/output, beams | prompt | other processes' cores | hypervisor's (steal) |",
                "|---|---|---|---|---|",
                *busy,
            ]
            tables += 1
    return "\n".join(["", "## Host disturbance", "", *lines]) + "\n" if lines else ""


def _cpu_path_per_job(row: dict) -> dict[str, float] | None:
    """One row's CPU path in ms per MoE layer that used it, prefill and decode apart."""
    stats = json.loads(row.get("stats") or "{}")
    prefill = stats.get("prefill") or {}
    if not stats.get("cpu_jobs") or "cpu_jobs" not in prefill:
        return None
    out = {}
    for phase, counters in (
        ("prefill", prefill),
        ("decode", {k: stats[k] - prefill[k] for k in CPU_PATH_COUNTERS}),
    ):
        jobs = counters["cpu_jobs"]
        for name in ("start", "compute", "wait"):
            out[f"{phase}_{name}"] = 1e3 * counters[f"cpu_{name}_s"] / jobs if jobs else math.nan
    return out


def cpu_path_markdown(raw: list[dict]) -> str:
    """Fiddler's CPU path per MoE layer that used it, on the host clock (every row since the
    executor counts it): how long after the routing was known it began computing, how long it
    computed, how long the main thread then waited for it; prefill and decode apart, medians
    over prompts. A late start is time the planner does not count. Empty when no row says."""
    cells: dict[tuple, list[dict[str, float]]] = {}
    for row in raw:
        timing = _cpu_path_per_job(row) if row["status"] in MEASURED_ROW_STATUSES else None
        if timing:
            key = (row["system"], row["scenario"], _int(row["input_tokens"]), _int(row["beam_width"]))
            cells.setdefault(key, []).append(timing)
    if not cells:
        return ""
    columns = [f"{p}_{n}" for p in ("prefill", "decode") for n in ("start", "compute", "wait")]
    lines = [
        "",
        "## Fiddler's CPU path per MoE layer (host clock, ms)",
        "",
        "Per layer that used the CPU: start = from the routing known on the host to the CPU computing "
        "(the planner counts none of it); compute; wait = the main thread's wait for it after queueing the "
        "accelerator's work. Medians over prompts.",
        "",
        "| system | scenario | input tokens | beams | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for (system, scenario, tokens, beams), timings in sorted(cells.items()):
        values = [_median([t[c] for t in timings]) for c in columns]  # NaN (a phase without CPU work) left out
        shown = ["-" if v is None else f"{v:.2f}" for v in values]  # '-': no layer of that phase used the CPU
        lines.append(f"| {system} | {scenario} | {tokens} | {beams} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


# The paper's v1 figures per environment (results/paper/published.csv), for the comparison.
PAPER_V1 = {
    "paper-env1": {
        "fiddler_average": 2.48,
        "fiddler_512": 3.2,
        "over_layer-streaming": 19.4,
        "over_expert-lru": 8.2,
        "layer-streaming": (0.11, 0.13),
        "expert-lru": (0.25, 0.30),
    },
    "paper-env2": {
        "fiddler_average": 2.74,
        "fiddler_512": 3.9,
        "over_layer-streaming": 22.5,
        "over_expert-lru": 10.1,
        "layer-streaming": (0.08, 0.11),
        "expert-lru": (0.21, 0.26),
    },
}
DEVIATION_FLAG = 0.25


def paper_comparison(summary: pd.DataFrame, environment: str, fiddler: str = "fiddler-paper") -> pd.DataFrame:
    """Simulated (or measured) single-batch figures beside the paper's v1 figures for the same
    environment; ``deviation`` is ours / paper's - 1, flagged beyond 25%."""
    paper = PAPER_V1[environment]
    single = summary[(summary.scenario == "single-batch") & ~summary.status.isin(NOT_MEASURED)]
    ours = single[single.system == fiddler]
    rows = [
        ("Fiddler average tokens/s over the grid", paper["fiddler_average"], ours.e2e_tokens_per_s.mean()),
        (
            "Fiddler tokens/s at 512 output tokens",
            paper["fiddler_512"],
            ours[ours.output_tokens == 512].e2e_tokens_per_s.mean(),  # NaN on a grid without 512
        ),
    ]
    for baseline in ("layer-streaming", "expert-lru"):
        theirs = single[single.system == baseline]
        if theirs.empty:
            continue
        merged = ours.merge(theirs, on=["input_tokens", "output_tokens"], suffixes=("", "_b"))
        speedup = (merged.e2e_tokens_per_s / merged.e2e_tokens_per_s_b).mean()
        low, high = paper[baseline]
        rows.append((f"speedup over {PAPER_BASELINES[baseline]} ({baseline})", paper[f"over_{baseline}"], speedup))
        rows.append(
            (
                f"{PAPER_BASELINES[baseline]} ({baseline}) tokens/s, mid of published range",
                (low + high) / 2,
                theirs.e2e_tokens_per_s.mean(),
            )
        )
    frame = pd.DataFrame(rows, columns=["quantity", "paper", "ours"])
    frame["deviation"] = frame.ours / frame.paper - 1
    frame["flag"] = frame.deviation.abs() > DEVIATION_FLAG
    return frame


def comparison_markdown(frame: pd.DataFrame, environment: str) -> str:
    lines = [f"| {environment} | paper | ours | deviation |", "|---|---|---|---|"]
    for _, r in frame.iterrows():
        mark = " **>25%**" if r.flag else ""
        lines.append(f"| {r.quantity} | {r.paper:.3g} | {r.ours:.3g} | {r.deviation:+.0%}{mark} |")
    return "\n".join(lines) + "\n"
