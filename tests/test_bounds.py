"""The bandwidth bound of decode (both paths at once when that is faster, either alone when
the slowdowns beside each other make that faster), the copy-bound limit of a long prefill,
and the harness's tables against them."""

import dataclasses
import json
import math
import statistics

import pytest
import torch
from test_harness import spec
from test_planner import HOST_LIKE

from fiddler.bounds import decode_bound_tokens_per_s, missing_experts_s, prefill_copy_bound_s, same_window_model
from fiddler.calibrate import calibrate, load_calibration, save_calibration
from fiddler.config import ModelConfig
from fiddler.cost_model import LatencyModel
from harness.report import render
from harness.runner import read_raw, run_sweep
from harness.scenarios import cells

MIXTRAL = ModelConfig.preset("mixtral-8x7b")
EVEN = dataclasses.replace(HOST_LIKE, cpu_expert_s=[4e-3] * 5, copy=6e-3, cpu_slowdown=1.0, copy_slowdown=1.0)


def test_missing_experts_divide_between_the_paths():
    assert missing_experts_s(EVEN, 5) == pytest.approx(5 / (1 / 4e-3 + 1 / 6e-3))
    assert missing_experts_s(EVEN, 0) == 0.0
    crowded = dataclasses.replace(EVEN, cpu_slowdown=10.0, copy_slowdown=10.0)  # together worse than the CPU alone
    assert missing_experts_s(crowded, 5) == pytest.approx(5 * 4e-3)


def test_decode_bound_counts_the_missing_routed_experts():
    layers, top_k = MIXTRAL.num_layers, MIXTRAL.num_experts_per_token
    per_expert = 1 / (1 / 4e-3 + 1 / 6e-3)
    assert decode_bound_tokens_per_s(MIXTRAL, EVEN, 0.0) == pytest.approx(1 / (layers * top_k * per_expert))
    assert decode_bound_tokens_per_s(MIXTRAL, EVEN, 0.75) == pytest.approx(4 / (layers * top_k * per_expert))
    assert math.isinf(decode_bound_tokens_per_s(MIXTRAL, EVEN, 1.0))
    with pytest.raises(ValueError, match="gpu_hit_rate"):
        decode_bound_tokens_per_s(MIXTRAL, EVEN, 1.5)


def test_a_sweep_with_its_calibration_reports_fiddler_against_the_bound(tmp_path):
    run = run_sweep(spec(tmp_path / "sweep"))
    assert "bandwidth bound" not in (run / "tables.md").read_text()  # no calibration in the folder
    config = ModelConfig.preset("mixtral-tiny")
    save_calibration(calibrate(config, "cpu", torch.float32, token_counts=(1,)), run / "calibration.json")
    summary = render(run)
    tables = (run / "tables.md").read_text()
    assert "## Decode against the bandwidth bound (single-batch)" in tables
    model = LatencyModel.from_calibration(load_calibration(run / "calibration.json"))
    row = summary[(summary.system == "fiddler-paper") & summary.gpu_hit_rate.notna()].iloc[0]
    # the rows record decode's own hit rate (prefill left out), and the table uses it
    decode_rates = [
        json.loads(r["stats"])["decode_gpu_hit_rate"]
        for r in read_raw(run / "raw.csv")
        if r["system"] == "fiddler-paper" and int(r["input_tokens"]) == row.input_tokens
    ]
    hit = statistics.median(decode_rates)
    bound = decode_bound_tokens_per_s(config, model, hit)
    decode = row.decode_tokens_per_s
    assert f"| {hit:.1%} | {decode:.3g} | {bound:.3g} | {decode / bound:.0%} |" in tables
    assert "one-window bound" not in tables  # the calibration does not record it (no accelerator)

    # a calibration that times the copies in the CPU's window too: the copies were slower there
    calibration = load_calibration(run / "calibration.json")
    assert same_window_model(calibration) is None
    calibration["concurrent"] |= {"cpu_slowdown": 1.1, "copy_slowdown": 1.05, "copy_slowdown_same_window": 1.6}
    save_calibration(calibration, run / "calibration.json")
    render(run)
    tables = (run / "tables.md").read_text()
    window = same_window_model(calibration)
    assert window.copy_slowdown == 1.6 and window.cpu_slowdown == 1.1
    bound = decode_bound_tokens_per_s(config, LatencyModel.from_calibration(calibration), hit)
    lower = decode_bound_tokens_per_s(config, window, hit)
    assert lower <= bound
    line = f"| {decode:.3g} | {bound:.3g} | {decode / bound:.0%} | {lower:.3g} | {decode / lower:.0%} |"
    assert line in tables and "| one-window bound | share of it |" in tables
    assert "\n" + "|---" * 8 + "|\n" in tables  # the separator spans the two added columns


