"""Predicted against measured: the simulator on a measured run's own cells (issue 7's check).

Contract: ``validate(run_dir, hardware, calibration)`` reads a measured run's ``summary.csv``,
simulates each of its systems that the simulator models, for the same cells, model and GPU
budget, on ``hardware`` (the measured machine's profile) with ``calibration`` (the calibration
file the run used) in place of the profile's latencies, and returns one row per (system,
cell, metric): measured, predicted, ``error`` = predicted / measured - 1, and whether it lies
within ``TOLERANCE`` (a metric the cell did not measure, such as decode at one output token,
has no row). A measured figure that was extrapolated says so (``measured_status``).
Systems the simulator does not model are listed, not dropped silently.
``validation_markdown`` renders the rows.

``run_corrections(run_dir)`` reads what each Fiddler system's executor learned in the run (the
medians over its rows of ``stats.cpu_factor`` and ``stats.cpu_slowdown``: how much slower or
faster its CPU jobs ran than the calibration, alone and beside copies); ``validate(...,
corrections=...)`` plans with them instead of the calibration as it is. That is not a
prediction (it reads the measurement), it tells where a miss comes from: what is left of the
error once the CPU is priced as it ran lies outside the CPU's speed.

``validate(..., per_machine=True)`` prices each measured row with the calibration of the machine
that measured it (``telemetry.machine_calibration``, a file in the run folder that ``harness run
--calibrate-machine`` wrote before the row; rows without one take ``calibration``), and a cell's
prediction is the median over its rows'. That is a prediction: each file was measured before
its rows, by ``fiddler calibrate``'s code. ``machine_calibrations(run_dir, calibration)`` lists
the files with how many rows each priced and their speeds against ``calibration``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from fiddler.calibrate import load_calibration
from fiddler.config import resolve_recorded_model
from harness.report import machines_of_cell, row_machines
from harness.scenarios import Cell
from harness.simulate import SIMULATED_SYSTEMS, SimulationSpec, simulate
from harness.timing import MEASURED_ROW_STATUSES

TOLERANCE = 0.15  # issue 7: decode tokens/s and TTFT within +-15%
METRICS = ("decode_tokens_per_s", "ttft_s", "e2e_tokens_per_s")
CELL_KEY = ["system", "scenario", "input_tokens", "output_tokens", "beam_width"]
MEASURED_STATUSES = ("ok", "derived", "extrapolated")


def run_corrections(run_dir: str | Path) -> dict[str, tuple[float, float]]:
    """Per system whose rows record the executor's in-run corrections: (median CPU curve
    scale, median CPU slowdown beside copies) over its measured rows."""
    learned: dict[str, list[tuple[float, float]]] = {}
    for row in _raw_records(Path(run_dir), "the run's corrections are read from its raw rows"):
        stats = json.loads(row["stats"] or "{}") if row["status"] in MEASURED_ROW_STATUSES else {}
        if "cpu_factor" in stats and "cpu_slowdown" in stats:
            learned.setdefault(row["system"], []).append((float(stats["cpu_factor"]), float(stats["cpu_slowdown"])))
    return {
        system: (statistics.median(f for f, _ in pairs), statistics.median(d for _, d in pairs))
        for system, pairs in learned.items()
    }


def _raw_records(run_dir: Path, why: str) -> list[dict]:
    """The run folder's raw rows as read, empty fields as "" (any columns: tests write partial
    folders); a folder without raw.csv is refused, saying ``why`` it was needed."""
    path = run_dir / "raw.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {why}")
    return pd.read_csv(path, keep_default_na=False).to_dict("records")


def _row_machines(run_dir: Path) -> dict[tuple, list[tuple[int, str | None]]]:
    """``harness.report.row_machines`` of the run folder's raw rows."""
    return row_machines(_raw_records(run_dir, "validate a run folder written by 'python -m harness run'"))


def machine_calibrations(run_dir: str | Path, calibration: str | Path) -> list[dict]:
    """Each machine calibration the rows name (oldest first): its file, when it was made, how
    many measured rows name it (of every system, simulated or not), its CPU expert at one token
    and its copy time against ``calibration``'s, and what ``fiddler.steadiness`` found disturbed
    in it."""
    run_dir = Path(run_dir)
    counts: dict[str, int] = {}
    for pairs in _row_machines(run_dir).values():
        for _, name in pairs:
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
    base = load_calibration(calibration)
    found = []
    for name, rows in counts.items():
        machine = load_calibration(run_dir / name)
        found.append(
            {
                "file": name,
                "created": machine["created"],
                "rows": rows,
                "cpu_expert_1_token_ms": 1e3 * machine["cpu_expert_s"][0],
                "cpu_vs_run_calibration": machine["cpu_expert_s"][0] / base["cpu_expert_s"][0],
                "copy_vs_run_calibration": machine["copy_expert_s"] / base["copy_expert_s"],
                "disturbed": "; ".join(machine.get("steadiness", {}).get("problems", [])),
            }
        )
    return sorted(found, key=lambda m: m["created"])


