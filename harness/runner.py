"""Sweeps: scenarios x systems x prompts, one timing protocol, raw rows first.

Contract: ``run_sweep(spec)`` writes into ``spec.out`` (the run folder): ``env.json`` (machine,
software, settings; a resumed sweep's earlier invocations under ``previous``), ``matrix.json``
(the cells and the generations that measure them), ``raw.csv`` (one row per prompt run: token
ids, TTFT, every decode step's time, what moved, peak memory, telemetry (GPU samples;
``host_*``: cores that other processes and the hypervisor took meanwhile, ``fiddler.host_load``,
and the share of this process's memory on huge pages, ``fiddler.host_memory``; with
``calibrate_machine``, ``machine_calibration``: this invocation's calibration of its machine,
``machine-calibrations/<UTC time>.json`` in the run folder), status, the commit that measured
it) and, through ``harness.report``, the summaries, tables and plots. The sweep runs in rounds
of prompts: every system's first prompt of every cell, then every second prompt, and so on, so
that a sweep cut short has whole tables on fewer prompts (``rounds``: only the first N in this
invocation, the rest left to a resume). In each round the systems run one after another, each
loaded once (a system refused, or broken while loading or generating, is not loaded again) and
warmed up with one generation before its first measured one. Every row is written to ``raw.csv``
atomically as soon as it is measured, so an interrupted sweep resumes where it stopped, with no
duplicate or lost row (``spec.out`` found with a ``raw.csv``: finished runs are skipped; only
``RESUMABLE_WITH_OTHER`` (the folder, the time limit, ``no_new_system_after_s``,
``calibrate_machine``, ``rounds``, ``remeasure_disturbed``) may differ from the settings that started it; past that many
seconds no further system is loaded and the sweep returns, to be resumed). A per-run time limit
makes slow systems generate only the steps that fit (the cells beyond are extrapolated by the
report, marked so). A system that cannot run within its budget gets one ``refused`` row per
generation it would have run; one that cannot do a scenario (beam search) gets ``unsupported``
rows. A system that raises while loading or generating gets ``failed`` rows (the reason in the
row, the traceback in the log) for the runs it had left, and the sweep goes on with the next
system; a resumed sweep runs failed rows again (each stays on record until it is measured anew).
With ``remeasure_disturbed`` it also measures again, once, the rows during which other processes
or the hypervisor took cores (``harness.timing.disturbed``), each replaced row kept in
``DISTURBED_RAW`` (a failure to measure it again is a ``failed`` row like any other, retried
by the next resume, the measurement kept there meanwhile; a row measured again stands,
disturbed or not, so a host that stays noisy costs one more generation per row). With
``remeasure_systems`` it measures again, once, every measured row of the systems named (a fix
to how a system runs, such as the GPU memory it keeps free), each replaced row kept in
``REPLACED_RAW`` the same way; such a row may then be measured once more for a disturbance,
unless an earlier measurement of it already was ("once" counts over the folder's history).
The reference system (for token agreement) runs like the others."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import sys
from pathlib import Path

import pandas as pd
import torch

from baselines import SystemOptions, SystemRefused, Unsupported, load_system
from fiddler.calibrate import calibrate, save_calibration
from fiddler.config import ModelConfig, resolve_model
from fiddler.files import write_json_atomic
from fiddler.generate import GenerationResult, GenerationSettings
from fiddler.host_load import HostLoad
from fiddler.host_memory import huge_page_share
from fiddler.orchestrator import CPU_PATH_COUNTERS
from fiddler.streams import release_cached_memory
from fiddler.timing import Clock
from fiddler.tokenizer import find_tokenizer
from harness import prompts as prompt_sources
from harness.scenarios import Cell, Run, runs
from harness.telemetry import NvmlSampler, environment, measuring_commit, process_rss_gb
from harness.timing import MEASURED_ROW_STATUSES, disturbed, steps_within

log = logging.getLogger(__name__)
FAILURE_REASON_CHARS = 600  # a row keeps the error's first line; the log keeps the rest
DISTURBED_RAW = "raw-disturbed.csv"  # the measurements that remeasure_disturbed replaced
REPLACED_RAW = "raw-replaced.csv"  # the measurements that remeasure_systems replaced

RAW_COLUMNS = [
    "system",
    "scenario",
    "model",
    "num_layers",
    "dtype",
    "device",
    "dataset",
    "input_tokens",
    "run_output_tokens",
    "beam_width",
    "prompt_index",
    "gpu_memory_gb",
    "git_commit",
    "status",
    "reason",
    "generated_tokens",
    "ttft_s",
    "step_times_s",
    "token_ids",
    "gpu_hit_rate",
    "h2d_bytes",
    "d2h_bytes",
    "peak_allocated_gb",
    "device_used_gb",
    "rss_gb",
    "telemetry",
    "stats",
]
KEY = ["system", "scenario", "input_tokens", "run_output_tokens", "beam_width", "prompt_index"]
PROBE_TOKENS = 3  # a short generation that estimates a slow system's step time


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    systems: tuple[str, ...]
    cells: tuple[Cell, ...]
    model: str
    out: Path
    layers: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.bfloat16
    gpu_memory_gb: float | None = None
    dataset: str = "sharegpt"  # sharegpt (the bundled sample), random, or a ShareGPT-format file
    prompts_per_cell: int = 3
    reference: str | None = None
    run_time_limit_s: float | None = None
    calibration: Path | None = None
    cpu_threads: int | None = None
    # seconds from this invocation's start after which no further system is loaded: the sweep
    # stops (resumable) once the system running is done, instead of spending the end of a
    # time-limited call on a load and warm-up that cannot finish a generation
    no_new_system_after_s: float | None = None
    # measure this machine's calibration at the start of the invocation, for the record: a
    # resumed sweep's pieces run on other machines (the GPU host's differ by up to ~2x in CPU
    # speed) while Fiddler plans with ``calibration``; validation can then price each row on the
    # machine that measured it
    calibrate_machine: bool = False
    # measure only the first this many rounds of prompts in this invocation (the rest is left
    # for a resume): another sweep's first round can come before this one's later rounds
    rounds: int | None = None
    # measure again, once, the rows during which other processes or the hypervisor took cores
    # (``harness.timing.disturbed``); each one replaced is kept in ``DISTURBED_RAW``
    remeasure_disturbed: bool = False
    # measure again, once, every measured row of these systems (what measured them was since
    # fixed); each one replaced is kept in ``REPLACED_RAW``
    remeasure_systems: tuple[str, ...] = ()

    def settings(self) -> dict[str, object]:
        fields = dataclasses.asdict(self)
        fields["cells"] = [dataclasses.asdict(c) for c in self.cells]
        return {k: (str(v) if isinstance(v, (Path, torch.dtype)) else v) for k, v in fields.items()}


def _write_raw(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pd.DataFrame(rows, columns=RAW_COLUMNS).to_csv(tmp, index=False)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def same_measurement(a: dict, b: dict) -> bool:
    """Two raw rows of one generation: the same run and the same step times."""
    return run_key(a) == run_key(b) and str(a["step_times_s"]) == str(b["step_times_s"])


def _set_aside(path: Path, row: dict) -> None:
    """Keep a measured row that is about to be replaced, once. Written before raw.csv is: a
    crash between the two writes leaves it in both files, never in neither, and the resume
    measures it again (it is not yet replaced there)."""
    kept = read_raw(path)
    if not any(same_measurement(r, row) for r in kept):
        _write_raw(path, [*kept, row])


def _measured_again(rows: dict[tuple, dict], kept_path: Path) -> set[tuple]:
    """Keys of rows already measured again: their kept measurement is not the one ``rows`` holds
    (one that ``rows`` still holds was not replaced yet: a stop between the two writes)."""
    return {run_key(r) for r in read_raw(kept_path) if run_key(r) in rows and not same_measurement(r, rows[run_key(r)])}


def read_raw(path: Path) -> list[dict]:
    if not path.exists():
        return []
    frame = pd.read_csv(path, keep_default_na=False)
    missing = [c for c in KEY if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} is not a sweep's raw.csv (no {missing}); choose another --out folder")
    return frame.to_dict("records")


def run_key(row: dict) -> tuple:
    """The run a raw row measures (its ``KEY`` columns, as text: rows read back compare equal)."""
    return tuple(str(row[k]) for k in KEY)


class PromptBank:
    """Prompts per input length, from the chosen data set (the same for every system)."""

    def __init__(self, spec: SweepSpec, config: ModelConfig, checkpoint: Path | None):
        self.spec, self.config = spec, config
        self.tokenizer = find_tokenizer(checkpoint)
        self.conversations = None
        if spec.dataset != "random":
            if self.tokenizer is None:
                raise ValueError(f"{config.name} has no tokenizer; use --dataset random")
            source = prompt_sources.BUNDLED_SAMPLE if spec.dataset == "sharegpt" else spec.dataset
            self.conversations = prompt_sources.read_conversations(source)
        self._cache: dict[tuple[str, int], list[list[int]]] = {}

    def prompts(self, scenario: str, num_tokens: int) -> list[list[int]]:
        key = (scenario, num_tokens)
        if key not in self._cache:
            count = self.spec.prompts_per_cell
            if self.conversations is None:
                found = prompt_sources.random_prompts(self.config.vocab_size, num_tokens, count, self.spec.seed)
            elif scenario == "long-prefill":
                found = prompt_sources.long_prompts(self.conversations.texts, self.tokenizer, num_tokens, count)
            else:
                found = prompt_sources.select_prompts(self.conversations.texts, self.tokenizer, num_tokens, count)
            self._cache[key] = found
        return self._cache[key]

    def describe(self) -> dict[str, object]:
        if self.conversations is None:
            return {"dataset": "random", "seed": self.spec.seed}
        return {"dataset": self.spec.dataset, **self.conversations.to_json()}


def run_sweep(spec: SweepSpec) -> Path:
    from harness.report import render

    # no_new_system_after_s counts from here: a machine calibration is part of the invocation
    clock = Clock("cpu")
    started = clock.now()
    if spec.rounds is not None and spec.rounds < 1:
        raise ValueError(f"--rounds is {spec.rounds}: measure at least 1 round of prompts, or leave it out")
    rounds = spec.prompts_per_cell if spec.rounds is None else min(spec.rounds, spec.prompts_per_cell)
    spec.out.mkdir(parents=True, exist_ok=True)
    config, checkpoint = resolve_model(spec.model, spec.layers)
    bank = PromptBank(spec, config, checkpoint)
    plan = runs(list(spec.cells))
    systems = list(dict.fromkeys([*spec.systems, *([spec.reference] if spec.reference else [])]))
    _check_resumable(spec)
    strangers = [name for name in spec.remeasure_systems if name not in systems]
    if strangers:
        raise ValueError(f"remeasure_systems names {strangers}, which this sweep does not run; choose from {systems}")
    write_json_atomic(spec.out / "env.json", _environment_with_history(spec, bank))
    write_json_atomic(
        spec.out / "matrix.json",
        {
            "systems": systems,
            "compared": list(spec.systems),
            "reference": spec.reference,
            "runs": [dataclasses.asdict(r) for r in plan],
            "prompts_per_cell": spec.prompts_per_cell,
        },
    )
    raw_path = spec.out / "raw.csv"
    # by key: a resumed sweep runs failed rows again, and each keeps its place (and its failure on
    # record) until its run is measured anew
    rows = {run_key(r): r for r in read_raw(raw_path)}
    # rows measured again, and the file each replaced one is kept in: a row of a system named in
    # remeasure_systems first, then a disturbed one; each once
    set_aside_into: dict[tuple, str] = {}
    for wanted, kept_in in (
        (lambda r: r["system"] in spec.remeasure_systems, REPLACED_RAW),
        (disturbed if spec.remeasure_disturbed else None, DISTURBED_RAW),
    ):
        if wanted is None:
            continue
        again = _measured_again(rows, spec.out / kept_in)
        for key, r in rows.items():
            if key not in set_aside_into and key not in again and r["status"] in MEASURED_ROW_STATUSES and wanted(r):
                set_aside_into[key] = kept_in
    done = {key for key, r in rows.items() if r["status"] != "failed"} - set(set_aside_into)
    longest = max(r.input_tokens + r.output_tokens for r in plan)
    # what this invocation may measure; rows of later rounds or other systems are not its progress
    scope = {run_key(_row_key(name, r, i)) for name in systems for r in plan for i in range(rounds)}
    progress = _Progress(len(scope), len(scope & done))
    base = {
        "model": config.name,
        "num_layers": config.num_layers,
        "dtype": str(spec.dtype).removeprefix("torch."),
        "device": spec.device,
        "dataset": spec.dataset,
        "gpu_memory_gb": spec.gpu_memory_gb,
        # the code that measured the row: a sweep resumed across sessions may span engine versions
        "git_commit": measuring_commit(),
    }
    # which machine measured the row, when this invocation calibrated it (in each row's telemetry)
    left = bool(scope - done)
    machine = {}
    if spec.calibrate_machine and left:  # nothing left to measure: no need
        try:
            machine = {"machine_calibration": calibrate_machine(spec, config)}
        except Exception:  # a record, not a condition of the measurement: the rows then name none
            log.exception("could not calibrate this machine; its rows name no machine calibration")

    def put(row: dict) -> None:
        """Into ``rows``; a measurement it replaces (a row measured again, or that failed to be)
        is kept first, in the file its reason to be measured again names."""
        old = rows.get(run_key(row))
        if old is not None and old["status"] in MEASURED_ROW_STATUSES:
            _set_aside(spec.out / set_aside_into[run_key(row)], old)  # only rows set aside at the start are
        rows[run_key(row)] = row

    def record(name: str, todo: list[tuple[Run, int]], status: str, reason: str) -> None:
        """One row per run the system still had to do, all with the same status."""
        for run, index in todo:
            put(base | _row_key(name, run, index) | {"status": status, "reason": reason})
            progress.step(name, run, index)
        _write_raw(raw_path, list(rows.values()))

    given_up: dict[str, tuple[str, str]] = {}  # refused, or broke: not loaded again in this invocation
    step_budgets: dict[str, _StepBudget] = {}  # per system, kept across rounds

    def run_system(name: str, todo: list[tuple[Run, int]]) -> None:
        """Load one system, measure its runs in ``todo``, close it."""
        options = SystemOptions(
            config=config,
            max_seq_len=longest,
            checkpoint=checkpoint,
            seed=spec.seed,
            device=spec.device,
            dtype=spec.dtype,
            # the reference is a correctness yardstick, not a compared system: it runs uncapped
            gpu_memory_gb=None if name == spec.reference and name not in spec.systems else spec.gpu_memory_gb,
            cpu_threads=spec.cpu_threads,
            beam_width=max(r.beam_width for r in plan),
            calibration=spec.calibration,
        )
        try:
            system = load_system(name, options)
        except SystemRefused as err:
            given_up[name] = ("refused", str(err))
            record(name, todo, *given_up[name])
            return
        except Exception as err:  # a system that breaks is recorded, and the sweep goes on
            given_up[name] = ("failed", _failure(name, "loading", err))
            record(name, todo, *given_up[name])
            return
        # the peak from loading alone (random weights are generated on the device): a row's
        # peak_allocated_gb is since the load, so this tells the two apart (in its telemetry)
        recorded = machine | {"load_peak_allocated_gb": system.peak_gpu_memory()["peak_allocated_gb"]}
        try:
            # Warm up every batch size, largest first: the engine then keeps one cache and one
            # recorded graph per batch size, and no measured step pays for either.
            for width in sorted({r.beam_width for r in plan}, reverse=True):
                first = next(r for r in plan if r.beam_width == width)
                warm_up = GenerationSettings(max_new_tokens=min(2, first.output_tokens), beam_width=width)
                with contextlib.suppress(Unsupported):  # its rows will say so
                    system.generate(bank.prompts(first.scenario, first.input_tokens)[0], warm_up)
            budget = step_budgets.setdefault(name, _StepBudget())
            while todo:
                run, index = todo[0]
                prompt = bank.prompts(run.scenario, run.input_tokens)[index]
                row = base | _row_key(name, run, index) | _measure(system, run, prompt, spec, budget, recorded)
                put(row)
                todo.pop(0)
                _write_raw(raw_path, list(rows.values()))  # atomically, after every run
                progress.step(name, run, index)
        except Exception as err:  # as before rounds: its other runs are not tried again in this sweep
            given_up[name] = ("failed", _failure(name, "generating", err))
            record(name, todo, *given_up[name])
        finally:
            system.close()
            # no reference may outlive close(): the next system's load and its peak-memory
            # record must not see this one's weights
            del system
            release_cached_memory()

    # In rounds: every system's first prompt of every cell, then every second prompt, ...: a sweep
    # cut short (the GPU host's calls are 10 minutes) has whole tables, on fewer prompts, early.

    def too_late_for(name: str) -> bool:
        elapsed = clock.now() - started
        if spec.no_new_system_after_s is None or elapsed <= spec.no_new_system_after_s:
            return False
        log.warning("%.0f s into the sweep: %s is not loaded; run the sweep again to resume", elapsed, name)
        return True

    try:
        for round_index in range(rounds):
            for name in systems:
                todo = [(r, round_index) for r in plan if run_key(_row_key(name, r, round_index)) not in done]
                if todo and name in given_up:
                    record(name, todo, *given_up[name])
                elif todo and too_late_for(name):
                    if rows:
                        render(spec.out)
                    return spec.out
                elif todo:
                    run_system(name, todo)
    except BaseException:
        # a sweep cut short (the GPU host's time limit interrupts it) still leaves its tables in
        # step with raw.csv; a failure to render must not hide why the sweep stopped
        if rows:
            try:
                render(spec.out)
            except Exception:
                log.exception("could not render %s after the sweep stopped", spec.out)
        raise
    render(spec.out)
    return spec.out


def _environment_with_history(spec: SweepSpec, bank: PromptBank) -> dict[str, object]:
    """This invocation's environment, with the earlier invocations' (a resumed sweep's pieces
    ran on other machines, code and time limits) under ``previous``, oldest first."""
    current = environment(spec.device, spec.settings() | {"prompts": bank.describe()})
    path = spec.out / "env.json"
    if not path.exists() or not (spec.out / "raw.csv").exists():
        return current
    saved = json.loads(path.read_text())
    previous = saved.pop("previous", [])
    return current | {"previous": [*previous, saved]}


def calibrate_machine(spec: SweepSpec, config: ModelConfig) -> str:
    """Calibrate this machine (one attempt: a disturbed one says so in its file) into the run
    folder's ``MACHINE_CALIBRATIONS``, named by the time it was made; returns its path relative
    to the run folder, which the rows of this invocation record."""
    result = calibrate(config, spec.device, spec.dtype, spec.cpu_threads, attempts=1)
    release_cached_memory()  # its device buffers must not count in the first system's memory
    # microseconds: two invocations within a second must not share a file
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%S.%fZ")
    relative = Path(MACHINE_CALIBRATIONS) / f"{stamp}.json"
    save_calibration(result, spec.out / relative)
    log.info(
        "this machine's calibration: %s (CPU expert %.2f ms at 1 token)", relative, 1e3 * result["cpu_expert_s"][0]
    )
    return str(relative)


def _failure(system: str, phase: str, err: Exception) -> str:
    """The reason a failed row records; the whole traceback goes to the log."""
    log.error("%s failed while %s; its remaining runs are recorded as failed", system, phase, exc_info=err)
    message = str(err).strip().splitlines()
    return f"{phase}: {type(err).__name__}: {message[0] if message else ''}"[:FAILURE_REASON_CHARS]


# Settings a resumed sweep may change: where it writes, how long a slow generation may run (a
# row cut short by the limit says so in its reason, and its cells say how many steps stand
# behind them), when it stops loading systems, whether it calibrates its machine for the record
# and how many rounds it measures now; everything else defines what is measured and must stay.
RESUMABLE_WITH_OTHER = (
    "out",
    "run_time_limit_s",
    "no_new_system_after_s",
    "calibrate_machine",
    "rounds",
    "remeasure_disturbed",
    "remeasure_systems",
)
MACHINE_CALIBRATIONS = "machine-calibrations"  # the run folder's subfolder of per-invocation calibrations


def _check_resumable(spec: SweepSpec) -> None:
    """A folder resumes only the sweep that started it: same model, budget, cells, data..."""
    env = spec.out / "env.json"
    if not env.exists() or not (spec.out / "raw.csv").exists():
        return
    saved = json.loads(env.read_text()).get("settings", {})
    current = json.loads(json.dumps(spec.settings(), default=str))
    differ = sorted(k for k in current if k not in RESUMABLE_WITH_OTHER and saved.get(k) != current[k])
    if differ:
        raise ValueError(
            f"{spec.out} holds a sweep with other settings ({', '.join(differ)}); resume it with the same ones, "
            "or give another --out"
        )


def _row_key(system: str, run: Run, index: int) -> dict:
    return {
        "system": system,
        "scenario": run.scenario,
        "input_tokens": run.input_tokens,
        "run_output_tokens": run.output_tokens,
        "beam_width": run.beam_width,
        "prompt_index": index,
    }


@dataclasses.dataclass
class _StepBudget:
    """One system's new tokens per run within the time limit (kept across rounds, so every
    prompt of a cell gets the same), estimated from the pace of its last generation at the same
    beam width, or from a short probe before its first: a probe of a slow system costs what a
    few of its tokens do (accelerate-offload: ~30 s)."""

    tokens: dict[Run, int] = dataclasses.field(default_factory=dict)
    pace: dict[int, tuple[float, float]] = dataclasses.field(default_factory=dict)  # width -> (TTFT, step) s

    def learn(self, width: int, result: GenerationResult) -> None:
        if result.step_times_s:
            self.pace[width] = (result.ttft_s, result.decode_s / len(result.step_times_s))


def _measure(
    system, run: Run, prompt: list[int], spec: SweepSpec, budget: _StepBudget, recorded: dict[str, object]
) -> dict:
    """One row's measurement; ``recorded`` goes into its telemetry (the machine's calibration,
    the system's peak GPU memory from loading)."""
    wanted = run.output_tokens
    if spec.run_time_limit_s is not None and run not in budget.tokens and wanted > PROBE_TOKENS:
        if run.beam_width not in budget.pace:
            try:
                probe = system.generate(
                    prompt, GenerationSettings(max_new_tokens=PROBE_TOKENS, beam_width=run.beam_width)
                )
            except Unsupported as err:
                return {"status": "unsupported", "reason": str(err)}
            budget.learn(run.beam_width, probe)
        ttft, step = budget.pace.get(run.beam_width, (0.0, 0.0))
        budget.tokens[run] = 1 + steps_within(spec.run_time_limit_s, ttft, step, wanted - 1)
    new_tokens = budget.tokens.get(run, wanted)
    settings = GenerationSettings(max_new_tokens=new_tokens, beam_width=run.beam_width)
    try:
        with NvmlSampler() as sampler, HostLoad() as host_load:
            result = system.generate(prompt, settings)
    except Unsupported as err:
        return {"status": "unsupported", "reason": str(err)}
    budget.learn(run.beam_width, result)
    stats = result.stats
    return {
        "status": "ok" if new_tokens == wanted else "time-limited",
        "reason": "" if new_tokens == wanted else f"{new_tokens} of {wanted} tokens within {spec.run_time_limit_s} s",
        "generated_tokens": len(result.token_ids),
        "ttft_s": result.ttft_s,
        "step_times_s": json.dumps(result.step_times_s),
        "token_ids": json.dumps(result.token_ids),
        "gpu_hit_rate": stats.get("gpu_hit_rate"),
        "h2d_bytes": stats.get("h2d_bytes"),
        "d2h_bytes": stats.get("d2h_bytes"),
        "rss_gb": process_rss_gb(),
        # host_*: cores other processes and the hypervisor took meanwhile (a llama-server this
        # process started counts as its own), for a reader to tell a disturbed row
        "telemetry": json.dumps(
            sampler.summary()
            | {f"host_{k}": v for k, v in host_load.summary().items() if k != "seconds"}
            # this process's memory, where Fiddler's CPU path streams experts from (small pages
            # cost it TLB misses); a llama-server's own memory is not counted
            | {"host_huge_page_share": huge_page_share()}
            | recorded
        ),
        "stats": json.dumps(
            {k: v for k, v in stats.items() if k != "engine"}
            | {
                "decode_gpu_hit_rate": decode_hit_rate(result),
                "prefill_predicted_s": prefill_predicted_s(result),
                "prefill": prefill_counters(result),
            },
            default=str,
        ),
        **system.peak_gpu_memory(),
    }