def test_a_cell_whose_machine_calibration_lacks_the_one_window_figure_shows_none():
    """The run's calibration records it, the machine that measured the cell's row does not: that
    cell's one-window bound is not made up from the run's calibration (-), another cell's is."""
    import pandas as pd

    from harness.report import bounds_markdown

    config = ModelConfig.preset("mixtral-tiny")
    base = calibrate(config, "cpu", torch.float32, token_counts=(1,))
    base["concurrent"] |= {"cpu_slowdown": 1.1, "copy_slowdown": 1.05, "copy_slowdown_same_window": 1.6}
    machine = dict(base, concurrent=dict(base["concurrent"]))
    del machine["concurrent"]["copy_slowdown_same_window"]

    def row(inputs, name):
        telemetry = json.dumps({"machine_calibration": name} if name else {})
        stats = json.dumps({"decode_gpu_hit_rate": 0.25})
        return dict(system="fiddler-hybrid", scenario="single-batch", input_tokens=inputs, beam_width=1,
                    run_output_tokens=8, status="ok", telemetry=telemetry, stats=stats)  # fmt: skip

    raw = [row(16, "m/old.json"), row(32, None)]
    summary = pd.DataFrame(
        [
            dict(
                system="fiddler-hybrid",
                scenario="single-batch",
                model="mixtral-tiny",
                num_layers=config.num_layers,
                input_tokens=n,
                output_tokens=8,
                beam_width=1,
                gpu_hit_rate=0.25,
                decode_tokens_per_s=1.0,
                ttft_s=0.1,
            )
            for n in (16, 32)
        ]
    )
    text = bounds_markdown(summary, base, raw, ["fiddler-hybrid"], {"m/old.json": machine})
    lines = {n: next(x for x in text.splitlines() if x.startswith(f"| fiddler-hybrid | {n}/8 |")) for n in (16, 32)}
    assert lines[16].endswith("| - | - |") and not lines[32].endswith("| - | - |")


def test_prefill_copy_bound_copies_every_expert_not_held():
    slots = MIXTRAL.num_expert_slots
    assert prefill_copy_bound_s(MIXTRAL, EVEN, 56) == pytest.approx((slots - 56) * 6e-3)
    assert prefill_copy_bound_s(MIXTRAL, EVEN, slots) == 0.0
    with pytest.raises(ValueError, match="resident experts"):
        prefill_copy_bound_s(MIXTRAL, EVEN, slots + 1)


def test_a_long_prefill_sweep_reports_ttft_against_the_copy_bound(tmp_path):
    cells_ = tuple(cells("long-prefill", inputs=(24, 48)))
    run = run_sweep(dataclasses.replace(spec(tmp_path / "sweep"), cells=cells_, prompts_per_cell=1))
    config = ModelConfig.preset("mixtral-tiny")
    save_calibration(calibrate(config, "cpu", torch.float32, token_counts=(1,)), run / "calibration.json")
    summary = render(run)
    tables = (run / "tables.md").read_text()
    assert "## Long prefill against the copy-bound limit" in tables
    resident = json.loads(next(r for r in read_raw(run / "raw.csv") if r["system"] == "fiddler-paper")["stats"])
    model = LatencyModel.from_calibration(load_calibration(run / "calibration.json"))
    limit = prefill_copy_bound_s(config, model, resident["experts_resident"])
    for r in summary.itertuples():  # every system, baselines too, against the same limit
        assert f"| {r.system} | {r.input_tokens} | {r.ttft_s:.3g} | {r.ttft_s / limit:.2f}x |" in tables


def test_no_prefill_limit_when_the_gpu_holds_every_expert(tmp_path):
    cells_ = tuple(cells("long-prefill", inputs=(24,)))
    roomy = dataclasses.replace(spec(tmp_path / "sweep"), cells=cells_, prompts_per_cell=1, gpu_memory_gb=4.0)
    run = run_sweep(roomy)
    config = ModelConfig.preset("mixtral-tiny")
    save_calibration(calibrate(config, "cpu", torch.float32, token_counts=(1,)), run / "calibration.json")
    render(run)  # a zero limit must not break the report
    assert "copy-bound limit" not in (run / "tables.md").read_text()