def validate(
    run_dir: str | Path,
    hardware: str,
    calibration: str | Path,
    samples: int = 8,
    corrections: dict[str, tuple[float, float]] | None = None,
    per_machine: bool = False,
) -> pd.DataFrame:
    if per_machine and corrections:
        raise ValueError(
            "--per-machine and --with-run-corrections do not combine: the run's corrections were learned "
            "against the run's calibration, not each machine's; validate with one of them"
        )
    run_dir = Path(run_dir)
    path = run_dir / "summary.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: validate a run folder written by 'python -m harness run'")
    measured = pd.read_csv(path)
    measured = measured[measured.status.isin(MEASURED_STATUSES)]
    if measured.empty:
        raise ValueError(f"{path} has no measured cells")
    budgets = measured.gpu_memory_gb.dropna().unique()
    models = measured[["model", "num_layers"]].drop_duplicates()
    if len(budgets) == 0:
        raise ValueError(f"{path} records no GPU budget: validation simulates a run made with --gpu-memory-gb")
    if len(budgets) != 1 or len(models) != 1:
        raise ValueError(f"{path} mixes budgets or models; validate one sweep at a time")
    name, layers = models.iloc[0]
    config, _ = resolve_recorded_model(name, int(layers))
    systems = tuple(s for s in dict.fromkeys(measured.system) if s in SIMULATED_SYSTEMS)
    cells = tuple(
        Cell(r.scenario, int(r.input_tokens), int(r.output_tokens), int(r.beam_width))
        for r in measured[CELL_KEY[1:]].drop_duplicates().itertuples()
    )

    def predict(calibration: str | Path) -> pd.DataFrame:
        spec = SimulationSpec(
            systems=systems,
            cells=cells,
            config=config,
            hardware=hardware,
            gpu_memory_gb=float(budgets[0]),
            samples=samples,
            calibration=str(calibration),
            cpu_corrections=tuple((system, *pair) for system, pair in (corrections or {}).items()),
        )
        # columns even when none of the run's systems is simulated (each is then listed, not dropped)
        return pd.DataFrame(simulate(spec), columns=[*CELL_KEY, *METRICS, "status"])

    predicted = _predict_per_machine(run_dir, calibration, predict) if per_machine else predict(calibration)
    joined = measured.merge(predicted, on=CELL_KEY, suffixes=("_measured", "_predicted"), how="left")
    rows = []
    for r in joined.itertuples():
        simulated = r.system in SIMULATED_SYSTEMS
        for metric in METRICS:
            value, guess = getattr(r, f"{metric}_measured"), getattr(r, f"{metric}_predicted", None)
            if pd.isna(value):  # nothing measured to hold a prediction against (no decode at 1 output token)
                continue
            error = guess / value - 1 if simulated and pd.notna(guess) and value else None
            rows.append(
                {
                    **{k: getattr(r, k) for k in CELL_KEY},
                    "metric": metric,
                    "measured": value,
                    "predicted": guess if simulated else None,
                    "error": error,
                    "within_tolerance": None if error is None else abs(error) <= TOLERANCE,
                    "measured_status": r.status_measured,
                    "note": "" if simulated else "not simulated",
                }
            )
    columns = [*CELL_KEY, "metric", "measured", "predicted", "error", "within_tolerance", "measured_status", "note"]
    return pd.DataFrame(rows, columns=columns)


def _predict_per_machine(
    run_dir: Path, calibration: str | Path, predict: Callable[[str | Path], pd.DataFrame]
) -> pd.DataFrame:
    """Every cell predicted with the calibration of each machine that measured one of its rows
    (``harness.report.machines_of_cell``); the cell's prediction is the median over its rows'."""
    machines = _row_machines(run_dir)
    if not any(name for pairs in machines.values() for _, name in pairs):
        raise ValueError(
            f"no measured row in {run_dir} names its machine's calibration (telemetry.machine_calibration): "
            "measure with 'python -m harness run --calibrate-machine', or validate without --per-machine"
        )
    names = {None} | {name for pairs in machines.values() for _, name in pairs}  # None: the run's calibration
    by_file = {name: predict(calibration if name is None else run_dir / name).set_index(CELL_KEY) for name in names}
    frame = by_file[None].copy()
    for cell in frame.index:
        measured_by = machines_of_cell(machines, cell)
        for metric in METRICS:
            values = [by_file[n].at[cell, metric] for n in measured_by] or [frame.at[cell, metric]]
            values = [v for v in values if pd.notna(v)]
            frame.at[cell, metric] = statistics.median(values) if values else float("nan")
    return frame.reset_index()