ROUTED_ROWS = ("rows_gpu", "rows_cpu", "rows_copied", "rows_split")  # the executor's per-path row counters


def decode_hit_rate(result: GenerationResult) -> float | None:
    """The share of decode's routed rows that the GPU held (prefill left out), for systems
    whose executor counts rows per path; None for the others."""
    if result.stats_after_prefill is None or not all(k in result.stats for k in ROUTED_ROWS):
        return None
    rows = result.decode_counters(ROUTED_ROWS)
    total = sum(rows.values())
    return rows["rows_gpu"] / total if total else None


def prefill_predicted_s(result: GenerationResult) -> float | None:
    """The executor's own latency-model prediction for the prefill's MoE layers (what TTFT is
    checked against when a simulated TTFT misses: the planner's or the machine's fault); None
    for systems without one."""
    before = result.stats_after_prefill or {}
    return before.get("predicted_s")


# the executor's counters at the first token that tell the prefill's CPU path apart from decode's
PREFILL_COUNTERS = ("predicted_s", *CPU_PATH_COUNTERS)


def prefill_counters(result: GenerationResult) -> dict[str, object] | None:
    """The executor's prefill counters (``PREFILL_COUNTERS``, those it has) at the first token;
    decode's are the whole generation's less these. None for systems without them."""
    before = result.stats_after_prefill or {}
    counters = {k: before[k] for k in PREFILL_COUNTERS if k in before}
    return counters or None


class _Progress:
    """Runs done and an estimate of the time left, one line per run on standard error."""

    def __init__(self, total: int, done: int):
        self.total, self.done, self.started = total, done, done
        self.clock = Clock("cpu")
        self.start = self.clock.now()

    def step(self, system: str, run: Run, index: int) -> None:
        self.done += 1
        elapsed = self.clock.now() - self.start
        rate = (self.done - self.started) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate else float("nan")
        print(
            f"[{self.done}/{self.total}] {system} {run.scenario} in={run.input_tokens} out={run.output_tokens} "
            f"beams={run.beam_width} prompt={index} | ~{left / 60:.1f} min left",
            file=sys.stderr,
            flush=True,
        )
