"""``python -m harness``: run a sweep into a run folder, or re-render a folder's report.

- ``run --systems a,b --scenario S [--grid paper-v3 | --inputs 32,64 --outputs 64,128]
  [--beam-widths 4,8] --model <preset|dir> [--layers L] [--gpu-memory-gb G] [--device cuda|cpu]
  [--dtype bfloat16|float32] [--dataset sharegpt|random|FILE] [--prompts-per-cell N]
  [--reference SYSTEM] [--run-time-limit S] [--no-new-system-after S] [--calibration FILE]
  [--calibrate-machine] [--rounds N] [--remeasure-disturbed] [--remeasure-systems a,b]
  [--out DIR]``: writes everything
  into DIR (default ``results/<date>_<gpu or cpu>_<model>``) and resumes a folder it finds
  there; exits 1 when a system failed (its rows say why; the other systems ran).
- ``simulate --hardware <paper-env1|paper-env2|paper-env3|h200-host|FILE> --systems ... --scenario S
  [--grid ...] [--gpu-memory-gb G] [--routing uniform|FILE] [--calibration FILE] --out DIR``:
  predicted cells, same summary.csv columns (``source`` simulated), tables and plots;
  ``--calibration`` replaces a measured machine's latencies with a run's own file.
- ``report DIR``: re-renders summary, tables and plots from DIR's raw rows.
- ``headline DIR --output N [--prompts K] [--metric M]``: the README's headline tables (one
  metric at one output length per system and input length, Fiddler's speedup over each
  baseline) on each cell's first K prompts (K = 1: round 0), as markdown on stdout.
- ``validate DIR --hardware <profile> --calibration FILE [--out DIR2] [--per-machine]
  [--with-run-corrections]``: the simulator on DIR's measured cells with the run's calibration;
  writes validation.csv and validation.md (into DIR unless ``--out``); with ``--per-machine``,
  each row priced with the calibration of the machine that measured it (``run
  --calibrate-machine``; validation-per-machine.*); with ``--with-run-corrections``, Fiddler
  planned with the CPU corrections its executor learned in the run (not a prediction;
  ...-run-corrections.*). Each markdown ends with where Fiddler's TTFT went against its own
  plan (``harness.prefill_breakdown``), for rows that recorded prefill counters.

A user error prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import pandas as pd
import torch

from baselines import SYSTEMS
from fiddler.cli import run_command
from fiddler.config import resolve_model
from fiddler.engine import parse_dtype
from fiddler.files import write_json_atomic, write_text_atomic
from harness.report import SUMMARY_COLUMNS, render
from harness.runner import SweepSpec, read_raw, run_sweep
from harness.scenarios import GRIDS, SCENARIOS, cells

RESULTS = Path(__file__).resolve().parent.parent / "results"


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)


def int_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def default_out(model: str, device: str) -> Path:
    where = torch.cuda.get_device_name(0).replace(" ", "-") if device.startswith("cuda") else "cpu"
    name = Path(model).name if Path(model).is_dir() else model
    return RESULTS / f"{datetime.date.today().isoformat()}_{where}_{name}"


def default_reference(config, device: str, systems: tuple[str, ...]) -> str:
    """transformers with the whole model where it fits the device (on the CPU: ``cpu-only``),
    else the first system of the sweep."""
    if not device.startswith("cuda"):
        return "cpu-only"
    whole_gb = config.total_params * torch.empty((), dtype=torch.bfloat16).element_size() / 1e9
    free_gb = torch.cuda.mem_get_info()[0] / 1e9
    return "transformers-resident" if whole_gb < free_gb else systems[0]


def system_list(text: str, known, problem: str) -> tuple[str, ...]:
    """Comma-separated system names, each one of ``known``; else one error naming the rest."""
    systems = tuple(s for s in text.split(",") if s)
    unknown = [s for s in systems if s not in known]
    if unknown:
        raise ValueError(f"{problem}: {unknown}; choose from {', '.join(known)}")
    return systems


def cmd_run(args: argparse.Namespace) -> int:
    systems = system_list(args.systems, sorted(SYSTEMS), "unknown systems")
    config, _ = resolve_model(args.model, args.layers)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cell_list = cells(
        args.scenario, args.grid, int_list(args.inputs), int_list(args.outputs), int_list(args.beam_widths)
    )
    reference = args.reference if args.reference is not None else default_reference(config, device, systems)
    spec = SweepSpec(
        systems=systems,
        cells=tuple(cell_list),
        model=args.model,
        layers=args.layers,
        seed=args.seed,
        device=device,
        dtype=parse_dtype(args.dtype or config.dtype),
        gpu_memory_gb=args.gpu_memory_gb,
        dataset=args.dataset,
        prompts_per_cell=args.prompts_per_cell,
        reference=reference or None,
        run_time_limit_s=args.run_time_limit,
        no_new_system_after_s=args.no_new_system_after,
        calibration=args.calibration,
        calibrate_machine=args.calibrate_machine,
        rounds=args.rounds,
        remeasure_disturbed=args.remeasure_disturbed,
        remeasure_systems=system_list(
            args.remeasure_systems or "", systems, "--remeasure-systems names systems not in --systems"
        ),
        cpu_threads=args.cpu_threads,
        out=Path(args.out) if args.out else default_out(args.model, device),
    )
    out = run_sweep(spec)
    print(out)
    failed = [r for r in read_raw(out / "raw.csv") if r["status"] == "failed"]
    if failed:  # recorded, and the sweep went on; the exit status still says so
        systems = ", ".join(sorted({r["system"] for r in failed}))
        print(f"error: {len(failed)} runs failed ({systems}): see raw.csv's reason and the log", file=sys.stderr)
        return 1
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from harness.report import plot, tables_markdown
    from harness.simulate import SIMULATED_SYSTEMS, SimulationSpec, load_profile, profile_with_calibration, simulate

    systems = system_list(args.systems, SIMULATED_SYSTEMS, "systems not simulated")
    config, _ = resolve_model(args.model, args.layers)
    if args.calibration:
        calibration, _ = profile_with_calibration(args.hardware, args.calibration)
    else:
        calibration, _ = load_profile(args.hardware)
    cell_list = cells(
        args.scenario, args.grid, int_list(args.inputs), int_list(args.outputs), int_list(args.beam_widths)
    )
    budget = args.gpu_memory_gb or float(calibration["hardware"]["gpu_memory_gb"])
    spec = SimulationSpec(
        systems=systems,
        cells=tuple(cell_list),
        config=config,
        hardware=args.hardware,
        gpu_memory_gb=budget,
        routing=args.routing,
        samples=args.samples,
        seed=args.seed,
        calibration=str(args.calibration) if args.calibration else None,
    )
    summary = pd.DataFrame(simulate(spec), columns=SUMMARY_COLUMNS)
    out = Path(args.out)
    write_csv_atomic(summary, out / "summary.csv")
    write_json_atomic(
        out / "env.json",
        {
            "hardware": args.hardware,
            "profile": calibration.get("profile"),
            "settings": {k: str(v) for k, v in vars(args).items() if k != "func"},
        },
    )
    write_text_atomic(out / "tables.md", tables_markdown(summary))
    plot(summary, out)
    print(out / "tables.md")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    render(args.dir)
    print(Path(args.dir) / "tables.md")
    return 0


def cmd_headline(args: argparse.Namespace) -> int:
    from harness.headline import headline_markdown

    print(headline_markdown(args.dir, args.output, args.prompts, args.metric), end="")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from harness.prefill_breakdown import prefill_breakdown, prefill_markdown
    from harness.validate import machine_calibrations, run_corrections, validate, validation_markdown

    corrections = run_corrections(args.dir) if args.with_run_corrections else None
    if corrections == {}:
        raise ValueError(
            f"no row in {args.dir} records a Fiddler executor's CPU corrections (stats.cpu_factor): "
            "validate it without --with-run-corrections"
        )
    rows = validate(args.dir, args.hardware, args.calibration, args.samples, corrections, args.per_machine)
    machines = machine_calibrations(args.dir, args.calibration) if args.per_machine else None
    breakdown = prefill_markdown(prefill_breakdown(args.dir, args.hardware))  # before any file is written
    out = Path(args.out or args.dir)
    name = "validation" + ("-per-machine" if args.per_machine else "")
    name += "-run-corrections" if corrections is not None else ""
    write_csv_atomic(rows, out / f"{name}.csv")
    markdown = validation_markdown(rows, args.dir, args.hardware, args.calibration, corrections, machines)
    markdown += "\n".join(["", *breakdown])
    write_text_atomic(out / f"{name}.md", markdown)
    print(out / f"{name}.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description="Fiddler reproduction harness")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a sweep into a run folder (resumes one it finds)")
    run.add_argument("--systems", required=True, help=f"comma-separated: {', '.join(sorted(SYSTEMS))}")
    run.add_argument("--scenario", required=True, choices=SCENARIOS)
    run.add_argument("--grid", choices=sorted(GRIDS), help="single-batch grid (default paper-v3)")
    run.add_argument("--inputs", help="input lengths, e.g. 32,64")
    run.add_argument("--outputs", help="output lengths, e.g. 64,128")
    run.add_argument("--beam-widths", help="beam widths for beam-search, e.g. 4,8,16")
    run.add_argument("--model", required=True, help="preset name or checkpoint directory")
    run.add_argument("--layers", type=int)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--gpu-memory-gb", type=float)
    run.add_argument("--device")
    run.add_argument("--dtype")
    run.add_argument("--dataset", default="sharegpt", help="sharegpt (bundled sample), random, or a ShareGPT file")
    run.add_argument("--prompts-per-cell", type=int, default=3)
    run.add_argument("--reference", help="system whose tokens the others are compared with ('' for none)")
    run.add_argument("--run-time-limit", type=float, help="seconds per generation; slower runs are extrapolated")
    run.add_argument("--calibration", type=Path)
    run.add_argument(
        "--rounds",
        type=int,
        help="measure only the first N rounds of prompts now (every system's first prompt of every cell is "
        "round 1); a later run of the same folder resumes the rest",
    )
    run.add_argument(
        "--calibrate-machine",
        action="store_true",
        help="also calibrate this machine at the start when rows are left to measure, into "
        "DIR/machine-calibrations/ (the rows name it; Fiddler still plans with --calibration): a resumed "
        "sweep's pieces may run on other machines, and validate --per-machine prices each row on its own",
    )
    run.add_argument(
        "--remeasure-disturbed",
        action="store_true",
        help="on a resume, also measure again (once) the rows during which other processes or the hypervisor "
        "took over half a core (tables.md's 'Host disturbance'); the rows replaced go to DIR/raw-disturbed.csv",
    )
    run.add_argument(
        "--remeasure-systems",
        help="comma-separated, of --systems: on a resume, also measure again (once) every measured row of these "
        "systems (after a fix to how they run); the rows replaced go to DIR/raw-replaced.csv",
    )
    run.add_argument("--cpu-threads", type=int)
    run.add_argument(
        "--no-new-system-after",
        type=float,
        help="seconds: load no further system after this long (the sweep stops, resumable)",
    )
    run.add_argument("--out")
    run.set_defaults(func=cmd_run)
    sim = sub.add_parser("simulate", help="predict systems on a hardware profile (summary.csv, source simulated)")
    sim.add_argument(
        "--hardware", required=True, help="paper-env1, paper-env2, paper-env3, h200-host, or a profile file"
    )
    sim.add_argument("--systems", required=True)
    sim.add_argument("--scenario", required=True, choices=SCENARIOS)
    sim.add_argument("--grid", choices=sorted(GRIDS))
    sim.add_argument("--inputs")
    sim.add_argument("--outputs")
    sim.add_argument("--beam-widths")
    sim.add_argument("--model", default="mixtral-8x7b")
    sim.add_argument("--layers", type=int)
    sim.add_argument("--gpu-memory-gb", type=float, help="default: the profile's GPU memory")
    sim.add_argument("--routing", default="uniform", help="uniform, a 'fiddler profile' file, or a routing trace")
    sim.add_argument(
        "--calibration", type=Path, help="a measured machine's calibration file in place of its profile's latencies"
    )
    sim.add_argument("--samples", type=int, default=8, help="decode steps sampled per cell")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", required=True)
    sim.set_defaults(func=cmd_simulate)
    report = sub.add_parser("report", help="re-render a run folder's summary, tables and plots")
    report.add_argument("dir")
    report.set_defaults(func=cmd_report)
    head = sub.add_parser("headline", help="the README's headline tables from a run folder, as markdown")
    head.add_argument("dir")
    head.add_argument("--output", type=int, required=True, help="output tokens of the cells shown (e.g. 512)")
    head.add_argument("--prompts", type=int, help="each cell's first N prompts only (1: round 0; default: all)")
    head.add_argument("--metric", default="e2e_tokens_per_s", help="e2e_tokens_per_s, decode_tokens_per_s or ttft_s")
    head.set_defaults(func=cmd_headline)
    check = sub.add_parser("validate", help="predicted against measured on a run folder's own cells")
    check.add_argument("dir")
    check.add_argument("--hardware", required=True, help="the measured machine's profile (e.g. h200-host) or a file")
    check.add_argument("--calibration", required=True, type=Path, help="the calibration file the run used")
    check.add_argument("--samples", type=int, default=8, help="decode steps sampled per cell")
    check.add_argument("--out", help="folder for the validation files (default: the run folder)")
    check.add_argument(
        "--per-machine",
        action="store_true",
        help="price each row with the calibration of the machine that measured it (run --calibrate-machine); "
        "writes validation-per-machine.csv/.md",
    )
    check.add_argument(
        "--with-run-corrections",
        action="store_true",
        help="plan Fiddler with the CPU corrections its executor learned in the run (not a prediction: "
        "tells how much of a miss is the CPU's speed); writes validation-run-corrections.csv/.md",
    )
    check.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)