def validation_markdown(
    rows: pd.DataFrame,
    run_dir: str | Path,
    hardware: str,
    calibration: str | Path,
    corrections: dict[str, tuple[float, float]] | None = None,
    machines: list[dict] | None = None,
) -> str:
    """``machines``: ``machine_calibrations``' list when each row was priced on its own machine."""
    title = "# Predicted against measured" + (", each row on its own machine's calibration" if machines else "")
    priced = "each row's machine calibration (below), else" if machines else "the run's calibration"
    lines = [
        title + (", with the run's own CPU corrections" if corrections else ""),
        "",
        f"Measured: `{run_dir}`. Predicted: `python -m harness validate` on hardware profile `{hardware}` with "
        f"{priced} `{calibration}`. Error = predicted / measured - 1; target within "
        f"+-{TOLERANCE:.0%} (decode tokens/s and TTFT). `extrapolated`: the measured end-to-end figure was "
        "itself extrapolated from the steps that fit the run's time limit.",
        "",
    ]
    if machines:
        lines += [
            "Each measured row was priced with the calibration of the machine that measured it (`harness run "
            "--calibrate-machine`: made at the start of each piece of the sweep, before its rows), rows "
            "without one with the run's calibration; a cell's prediction is the median over its rows'. "
            "The machines against the run's calibration:",
            "",
            "| file | made | rows | CPU expert, 1 token | CPU vs run's | copy vs run's | disturbed |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| `{m['file']}` | {m['created']} | {m['rows']} | {m['cpu_expert_1_token_ms']:.2f} ms | "
                f"{m['cpu_vs_run_calibration']:.2f}x | {m['copy_vs_run_calibration']:.2f}x | {m['disturbed'] or 'no'} |"
                for m in machines
            ),
            "",
        ]
    if corrections:
        lines += [
            "**Not a prediction**: Fiddler's plans were made with what each system's executor learned in "
            "the run (`--with-run-corrections`: medians over its rows of the CPU curve's scale and the CPU's "
            "slowdown beside copies, each row's value at the end of its generation, prefill and decode "
            "pooled), to tell how much of the error is the CPU's speed in the run:",
            "",
            "| system | CPU curve scale | CPU slowdown beside copies |",
            "|---|---|---|",
            *(f"| {system} | {f:.2f} | {d:.2f} |" for system, (f, d) in corrections.items()),
            "",
        ]
    lines += [
        *_summary_lines(rows),
        "| system | cell (in/out, beams) | metric | measured | predicted | error | within |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows.itertuples():
        cell = f"{r.input_tokens}/{r.output_tokens}, {r.beam_width}"
        predicted = "-" if pd.isna(r.predicted) else f"{r.predicted:.3g}"
        error = "-" if r.error is None or pd.isna(r.error) else f"{r.error:+.0%}"
        within = r.note or ("-" if r.within_tolerance is None else "yes" if r.within_tolerance else "no")
        status = "" if r.measured_status in ("ok", "derived") else f" ({r.measured_status})"
        lines.append(
            f"| {r.system} | {cell} | {r.metric} | {r.measured:.3g}{status} | {predicted} | {error} | {within} |"
        )
    return "\n".join(lines) + "\n"


def _summary_lines(rows: pd.DataFrame) -> list[str]:
    """Per system and metric: cells held against a prediction, how many lie within the
    tolerance, and the error range (the whole table follows)."""
    checked = rows.dropna(subset=["error"])
    if checked.empty:
        return []
    lines = ["| system | metric | cells | within | error range |", "|---|---|---|---|---|"]
    for (system, metric), group in checked.groupby(["system", "metric"], sort=False):
        errors = group.error.astype(float)
        lines.append(
            f"| {system} | {metric} | {len(group)} | {int(group.within_tolerance.astype(bool).sum())} | "
            f"{errors.min():+.0%} .. {errors.max():+.0%} |"
        )
    return [*lines, "", "Every cell:", ""]
