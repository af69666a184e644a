"""The harness on the CPU: prompt selection, scenarios, timing arithmetic, a small sweep with
its CSV schema, resume after a crash, tables, plots and the agreement column."""

import dataclasses
import json
import random
import re
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest
import torch

from fiddler.config import ModelConfig
from fiddler.tokenizer import find_tokenizer
from harness import prompts as P
from harness.report import SUMMARY_COLUMNS, render, summarize
from harness.runner import KEY, SweepSpec, read_raw, run_key, run_sweep
from harness.scenarios import cells, runs
from harness.timing import cell_metrics, steps_within

TOKENIZER = find_tokenizer(None)


def test_selection_rule_on_a_crafted_file(tmp_path):
    long_text = "word " * 80
    data = [
        {"conversations": [{"from": "human", "value": "  first   prompt\n\n with  spaces " + long_text}]},
        {"conversations": [{"from": "gpt", "value": "the model speaks first"}, {"from": "human", "value": "hi"}]},
        {"conversations": [{"from": "user", "value": "second prompt " + long_text}]},
        {"conversations": []},
        {"no_conversations": True},
        {"conversations": [{"from": "human"}]},
        {"conversations": [{"from": "human", "value": "short"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    conv = P.read_conversations(path)
    assert conv.entries == 7 and conv.model_first == 1 and conv.malformed == 3
    assert conv.texts[0].startswith("first prompt with spaces word")  # whitespace collapsed
    expected = list(conv.texts)
    random.seed(0)
    random.shuffle(expected)
    assert P.shuffled(conv.texts) == expected  # the paper's random.seed(0) shuffle
    chosen = P.select_prompts(conv.texts, TOKENIZER, 40, 2)
    assert all(len(ids) == 40 and ids[0] == 1 for ids in chosen)
    long_ones = [TOKENIZER.encode(t)[:40] for t in expected if len(TOKENIZER.encode(t)) >= 40]
    assert chosen == long_ones[:2]
    with pytest.raises(ValueError, match="at least 500 tokens"):
        P.select_prompts(conv.texts, TOKENIZER, 500, 1)


def test_bundled_sample_covers_the_paper_lengths():
    conv = P.read_conversations()
    assert conv.model_first > 0 and conv.malformed == 0
    for length in (16, 32, 64, 128, 256):
        prompts = P.select_prompts(conv.texts, TOKENIZER, length, 10)
        assert len({tuple(p) for p in prompts}) == 10


def test_long_and_random_prompts():
    conv = P.read_conversations()
    long_prompts = P.long_prompts(conv.texts, TOKENIZER, 8192, 3)
    assert all(len(p) == 8192 and p[0] == 1 and 1 not in p[1:] for p in long_prompts)
    assert len({tuple(p[:200]) for p in long_prompts}) == 3
    a = P.random_prompts(32000, 64, 3, seed=1)
    assert a == P.random_prompts(32000, 64, 3, seed=1) and a != P.random_prompts(32000, 64, 3, seed=2)
    assert all(p[0] == 1 and all(3 <= t < 32000 for t in p[1:]) for p in a)


def test_scenarios_and_runs():
    grid = cells("single-batch", "paper-v3")
    assert len(grid) == 16 and {c.input_tokens for c in grid} == {32, 64, 128, 256}
    plan = runs(grid)
    assert len(plan) == 4 and all(r.output_tokens == 512 and len(r.cells) == 4 for r in plan)
    beams = runs(cells("beam-search", beam_widths=(4, 8)))
    assert [(r.beam_width, r.output_tokens) for r in beams] == [(4, 64), (8, 64)]
    assert [c.input_tokens for c in cells("long-prefill")] == [512, 1024, 2048, 4096, 8192]
    with pytest.raises(ValueError, match="--scenario must be one of"):
        cells("batch")


def test_timing_arithmetic():
    full = cell_metrics(0.5, [0.1] * 9, 10, 10)
    assert full.status == "ok" and full.e2e_tokens_per_s == pytest.approx(10 / 1.4)
    assert full.decode_tokens_per_s == pytest.approx(10.0)
    prefix = cell_metrics(0.5, [0.1] * 9, 4, 10)
    assert prefix.status == "derived" and prefix.e2e_tokens_per_s == pytest.approx(4 / 0.8)
    extra = cell_metrics(0.5, [0.2, 0.4], 11, 11)
    assert extra.status == "extrapolated" and extra.steps_measured == 2
    assert extra.e2e_tokens_per_s == pytest.approx(11 / (0.5 + 0.6 + 0.3 * 8))
    assert cell_metrics(0.5, [], 1, 1).decode_tokens_per_s is None
    assert steps_within(10.0, 1.0, 2.0, 100) == 4 and steps_within(None, 1.0, 2.0, 100) == 100


def spec(tmp_path, systems=("expert-lru", "fiddler-paper"), **kw):
    return SweepSpec(
        systems=systems,
        cells=tuple(cells("single-batch", inputs=(16, 32), outputs=(3, 6))),
        model="mixtral-tiny",
        out=tmp_path / "run",
        device="cpu",
        dtype=torch.float32,
        gpu_memory_gb=0.0175,
        prompts_per_cell=2,
        reference="cpu-only",
        **kw,
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return run_sweep(spec(tmp_path_factory.mktemp("sweep")))


def test_sweep_outputs_and_schema(sweep):
    for name in ("env.json", "matrix.json", "raw.csv", "summary.csv", "tables.md", "single-batch.png"):
        assert (sweep / name).exists(), name
    summary = pd.read_csv(sweep / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert len(summary) == 3 * 4  # systems (with the reference) x cells
    assert set(summary.status) == {"ok", "derived"} and (summary.source == "measured").all()
    # on CPU in fp32 every system reproduces the reference's tokens exactly
    assert (summary.output_matches_reference == 1.0).all()
    tables = (sweep / "tables.md").read_text()
    assert "expert-lru" in tables and "Fiddler (best policy per cell) over each baseline" in tables
    env = json.loads((sweep / "env.json").read_text())
    assert "git_commit" in env and env["settings"]["prompts"]["dataset"] == "sharegpt"
    # every row names the commit that measured it, and the tables say which measured what
    rows = read_raw(sweep / "raw.csv")
    dirty = "-dirty" if env["git_commit"] and env["git_dirty"] else ""
    assert {str(r["git_commit"]) for r in rows} == {str(env["git_commit"] or "") + dirty}
    assert "## Measured by" in tables
    # Fiddler's rows carry its own prediction for the prefill's MoE layers (TTFT's yardstick),
    # and its CPU path's host timing, prefill apart; the tables show it per layer
    for r in rows:
        stats = json.loads(r["stats"])
        if r["system"] == "fiddler-paper":
            assert 0 < stats["prefill_predicted_s"] < stats["predicted_s"]
            assert stats["prefill"]["predicted_s"] == stats["prefill_predicted_s"]
            assert 0 <= stats["prefill"]["cpu_jobs"] <= stats["cpu_jobs"]
        else:
            assert stats["prefill_predicted_s"] is None and stats["prefill"] is None
    if any(json.loads(r["stats"]).get("cpu_jobs") for r in rows):
        assert "## Fiddler's CPU path per MoE layer" in tables


def test_tables_say_when_rows_span_commits():
    from harness.report import provenance_markdown

    rows = [
        {"system": "fiddler-hybrid", "status": "ok", "git_commit": "a" * 40},
        {"system": "fiddler-hybrid", "status": "ok", "git_commit": "b" * 40},
        {"system": "expert-lru", "status": "time-limited", "git_commit": "b" * 40},
        {"system": "expert-lru", "status": "refused", "git_commit": "c" * 40},  # measured nothing
        {"system": "cpu-only", "status": "ok", "git_commit": ""},
    ]
    text = provenance_markdown(rows)
    assert "more than one commit" in text
    assert "| fiddler-hybrid | `aaaaaaa`: 1, `bbbbbbb`: 1 |" in text
    assert "| expert-lru | `bbbbbbb`: 1 |" in text and "ccccccc" not in text
    assert "| cpu-only | `not recorded`: 1 |" in text
    assert "One commit measured every row." in provenance_markdown(rows[1:3])
    dirty = [{"system": "fiddler-hybrid", "status": "ok", "git_commit": "a" * 40 + "-dirty"}, rows[0]]
    assert "| fiddler-hybrid | `aaaaaaa`: 1, `aaaaaaa-dirty`: 1 |" in provenance_markdown(dirty)
    assert "was not recorded" in provenance_markdown(rows[4:])


def test_tables_show_each_systems_peak_against_the_budget():
    """Issue 8: every run within its budget. The largest peak over a system's measured rows
    against the budget (and loading's, where recorded); a system over it is named with by how
    much; CPU runs record no peak."""
    from harness.report import budget_markdown

    def row(system, peak, device=25.4, status="ok", load=None):
        telemetry = json.dumps({} if load is None else {"load_peak_allocated_gb": load})
        return {
            "system": system,
            "status": status,
            "gpu_memory_gb": "24.0",
            "peak_allocated_gb": peak,
            "device_used_gb": device,
            "telemetry": telemetry,
        }

    rows = [
        row("fiddler-hybrid", "23.86", load=23.5),
        row("fiddler-hybrid", "23.70", load=23.6),
        row("accelerate-offload", "24.17", device=21.9),
        row("cpu-only", "0.0", device=0.5),
        row("expert-lru", "30.0", status="refused"),  # measured nothing
    ]
    text = budget_markdown(rows)
    assert "| fiddler-hybrid | 24 | 23.86 | 23.60 | 25.4 | yes |" in text
    assert "| accelerate-offload | 24 | 24.17 | - | 21.9 | **no**, 0.17 over |" in text
    assert "| cpu-only | 24 | 0.00 | - | 0.5 | yes |" in text and "expert-lru" not in text
    assert budget_markdown([row("cpu-only", "")]) == ""  # cpu standing in for the GPU: no peak


def test_the_launchers_stated_commit_wins_over_a_stale_git_beside_the_tree(monkeypatch):
    from harness.telemetry import measuring_commit

    monkeypatch.delenv("FIDDLER_GIT_COMMIT", raising=False)
    from_git = measuring_commit()  # this checkout's own HEAD (a test run has a .git)
    stated = "f" * 40 + "-dirty"
    monkeypatch.setenv("FIDDLER_GIT_COMMIT", stated)
    assert measuring_commit() == stated != from_git


def test_resume_after_a_crash_loses_and_duplicates_nothing(tmp_path, monkeypatch):
    from baselines import engine_systems

    calls = {"n": 0}
    original = engine_systems.EngineSystem.generate

    def crashing(self, prompt_ids, settings):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the process stopped (a signal, a time limit) mid-run
        return original(self, prompt_ids, settings)

    monkeypatch.setattr(engine_systems.EngineSystem, "generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec(tmp_path, systems=("fiddler-paper",)))
    partial = read_raw(tmp_path / "run" / "raw.csv")
    # round 1 (every system's first prompt): fiddler-paper's warm-up and 2 rows, the reference's 2
    # rows; round 2: fiddler-paper's warm-up, then the crash in its first run
    assert len(partial) == 4
    assert {int(r["prompt_index"]) for r in partial} == {0}
    monkeypatch.setattr(engine_systems.EngineSystem, "generate", original)
    run_sweep(spec(tmp_path, systems=("fiddler-paper",)))
    rows = read_raw(tmp_path / "run" / "raw.csv")
    keys = [tuple(str(r[k]) for k in KEY) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * 2 * 2  # (system + reference) x inputs x prompts
    assert not list((tmp_path / "run").glob(".*.tmp*"))


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The names of the systems the sweep loads, in order."""
    from harness import runner

    names: list[str] = []
    original = runner.load_system

    def counting(name, options):
        names.append(name)
        return original(name, options)

    monkeypatch.setattr(runner, "load_system", counting)
    return names


def test_a_sweep_runs_in_rounds_of_prompts(tmp_path, loads):
    """Every system's first prompt of every cell before any second prompt: a sweep cut short
    has whole tables on fewer prompts; a system refused while loading is not loaded again."""
    run = run_sweep(spec(tmp_path, systems=("gpu-resident", "fiddler-paper")))  # gpu-resident: refused here
    rows = read_raw(run / "raw.csv")
    first_second = next(i for i, r in enumerate(rows) if int(r["prompt_index"]) == 1)
    assert all(int(r["prompt_index"]) == 0 for r in rows[:first_second])
    assert {r["system"] for r in rows[:first_second]} == {"gpu-resident", "fiddler-paper", "cpu-only"}
    assert loads.count("gpu-resident") == 1 and loads.count("fiddler-paper") == 2
    assert [r["status"] for r in rows if r["system"] == "gpu-resident"] == ["refused"] * 4


def test_a_slow_systems_pace_is_probed_once_and_then_learned_from_its_runs(tmp_path, monkeypatch):
    from baselines import engine_systems
    from harness.runner import PROBE_TOKENS

    probes = {"n": 0}
    original = engine_systems.EngineSystem.generate

    def counting(self, prompt_ids, settings):
        probes["n"] += settings.max_new_tokens == PROBE_TOKENS
        return original(self, prompt_ids, settings)

    monkeypatch.setattr(engine_systems.EngineSystem, "generate", counting)
    sweep_spec = dataclasses.replace(spec(tmp_path, systems=("fiddler-paper",)), reference="", run_time_limit_s=60.0)
    run_sweep(sweep_spec)
    # one probe before the system's first generation; later runs (another input length, the next
    # round's prompts) budget their tokens from the pace of the generations measured since
    assert probes["n"] == 1


def test_a_failing_system_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """The GPU host's llama-server stalled mid-stream and the exception ended the whole sweep:
    now the failing system's runs say why, the next system runs, and a resume retries them."""
    from baselines import engine_systems
    from harness.cli import main

    original = engine_systems.EngineSystem.generate

    def failing(self, prompt_ids, settings):
        if self.record["policy"] == "paper" and settings.max_new_tokens > 2:  # after its warm-up
            raise RuntimeError("server stopped streaming\nsecond line of the log")
        return original(self, prompt_ids, settings)

    monkeypatch.setattr(engine_systems.EngineSystem, "generate", failing)
    args = ["run", "--systems", "fiddler-paper,fiddler-hybrid", "--scenario", "single-batch", "--inputs", "16"]
    args += ["--outputs", "3", "--model", "mixtral-tiny", "--device", "cpu", "--dtype", "float32"]
    args += ["--gpu-memory-gb", "0.0175", "--prompts-per-cell", "2", "--dataset", "random", "--reference", ""]
    args += ["--out", str(tmp_path / "run")]
    assert main(args) == 1
    rows = read_raw(tmp_path / "run" / "raw.csv")
    by_system = {s: [r for r in rows if r["system"] == s] for s in ("fiddler-paper", "fiddler-hybrid")}
    assert [r["status"] for r in by_system["fiddler-paper"]] == ["failed", "failed"]
    assert by_system["fiddler-paper"][0]["reason"] == "generating: RuntimeError: server stopped streaming"
    assert [r["status"] for r in by_system["fiddler-hybrid"]] == ["ok", "ok"]
    summary = pd.read_csv(tmp_path / "run" / "summary.csv")
    assert set(summary[summary.system == "fiddler-paper"].status) == {"failed"}
    assert "failed" in (tmp_path / "run" / "tables.md").read_text()

    # a resume cut short after re-measuring one failed row keeps the other on record
    measured = []

    def cut_short(self, prompt_ids, settings):
        if self.record["policy"] == "paper" and settings.max_new_tokens > 2:
            if measured:
                raise KeyboardInterrupt
            measured.append(settings)
        return original(self, prompt_ids, settings)

    monkeypatch.setattr(engine_systems.EngineSystem, "generate", cut_short)
    (tmp_path / "run" / "summary.csv").unlink()
    with pytest.raises(KeyboardInterrupt):
        main(args)
    rows = read_raw(tmp_path / "run" / "raw.csv")
    paper = sorted((r["prompt_index"], r["status"]) for r in rows if r["system"] == "fiddler-paper")
    assert paper == [(0, "ok"), (1, "failed")] and len(rows) == 4
    # and its tables were rendered from the rows it has (removed before it began)
    assert (tmp_path / "run" / "summary.csv").exists()

    monkeypatch.setattr(engine_systems.EngineSystem, "generate", original)
    assert main(args) == 0  # the resume runs the failed rows again, and only those
    rows = read_raw(tmp_path / "run" / "raw.csv")
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}


def test_report_re_renders_from_raw_rows(sweep, tmp_path):
    before = (sweep / "summary.csv").read_text()
    (sweep / "summary.csv").unlink()
    render(sweep)
    assert (sweep / "summary.csv").read_text() == before
    with pytest.raises(FileNotFoundError, match=r"matrix\.json"):
        render(tmp_path)


def test_command_line(tmp_path, capsys):
    from harness.cli import main

    out = tmp_path / "cli-run"
    code = main(
        [
            "run",
            "--systems",
            "fiddler-hybrid",
            "--scenario",
            "long-prefill",
            "--inputs",
            "48",
            "--model",
            "mixtral-tiny",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--gpu-memory-gb",
            "0.0175",
            "--prompts-per-cell",
            "1",
            "--dataset",
            "random",
            "--reference",
            "",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and (out / "summary.csv").exists()
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.system) == ["fiddler-hybrid"] and summary.ttft_s.iloc[0] > 0
    assert main(["report", str(out)]) == 0
    assert main(["run", "--systems", "deepspeed", "--scenario", "single-batch", "--model", "mixtral-tiny"]) == 2
    assert "unknown systems" in capsys.readouterr().err


def test_report_arithmetic_edge_cases():
    from harness.report import _agreement

    assert _agreement([1, 2, 3, 4], [1, 2, 9], 4) == pytest.approx(2 / 3)  # only positions both have
    assert _agreement([1, 2], [], 2) is None and _agreement([1], None, 1) is None
    # a time-limited run of 10 of 16 tokens: its 8-token cell is exact (derived), 16 is extrapolated
    steps = [0.1] * 9
    assert cell_metrics(0.5, steps, 8, 10).status == "derived"
    assert cell_metrics(0.5, steps, 16, 10).status == "extrapolated"


def test_resuming_with_other_settings_is_refused(sweep):
    import dataclasses as dc

    spec_ = SweepSpec(
        systems=("expert-lru", "fiddler-paper"),
        cells=tuple(cells("single-batch", inputs=(16, 32), outputs=(3, 6))),
        model="mixtral-tiny",
        out=sweep,
        device="cpu",
        dtype=torch.float32,
        gpu_memory_gb=0.0175,
        prompts_per_cell=2,
        reference="cpu-only",
    )
    with pytest.raises(ValueError, match=r"other settings .*gpu_memory_gb"):
        run_sweep(dc.replace(spec_, gpu_memory_gb=0.02))
    # the time limit only bounds effort: a sweep resumes under another one (nothing is left to run)
    before = (sweep / "raw.csv").read_text()
    earlier = json.loads((sweep / "env.json").read_text())
    run_sweep(dc.replace(spec_, run_time_limit_s=60.0))
    assert (sweep / "raw.csv").read_text() == before
    # and the earlier invocations' environment stays on record
    env = json.loads((sweep / "env.json").read_text())
    assert env["settings"]["run_time_limit_s"] == 60.0
    assert env["previous"][-1]["settings"] == earlier["settings"] and "previous" not in env["previous"][-1]


def test_the_reference_is_not_a_baseline_and_runs_uncapped(sweep):
    matrix = json.loads((sweep / "matrix.json").read_text())
    assert matrix["compared"] == ["expert-lru", "fiddler-paper"] and matrix["reference"] == "cpu-only"
    tables = (sweep / "tables.md").read_text()
    speedup_rows = tables.split("over each baseline")[1].split("##")[0]
    assert "expert-lru" in speedup_rows and "cpu-only" not in speedup_rows


def test_each_system_is_released_before_the_next_loads(tmp_path, monkeypatch):
    """The GPU host measured 47 GB 'peak' under a 24 GB budget when a closed system stayed
    referenced while the next one loaded; every closed system must be unreachable by then."""
    import weakref

    from harness import runner

    loaded: list[weakref.ref] = []
    original = runner.load_system

    def tracking(name, options):
        assert all(ref() is None for ref in loaded), "a closed system is still alive"
        system = original(name, options)
        loaded.append(weakref.ref(system))
        return system

    monkeypatch.setattr(runner, "load_system", tracking)
    run_sweep(spec(tmp_path, systems=("expert-lru", "fiddler-paper")))
    assert len(loaded) == 3 * 2  # the reference and both systems, once per round of prompts


def test_no_system_is_loaded_past_the_stated_time_and_the_sweep_resumes(tmp_path, loads):
    out = run_sweep(spec(tmp_path, no_new_system_after_s=0.0))  # past it before the first load
    assert loads == [] and not (out / "raw.csv").exists()
    run_sweep(spec(tmp_path, no_new_system_after_s=3600.0))  # a resume may state another
    assert len(loads) == 3 * 2
    assert {r["status"] for r in read_raw(out / "raw.csv")} <= {"ok", "time-limited"}


def test_validation_sets_the_simulator_against_the_measured_cells(sweep, tmp_path):
    from fiddler.calibrate import calibrate, save_calibration
    from harness.cli import main
    from harness.validate import METRICS, TOLERANCE, validate

    calibration = tmp_path / "cal.json"
    save_calibration(
        calibrate(ModelConfig.preset("mixtral-tiny"), "cpu", torch.float32, token_counts=(1, 4)), calibration
    )
    rows = validate(sweep, "h200-host", calibration, samples=2)
    summary = pd.read_csv(sweep / "summary.csv")
    assert len(rows) == len(summary) * len(METRICS)
    checked = rows.dropna(subset=["error"])
    assert len(checked) == len(rows)  # every system of this sweep is simulated
    for r in checked.itertuples():
        assert r.error == pytest.approx(r.predicted / r.measured - 1)
        assert r.within_tolerance == (abs(r.error) <= TOLERANCE)
    assert (
        main(
            [
                "validate",
                str(sweep),
                "--hardware",
                "h200-host",
                "--calibration",
                str(calibration),
                "--samples",
                "2",
                "--out",
                str(tmp_path / "v"),
            ]
        )
        == 0
    )
    text = (tmp_path / "v" / "validation.md").read_text()
    assert "| fiddler-paper |" in text and "Where Fiddler's TTFT goes against its own plan" in text
    cells = len(summary[summary.system == "fiddler-paper"])
    assert f"| fiddler-paper | ttft_s | {cells} |" in text  # the summary above the whole table
    one_token = shutil.copytree(sweep, tmp_path / "one-token")
    summary.assign(decode_tokens_per_s=float("nan")).to_csv(one_token / "summary.csv", index=False)
    # a cell of one output token measures no decode: no decode rows, rather than rows of nan
    assert "decode_tokens_per_s" not in set(validate(one_token, "h200-host", calibration, samples=2).metric)
    with pytest.raises(FileNotFoundError, match="run folder"):
        validate(tmp_path, "h200-host", calibration)


def test_validation_with_the_runs_own_cpu_corrections(sweep, tmp_path):
    """--with-run-corrections plans Fiddler with the medians of what its executor learned in
    the run: a CPU priced slower never predicts faster decode, and the files say it is no
    prediction."""
    from fiddler.calibrate import calibrate, save_calibration
    from harness.cli import main
    from harness.validate import run_corrections, validate

    calibration = tmp_path / "cal.json"
    save_calibration(
        calibrate(ModelConfig.preset("mixtral-tiny"), "cpu", torch.float32, token_counts=(1, 4)), calibration
    )
    learned = run_corrections(sweep)
    assert set(learned) == {"fiddler-paper"}  # the one system here whose executor corrects
    raw = pd.read_csv(sweep / "raw.csv")
    factors = [json.loads(x)["cpu_factor"] for x in raw[raw.system == "fiddler-paper"].stats]
    assert learned["fiddler-paper"][0] == pytest.approx(statistics.median(factors))

    plain = validate(sweep, "h200-host", calibration, samples=2)
    slow = validate(sweep, "h200-host", calibration, samples=2, corrections={"fiddler-paper": (4.0, 2.0)})
    key = ["system", "input_tokens", "output_tokens", "metric"]
    both = plain.merge(slow, on=key, suffixes=("_plain", "_slow"))
    decode = both[(both.system == "fiddler-paper") & (both.metric == "decode_tokens_per_s")]
    assert len(decode) and (decode.predicted_slow <= decode.predicted_plain * (1 + 1e-9)).all()
    others = both[both.system != "fiddler-paper"]
    assert (others.predicted_slow == others.predicted_plain).all()  # only the corrected system moves

    args = ["validate", str(sweep), "--hardware", "h200-host", "--calibration", str(calibration)]
    assert main([*args, "--samples", "2", "--out", str(tmp_path / "v"), "--with-run-corrections"]) == 0
    text = (tmp_path / "v" / "validation-run-corrections.md").read_text()
    assert "Not a prediction" in text and "| fiddler-paper |" in text
    assert not (tmp_path / "v" / "validation.md").exists()
    with pytest.raises(FileNotFoundError, match="raw rows"):
        run_corrections(tmp_path)
    uncorrected = shutil.copytree(sweep, tmp_path / "uncorrected")
    raw.assign(stats="{}").to_csv(uncorrected / "raw.csv", index=False)
    assert run_corrections(uncorrected) == {}
    args[1] = str(uncorrected)
    assert main([*args, "--samples", "2", "--with-run-corrections"]) == 2  # nothing to correct: an error
    assert not (uncorrected / "validation-run-corrections.md").exists()


def test_a_sweep_measures_only_the_rounds_asked_for_and_resumes_the_rest(tmp_path, loads):
    first = dataclasses.replace(spec(tmp_path, systems=("expert-lru",)), reference=None, rounds=1)
    out = run_sweep(first)
    assert {r["prompt_index"] for r in read_raw(out / "raw.csv")} == {0}
    run_sweep(dataclasses.replace(first, rounds=None))  # a resume may ask for every round
    assert sorted(r["prompt_index"] for r in read_raw(out / "raw.csv")) == [0, 0, 1, 1]
    assert loads == ["expert-lru", "expert-lru"]
    with pytest.raises(ValueError, match="at least 1 round"):
        run_sweep(dataclasses.replace(first, rounds=0))


def _mark_disturbed(out: Path, system: str, prompt_index: int, steal: float) -> None:
    """Give one row of a run folder the hypervisor's steal in its telemetry, as the host recorded it."""
    from harness.runner import _write_raw

    rows = read_raw(out / "raw.csv")
    for r in rows:
        if r["system"] == system and int(r["prompt_index"]) == prompt_index and int(r["input_tokens"]) == 16:
            r["telemetry"] = json.dumps(json.loads(r["telemetry"] or "{}") | {"host_steal_cores": steal})
    _write_raw(out / "raw.csv", rows)


def test_rows_the_host_disturbed_are_measured_again_only_when_asked(tmp_path, loads):
    """A row during which the hypervisor took cores is flagged in tables.md; a resume with
    remeasure_disturbed measures it again and keeps the replaced row in raw-disturbed.csv."""
    from harness.runner import DISTURBED_RAW

    first = dataclasses.replace(spec(tmp_path, systems=("expert-lru",)), reference=None)
    out = run_sweep(first)
    _mark_disturbed(out, "expert-lru", 1, 0.9)
    render(out)
    assert "| expert-lru | 16/6 w1 | 1 | 0.00 | 0.90 |" in (out / "tables.md").read_text()
    loads.clear()
    run_sweep(first)  # a plain resume keeps it
    assert loads == [] and not (out / DISTURBED_RAW).exists()
    run_sweep(dataclasses.replace(first, remeasure_disturbed=True))
    assert loads == ["expert-lru"]
    rows = read_raw(out / "raw.csv")
    kept = read_raw(out / DISTURBED_RAW)
    assert len(rows) == 4 and len(kept) == 1
    assert json.loads(kept[0]["telemetry"])["host_steal_cores"] == 0.9 and int(kept[0]["prompt_index"]) == 1
    again = next(r for r in rows if _same_run(r, kept[0]))
    assert again["status"] in ("ok", "time-limited") and again["step_times_s"] != kept[0]["step_times_s"]
    assert "kept in raw-disturbed.csv" in (out / "tables.md").read_text()
    _mark_disturbed(out, "expert-lru", 1, 0.8)  # disturbed again: it stands, once measured again
    loads.clear()
    run_sweep(dataclasses.replace(first, remeasure_disturbed=True))
    assert loads == [] and len(read_raw(out / DISTURBED_RAW)) == 1


def test_rows_of_a_fixed_system_are_measured_again_once(tmp_path, loads):
    """remeasure_systems measures every row of the named system again, once (a resume after that
    loads nothing), keeps the replaced rows in raw-replaced.csv, leaves the other system's rows
    alone, and tables.md says so; a name the sweep does not run is refused."""
    from harness.runner import DISTURBED_RAW, REPLACED_RAW

    first = dataclasses.replace(spec(tmp_path), reference=None)
    out = run_sweep(first)
    before = {run_key(r): r for r in read_raw(out / "raw.csv")}
    again = dataclasses.replace(first, remeasure_systems=("fiddler-paper",))
    loads.clear()
    run_sweep(again)
    assert loads == ["fiddler-paper"] * 2  # once a round
    rows = read_raw(out / "raw.csv")
    kept = read_raw(out / REPLACED_RAW)
    assert len(rows) == 8 and len(kept) == 4 and {r["system"] for r in kept} == {"fiddler-paper"}
    for r in rows:
        same = r["step_times_s"] == before[run_key(r)]["step_times_s"]
        assert same == (r["system"] == "expert-lru"), r["system"]
    commit = str(rows[0]["git_commit"])[:7]
    assert f"| fiddler-paper | 4 | {commit} | 4 | {commit} |" in (out / "tables.md").read_text()
    assert not (out / DISTURBED_RAW).exists()
    loads.clear()
    run_sweep(again)
    assert loads == [] and len(read_raw(out / REPLACED_RAW)) == 4
    with pytest.raises(ValueError, match="does not run"):
        run_sweep(dataclasses.replace(first, remeasure_systems=("layer-streaming",)))


def test_a_fixed_system_that_fails_to_be_measured_again_is_retried_and_its_row_kept(tmp_path, monkeypatch):
    from harness import runner

    first = dataclasses.replace(spec(tmp_path, systems=("expert-lru",)), reference=None)
    out = run_sweep(first)
    again = dataclasses.replace(first, remeasure_systems=("expert-lru",))

    def broken(name, options):
        raise RuntimeError("the GPU went away")

    original = runner.load_system
    monkeypatch.setattr(runner, "load_system", broken)
    run_sweep(again)
    assert {r["status"] for r in read_raw(out / "raw.csv")} == {"failed"}
    assert len(read_raw(out / runner.REPLACED_RAW)) == 4  # every measurement kept meanwhile
    assert "| expert-lru | 4 |" in (out / "tables.md").read_text() and "| 0 | - |" in (out / "tables.md").read_text()
    monkeypatch.setattr(runner, "load_system", original)
    run_sweep(again)
    assert {r["status"] for r in read_raw(out / "raw.csv")} <= {"ok", "time-limited"}
    assert len(read_raw(out / runner.REPLACED_RAW)) == 4


def _same_run(a: dict, b: dict) -> bool:
    return all(str(a[k]) == str(b[k]) for k in KEY)


def test_a_disturbed_row_that_fails_to_be_measured_again_is_a_failed_row_until_it_is(tmp_path, monkeypatch):
    """The failure is on record (and a resume retries it); the measurement is kept meanwhile."""
    from harness import runner

    first = dataclasses.replace(spec(tmp_path, systems=("expert-lru",)), reference=None, remeasure_disturbed=True)
    out = run_sweep(first)
    _mark_disturbed(out, "expert-lru", 0, 0.9)
    original = runner.load_system

    def broken(name, options):
        raise RuntimeError("the GPU went away")

    monkeypatch.setattr(runner, "load_system", broken)
    run_sweep(first)
    statuses = sorted(r["status"] for r in read_raw(out / "raw.csv"))
    assert statuses == ["failed", "ok", "ok", "ok"] and len(read_raw(out / runner.DISTURBED_RAW)) == 1
    monkeypatch.setattr(runner, "load_system", original)
    run_sweep(first)
    assert {r["status"] for r in read_raw(out / "raw.csv")} == {"ok"}
    assert len(read_raw(out / runner.DISTURBED_RAW)) == 1


def test_a_sweep_stopped_between_setting_aside_and_replacing_measures_the_row_again(tmp_path, monkeypatch, loads):
    from harness import runner

    first = dataclasses.replace(spec(tmp_path, systems=("expert-lru",)), reference=None, remeasure_disturbed=True)
    out = run_sweep(first)
    _mark_disturbed(out, "expert-lru", 0, 0.9)
    disturbed_row = next(r for r in read_raw(out / "raw.csv") if "0.9" in r["telemetry"])
    runner._set_aside(out / runner.DISTURBED_RAW, disturbed_row)  # the first write, then the stop
    render(out)
    assert "kept in raw-disturbed.csv" not in (out / "tables.md").read_text()  # not replaced yet
    loads.clear()
    run_sweep(first)
    assert loads == ["expert-lru"] and len(read_raw(out / runner.DISTURBED_RAW)) == 1
    assert not any(runner.same_measurement(r, disturbed_row) for r in read_raw(out / "raw.csv"))


def test_progress_counts_only_the_runs_this_invocation_may_measure(tmp_path, capsys):
    """Rows of later rounds already measured are not this invocation's progress: a resume of
    round 0, with both rounds of one system measured and round 1 of the other, counts 4 runs,
    2 of them done."""
    from harness.runner import _write_raw

    first = dataclasses.replace(spec(tmp_path), reference=None)
    out = run_sweep(first)
    rows = read_raw(out / "raw.csv")
    kept = [r for r in rows if not (r["system"] == "fiddler-paper" and int(r["prompt_index"]) == 0)]
    _write_raw(out / "raw.csv", kept)
    capsys.readouterr()
    run_sweep(dataclasses.replace(first, rounds=1))
    counts = re.findall(r"^\[(\d+)/(\d+)\]", capsys.readouterr().err, flags=re.M)
    assert counts == [("3", "4"), ("4", "4")]


def test_a_resumed_piece_calibrates_its_machine_and_validation_prices_its_rows_there(tmp_path):
    """--calibrate-machine: the piece's machine is calibrated into the run folder before its
    rows, which name the file (the earlier piece's rows do not); --per-machine prices each row
    with its machine's file: a slower machine predicts slower decode."""
    from fiddler.calibrate import calibrate, load_calibration, save_calibration
    from harness.cli import main
    from harness.validate import machine_calibrations, validate

    one_length = tuple(cells("single-batch", inputs=(16,), outputs=(3, 6)))
    first = dataclasses.replace(spec(tmp_path, systems=("fiddler-paper",)), reference=None, cells=one_length)
    out = run_sweep(first)
    raw = read_raw(out / "raw.csv")
    assert not (out / "machine-calibrations").exists()
    pd.DataFrame([r for r in raw if r["prompt_index"] == 0]).to_csv(out / "raw.csv", index=False)  # cut short
    run_sweep(dataclasses.replace(first, calibrate_machine=True))
    (machine,) = (out / "machine-calibrations").glob("*.json")
    named = {
        r["prompt_index"]: json.loads(r["telemetry"]).get("machine_calibration") for r in read_raw(out / "raw.csv")
    }
    assert named == {0: None, 1: str(machine.relative_to(out))}
    # every row records its system's peak from loading (none with cpu standing in for the GPU)
    assert all("load_peak_allocated_gb" in json.loads(r["telemetry"]) for r in read_raw(out / "raw.csv"))
    assert load_calibration(machine)["machine"]["cpu_cores"] >= 1
    run_sweep(dataclasses.replace(first, calibrate_machine=True))  # nothing left to measure: no new file
    assert len(list((out / "machine-calibrations").glob("*.json"))) == 1

    calibration = tmp_path / "cal.json"
    save_calibration(
        calibrate(ModelConfig.preset("mixtral-tiny"), "cpu", torch.float32, token_counts=(1, 4)), calibration
    )
    slow = load_calibration(calibration)
    for curve in ("cpu_expert_s", "gpu_expert_s"):  # a machine three times slower in every part
        slow[curve] = [3 * t for t in slow[curve]]
    slow["copy_expert_s"] *= 3
    save_calibration(slow, machine)
    (listed,) = machine_calibrations(out, calibration)
    assert listed["rows"] == 1 and listed["cpu_vs_run_calibration"] == pytest.approx(3.0)
    assert listed["copy_vs_run_calibration"] == pytest.approx(3.0)
    plain = validate(out, "h200-host", calibration, samples=2)
    priced = validate(out, "h200-host", calibration, samples=2, per_machine=True)
    both = plain.merge(priced, on=["input_tokens", "output_tokens", "metric"], suffixes=("_plain", "_machine"))
    decode = both[both.metric == "decode_tokens_per_s"]
    # each cell's two prompts ran on two machines: the median of their predictions lies between
    assert len(decode) and (decode.predicted_machine < decode.predicted_plain).all()
    args = ["validate", str(out), "--hardware", "h200-host", "--calibration", str(calibration), "--samples", "2"]
    assert main([*args, "--per-machine"]) == 0
    text = (out / "validation-per-machine.md").read_text()
    assert "own machine's calibration" in text and f"`{machine.relative_to(out)}`" in text and "| 3.00x |" in text
    # the decode bound (tables.md) of a cell measured on both machines is the median of the two
    from harness.report import bounds_markdown, machine_calibrations_named

    raw_now = read_raw(out / "raw.csv")
    machines = machine_calibrations_named(raw_now, out)
    assert set(machines) == {str(machine.relative_to(out))}
    summary = pd.read_csv(out / "summary.csv")
    base = load_calibration(calibration)

    def bounds(text: str) -> list[float]:
        return [float(line.split("|")[5]) for line in text.splitlines() if line.startswith("| fiddler-paper | 16/")]

    plain_bounds = bounds(bounds_markdown(summary, base, raw_now, ["fiddler-paper"]))
    machine_bounds = bounds(bounds_markdown(summary, base, raw_now, ["fiddler-paper"], machines))
    assert len(plain_bounds) == 2 and all(m < p for m, p in zip(machine_bounds, plain_bounds, strict=True))
    # the same file saying its host was disturbed: the bound, which it would lower, takes the run's;
    # validation still prices the row there (the prediction as made before it: the host may stay slow)
    from harness.report import steady_machine_calibrations

    slow["steadiness"] = {"attempt": 1, "attempts": 1, "problems": ["the hypervisor kept 1.32 cores busy"]}
    save_calibration(slow, machine)
    steady = steady_machine_calibrations(machine_calibrations_named(raw_now, out))
    assert steady == {} and bounds(bounds_markdown(summary, base, raw_now, ["fiddler-paper"], steady)) == plain_bounds
    still = validate(out, "h200-host", calibration, samples=2, per_machine=True)
    assert still.predicted.tolist() == pytest.approx(priced.predicted.tolist())
    with pytest.raises(ValueError, match="do not combine"):
        validate(out, "h200-host", calibration, corrections={"fiddler-paper": (1.0, 1.0)}, per_machine=True)
    with pytest.raises(ValueError, match="--calibrate-machine"):
        pd.DataFrame(raw).assign(telemetry="{}").to_csv(out / "raw.csv", index=False)
        validate(out, "h200-host", calibration, samples=2, per_machine=True)


def test_per_machine_prices_each_cell_with_the_machines_of_its_own_rows(tmp_path):
    """A single-batch cell is measured by the longer greedy runs of its input (prefix), a beam
    cell by its own run only; the cell's prediction is the median over those rows' machines."""
    from harness.validate import CELL_KEY, METRICS, _predict_per_machine

    def row(scenario, inputs, width, out, machine):
        telemetry = json.dumps({"machine_calibration": machine} if machine else {})
        return dict(
            system="s", scenario=scenario, input_tokens=inputs, beam_width=width, run_output_tokens=out,
            status="ok", telemetry=telemetry, stats="{}",
        )  # fmt: skip

    pd.DataFrame(
        [
            row("single-batch", 32, 1, 8, "m/a.json"),
            row("single-batch", 32, 1, 8, "m/b.json"),
            row("single-batch", 32, 1, 8, None),
            row("beam-search", 32, 4, 8, "m/a.json"),
            row("beam-search", 32, 4, 16, "m/b.json"),
        ]
    ).to_csv(tmp_path / "raw.csv", index=False)
    speed = {"cal.json": 1.0, "a.json": 2.0, "b.json": 4.0}  # what each file predicts

    def predict(calibration):
        grid = [("single-batch", 32, 4, 1), ("single-batch", 32, 8, 1), ("beam-search", 32, 8, 4)]
        grid.append(("beam-search", 32, 16, 4))
        value = speed[Path(calibration).name]
        return pd.DataFrame(
            [dict(zip(CELL_KEY, ("s", *c), strict=True)) | dict.fromkeys(METRICS, value) for c in grid]
        ).assign(status="ok")

    frame = _predict_per_machine(tmp_path, tmp_path / "cal.json", predict).set_index(CELL_KEY)
    assert frame.at[("s", "single-batch", 32, 4, 1), "ttft_s"] == 2.0  # median of 1, 2, 4
    assert frame.at[("s", "single-batch", 32, 8, 1), "ttft_s"] == 2.0
    assert frame.at[("s", "beam-search", 32, 8, 4), "ttft_s"] == 2.0  # its own run: machine a only
    assert frame.at[("s", "beam-search", 32, 16, 4), "ttft_s"] == 4.0


def test_validation_of_a_truncated_preset(sweep, tmp_path):
    """A run with --layers L records its model as '<preset>-L<L>'; validation resolves it."""
    from fiddler.calibrate import calibrate, save_calibration
    from harness.validate import validate

    truncated = tmp_path / "truncated"
    shutil.copytree(sweep, truncated)
    summary = pd.read_csv(truncated / "summary.csv")
    summary["model"] = [f"{m}-L{n}" for m, n in zip(summary.model, summary.num_layers, strict=True)]
    summary.to_csv(truncated / "summary.csv", index=False)
    calibration = tmp_path / "cal.json"
    save_calibration(
        calibrate(ModelConfig.preset("mixtral-tiny"), "cpu", torch.float32, token_counts=(1,)), calibration
    )
    rows = validate(truncated, "h200-host", calibration, samples=1)
    assert rows.error.notna().all()


def test_each_part_of_reproduce_keeps_the_invocations_calibration(tmp_path):
    from harness.reproduce import run_calibration

    measured = tmp_path / "first" / "calibration.json"
    measured.parent.mkdir()
    measured.write_text(json.dumps({"schema": "fiddler-calibration", "marker": 1}))
    config = ModelConfig.preset("mixtral-tiny")
    assert run_calibration(measured.parent, config, True, None) == measured  # kept, not measured again
    copied = run_calibration(tmp_path / "second", config, True, measured)
    assert json.loads(copied.read_text())["marker"] == 1


def test_validation_refuses_a_calibration_of_another_shape(sweep, tmp_path):
    from fiddler.calibrate import calibrate, save_calibration
    from harness.validate import validate

    other = tmp_path / "other.json"
    save_calibration(calibrate(ModelConfig.preset("mixtral-small"), "cpu", torch.float32, token_counts=(1,)), other)
    with pytest.raises(ValueError, match="another expert shape"):
        validate(sweep, "h200-host", other)


def test_report_names_a_disturbed_calibration_and_rows_measured_on_a_busy_host():
    from harness.report import disturbance_markdown

    def row(system: str, telemetry: dict, status: str = "ok") -> dict:
        key = {"input_tokens": 32, "run_output_tokens": 32, "beam_width": 1, "prompt_index": 0}
        return {"system": system, "status": status, "telemetry": json.dumps(telemetry)} | key

    quiet = [row("fiddler-hybrid", {"host_other_busy_cores": 0.1, "host_steal_cores": 0.0}), row("cpu-only", {})]
    steady = {"steadiness": {"problems": []}}
    assert disturbance_markdown(quiet, steady) == "" and disturbance_markdown(quiet, None) == ""
    busy = [*quiet, row("llama-cpp", {"host_other_busy_cores": 0.2, "host_steal_cores": 1.25})]
    text = disturbance_markdown(busy, {"steadiness": {"problems": ["other processes kept 2.00 cores busy"]}})
    assert "calibration was measured on a disturbed host (other processes kept 2.00 cores busy)" in text
    assert "| llama-cpp | 32/32 w1 | 0 | 0.20 | 1.25 |" in text and "fiddler-hybrid" not in text


def test_prefill_breakdown_sets_fiddlers_ttft_against_its_own_plan(sweep, tmp_path):
    """Per (Fiddler system, scenario, input length): medians over the rows of each row's rest
    (TTFT less the planner's prefill prediction, per layer) and of the profile's overheads on
    the share of layers that used the CPU; systems without prefill counters have no row; a
    folder without raw rows, or nothing to break down, renders nothing."""
    from harness.prefill_breakdown import prefill_breakdown, prefill_markdown
    from harness.simulate import load_profile

    rows = prefill_breakdown(sweep, "h200-host")
    assert set(rows.system) == {"fiddler-paper"}  # expert-lru and the reference record no plan
    assert sorted(rows.input_tokens) == [16, 32] and (rows.rows == 2).all()
    _, hw = load_profile("h200-host")
    for r in rows.itertuples():
        raw = [
            (float(x["ttft_s"]), json.loads(x["stats"])["prefill"], int(x["num_layers"]))
            for x in read_raw(sweep / "raw.csv")
            if x["system"] == r.system and int(x["input_tokens"]) == r.input_tokens
        ]
        rests = [1e3 * (ttft - p["predicted_s"]) / layers for ttft, p, layers in raw]
        profiles = [
            1e3 * (hw.step_overhead_per_layer_s + p["cpu_jobs"] / layers * hw.cpu_path_overhead(r.input_tokens))
            for _, p, layers in raw
        ]
        assert r.rest_per_layer_ms == pytest.approx(statistics.median(rests))
        assert r.profile_per_layer_ms == pytest.approx(statistics.median(profiles))
        assert r.ttft_s == pytest.approx(statistics.median(t for t, _, _ in raw)) and r.planned_s > 0
    text = "\n".join(prefill_markdown(rows))
    assert "Where Fiddler's TTFT goes" in text and "| fiddler-paper | single-batch | 16 | 2 |" in text
    assert prefill_markdown(rows.iloc[0:0]) == []
    assert prefill_breakdown(tmp_path, "h200-host").empty  # no raw rows: nothing to add


def test_headline_tables_from_a_run_folder(sweep):
    """The headline table shows each compared system's figure at one output length per input
    length (the folder's summary over all prompts, or the first prompt's alone), the best of a
    column in bold, and Fiddler's speedups; a length the folder lacks is one clear error."""
    from harness.headline import _three_digits, headline_markdown

    summary = pd.read_csv(sweep / "summary.csv")
    text = headline_markdown(sweep, 6)
    table = text.split("\n\n")[0]  # the figures, before the speedups
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert "cpu-only" not in rows  # the reference is not compared
    for system in ("expert-lru", "fiddler-paper"):
        for tokens in (16, 32):
            value = summary[
                (summary.system == system) & (summary.input_tokens == tokens) & (summary.output_tokens == 6)
            ].e2e_tokens_per_s.iloc[0]
            assert _three_digits(value) in rows[system]
    assert text.count("**") == 2 * 2  # one best per input length
    assert "| expert-lru | 4 |" in text  # the speedup over the one baseline, on its 4 cells
    first = headline_markdown(sweep, 6, prompts=1)
    raw = [r for r in read_raw(sweep / "raw.csv") if int(r["prompt_index"]) == 0]
    alone = summarize(raw, json.loads((sweep / "matrix.json").read_text()))
    value = alone[(alone.system == "fiddler-paper") & (alone.input_tokens == 16) & (alone.output_tokens == 6)]
    assert _three_digits(value.e2e_tokens_per_s.iloc[0]) in first
    with pytest.raises(ValueError, match="no single-batch cell at 7 output tokens"):
        headline_markdown(sweep, 7)
    with pytest.raises(ValueError, match="--prompts must be at least 1"):
        headline_markdown(sweep, 6, prompts=0)
