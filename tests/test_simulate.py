"""The simulator: profiles validate, it reuses the planner's per-layer predictions, and its
predictions move the right way when the hardware or the budget improves."""

import copy
import json

import pytest
import torch

from fiddler.config import ModelConfig
from fiddler.cost_model import LatencyModel
from fiddler.placement import plan_placement
from fiddler.planner import plan_layer
from harness.report import paper_comparison
from harness.scenarios import cells
from harness.simulate import SimulationSpec, load_profile, profile_names, simulate, validate_profile

MIXTRAL = ModelConfig.preset("mixtral-8x7b")


@pytest.mark.parametrize("name", ["paper-env1", "paper-env2", "paper-env3", "h200-host"])
def test_shipped_profiles_validate(name):
    data, hw = load_profile(name)
    assert name in profile_names() and hw.gpu_memory_gb > 0 and hw.h2d_pinned_gb_per_s > 0
    if not data["profile"]["measured"]:
        assert all({"field", "value", "basis"} <= set(a) for a in data["profile"]["assumptions"])


def test_bad_profiles_are_refused(tmp_path):
    data, _ = load_profile("paper-env1")
    broken = copy.deepcopy(data)
    del broken["hardware"]["gpu_tflops"]
    with pytest.raises(ValueError, match=r"hardware\.gpu_tflops"):
        validate_profile(broken, "x")
    broken = copy.deepcopy(data)
    broken["profile"]["assumptions"] = []
    with pytest.raises(ValueError, match="states no assumptions"):
        validate_profile(broken, "x")
    with pytest.raises(FileNotFoundError, match="neither a profile"):
        load_profile(str(tmp_path / "none.json"))
    # x out of order, a zero factor, empty, no value, not numbers, a zero x, a negative x, a
    # bool, not finite
    for curve in (
        [[8, 1.0], [4, 1.1]],
        [[1, 0.0]],
        [],
        [[1]],
        [["8", 1.0]],
        [[1, None]],
        [[0, 1.0]],
        [[-1, 1.0]],
        [[True, 1.0]],
        [[1, float("nan")]],
        [[1, float("inf")]],
    ):
        broken = copy.deepcopy(data)
        broken["hardware"]["prefill_cpu_factor_by_rows"] = curve
        with pytest.raises(ValueError, match="prefill_cpu_factor_by_rows"):
            validate_profile(broken, "x")
    # an overhead may be zero (the paper environments'), not negative
    for curve, refused in (([[1, 0.0]], False), ([[1, -0.001]], True), ([[8, 0.001], [1, 0.0]], True)):
        changed = copy.deepcopy(data)
        changed["hardware"]["cpu_path_overhead_s_by_tokens"] = curve
        if refused:
            with pytest.raises(ValueError, match="cpu_path_overhead_s_by_tokens"):
                validate_profile(changed, "x")
        else:
            validate_profile(changed, "x")


def test_profile_curves_interpolate_and_hold_flat_outside():
    _, hw = load_profile("h200-host")
    for points, at in (
        (hw.prefill_cpu_factor_by_rows, hw.prefill_cpu_factor),
        (hw.cpu_path_overhead_s_by_tokens, hw.cpu_path_overhead),
    ):
        (first_x, first), *_, (last_x, last) = points
        assert at(first_x / 2) == first and at(10 * last_x) == last
        (x0, y0), (x1, y1) = points[1:3]
        assert at((x0 + x1) / 2) == pytest.approx((y0 + y1) / 2)


def test_cpu_path_overhead_follows_the_passs_tokens(tmp_path):
    """The host's work around the CPU path is priced at the pass's tokens: raising the curve at
    a beam step's width slows beam decode of a policy that uses the CPU, and neither a one-token
    decode step nor copy-experts (no CPU path)."""
    data, _ = load_profile("h200-host")
    width = 8
    slower = copy.deepcopy(data)
    slower["hardware"]["cpu_path_overhead_s_by_tokens"] = [[1, 0.00062], [width, 0.05]]
    path = tmp_path / "slow-beam-handoff.json"
    path.write_text(json.dumps(slower))
    systems = ("fiddler-paper", "fiddler-copy-experts")

    def simulated(hardware, scenario_cells):
        spec = SimulationSpec(
            systems=systems,
            cells=tuple(scenario_cells),
            config=MIXTRAL,
            hardware=hardware,
            gpu_memory_gb=24.0,
            samples=2,
        )
        return {r["system"]: r["decode_tokens_per_s"] for r in simulate(spec)}

    one = cells("single-batch", inputs=(32,), outputs=(8,))
    beam = cells("beam-search", inputs=(32,), outputs=(8,), beam_widths=(width,))
    assert simulated(str(path), one) == pytest.approx(simulated("h200-host", one))
    base, slow = simulated("h200-host", beam), simulated(str(path), beam)
    assert slow["fiddler-paper"] < 0.8 * base["fiddler-paper"]
    assert slow["fiddler-copy-experts"] == pytest.approx(base["fiddler-copy-experts"])


def test_cpu_path_overhead_prices_the_prefill_at_the_prompts_tokens(tmp_path):
    """Raising the curve only at a prompt's length slows the prefill (TTFT) of a policy that
    uses the CPU at that length, and not one-token decode, nor a shorter prompt's prefill."""
    data, _ = load_profile("h200-host")
    slower = copy.deepcopy(data)
    curve = slower["hardware"]["cpu_path_overhead_s_by_tokens"]  # the last point raised alone
    (short, _), (prompt, _) = curve[-2:]
    curve[-1][1] = 0.05
    path = tmp_path / "slow-prefill-handoff.json"
    path.write_text(json.dumps(slower))

    def simulated(hardware, inputs):
        spec = SimulationSpec(
            systems=("fiddler-paper",),
            cells=tuple(cells("single-batch", inputs=inputs, outputs=(8,))),
            config=MIXTRAL,
            hardware=hardware,
            gpu_memory_gb=24.0,
            samples=2,
        )
        return {r["input_tokens"]: r for r in simulate(spec)}

    base, slow = simulated("h200-host", (short, prompt)), simulated(str(path), (short, prompt))
    assert slow[prompt]["ttft_s"] > base[prompt]["ttft_s"] + 0.5  # ~32 CPU layers x ~50 ms
    assert slow[short]["ttft_s"] == pytest.approx(base[short]["ttft_s"])
    for tokens in (short, prompt):
        assert slow[tokens]["decode_tokens_per_s"] == pytest.approx(base[tokens]["decode_tokens_per_s"])


def test_prefill_cpu_factor_prices_only_the_prefills_cpu_work(tmp_path):
    """Doubling the prefill's CPU factor slows the TTFT of a policy that uses the CPU, not that
    of copy-experts (no CPU work), and no decode step."""
    data, _ = load_profile("h200-host")
    slower = copy.deepcopy(data)
    slower["hardware"]["prefill_cpu_factor_by_rows"] = [[1, 2.0]]
    path = tmp_path / "slow-prefill-cpu.json"
    path.write_text(json.dumps(slower))
    systems = ("fiddler-cpu-experts", "fiddler-copy-experts")
    base, slow = run("h200-host", systems=systems), run(str(path), systems=systems)
    assert slow["fiddler-cpu-experts"]["ttft_s"] > 1.2 * base["fiddler-cpu-experts"]["ttft_s"]
    assert slow["fiddler-copy-experts"]["ttft_s"] == pytest.approx(base["fiddler-copy-experts"]["ttft_s"])
    for system in systems:
        assert slow[system]["decode_tokens_per_s"] == pytest.approx(base[system]["decode_tokens_per_s"])


def test_decode_step_is_the_planners_prediction_summed_over_layers(tmp_path):
    """With a routing trace, one decode step = head + sum over layers of (dense part + the
    planner's predicted MoE time + the profile's overhead around the CPU path where the plan
    uses the CPU, at the pass's one token): the simulator adds nothing else of its own to the MoE
    part. The prefill (here one token routed as the decode step) is the same sum."""
    config = MIXTRAL.with_layers(2)
    trace = [[[[0, 1]], [[2, 5]]]]  # one step; layer 0 routes its token to experts 0 and 1, layer 1 to 2 and 5
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    spec = SimulationSpec(
        systems=("fiddler-hybrid",),
        cells=tuple(cells("single-batch", inputs=(1,), outputs=(2,))),
        config=config,
        hardware="h200-host",
        gpu_memory_gb=3.0,  # some of the trace's experts resident, some not
        routing=str(path),
        samples=1,
    )
    row = simulate(spec)[0]
    calibration, hw = load_profile("h200-host")
    model = LatencyModel.from_calibration(calibration)
    placement = plan_placement(config, 3.0, torch.bfloat16, 3, 1, 2)
    from harness.simulate import _Simulator

    sim = _Simulator(spec, calibration, hw)
    expected, ttft, cpu_layers = sim.head_s(1), sim.head_s(1), 0
    for layer, experts in enumerate(([0, 1], [2, 5])):
        plan = plan_layer(
            dict.fromkeys(experts, 1),
            placement.resident_in_layer(layer),
            "hybrid",
            model,
            2,
            calibration["split_blocks"],
            hidden_rows=1,  # the pass's one token: the executor sends every row down
        )
        uses_cpu = bool(plan.cpu or plan.split)
        cpu_layers += uses_cpu
        expected += sim.dense_layer_s(1, 2 + 0) + plan.predicted_s + uses_cpu * hw.cpu_path_overhead(1)
        ttft += sim.dense_layer_s(1, 1) + plan.predicted_s + uses_cpu * hw.cpu_path_overhead(1)
    assert cpu_layers and hw.cpu_path_overhead(1) > 0, "the trace should send some expert to the CPU"
    assert 1 / row["decode_tokens_per_s"] == pytest.approx(expected)
    assert row["ttft_s"] == pytest.approx(ttft)


def run(
    hardware_override=None,
    budget=24.0,
    systems=("fiddler-hybrid", "fiddler-copy-experts", "expert-lru", "layer-streaming"),
):
    spec = SimulationSpec(
        systems=systems,
        cells=tuple(cells("single-batch", inputs=(32,), outputs=(64,))),
        config=MIXTRAL,
        hardware=hardware_override or "paper-env2",
        gpu_memory_gb=budget,
        samples=4,
    )
    return {r["system"]: r for r in simulate(spec)}


def test_more_pcie_bandwidth_never_slows_copy_based_systems(tmp_path):
    data, _ = load_profile("paper-env2")
    faster = copy.deepcopy(data)
    faster["copy_expert_s"] /= 2
    faster["hardware"]["h2d_pinned_gb_per_s"] *= 2
    faster["hardware"]["h2d_pageable_gb_per_s"] *= 2
    path = tmp_path / "fast-pcie.json"
    path.write_text(json.dumps(faster))
    slow, fast = run(), run(str(path))
    for system in ("fiddler-copy-experts", "expert-lru", "layer-streaming", "fiddler-hybrid"):
        assert fast[system]["e2e_tokens_per_s"] >= slow[system]["e2e_tokens_per_s"], system


def test_more_resident_experts_never_slow_fiddler():
    rates = [
        run(budget=b, systems=("fiddler-hybrid", "fiddler-paper"))["fiddler-hybrid"]["e2e_tokens_per_s"]
        for b in (16.0, 24.0, 48.0, 96.0)
    ]
    assert rates == sorted(rates)


def test_paper_comparison_table():
    spec = SimulationSpec(
        systems=("fiddler-paper", "layer-streaming", "expert-lru"),
        cells=tuple(cells("single-batch", inputs=(16, 32), outputs=(16, 512))),
        config=MIXTRAL,
        hardware="paper-env1",
        gpu_memory_gb=24.0,
        samples=2,
    )
    import pandas as pd

    frame = paper_comparison(pd.DataFrame(simulate(spec)), "paper-env1")
    assert len(frame) == 6 and set(frame.columns) == {"quantity", "paper", "ours", "deviation", "flag"}


def test_simulate_with_a_runs_calibration(tmp_path):
    """`simulate --calibration FILE`: the measured machine's hardware with a run's own latencies
    (how a run is checked against the simulator); a faster copy in the file speeds copy-experts."""
    import pandas as pd

    from harness.cli import main

    data, _ = load_profile("h200-host")
    calibration = {k: v for k, v in data.items() if k not in ("hardware", "profile")}
    calibration["copy_expert_s"] /= 2
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration))
    args = ["simulate", "--hardware", "h200-host", "--systems", "fiddler-copy-experts", "--scenario", "single-batch"]
    args += ["--inputs", "32", "--outputs", "8", "--gpu-memory-gb", "24", "--samples", "2"]
    rates = []
    for extra, out in (([], "profile"), (["--calibration", str(path)], "run")):
        assert main([*args, *extra, "--out", str(tmp_path / out)]) == 0
        rates.append(pd.read_csv(tmp_path / out / "summary.csv").decode_tokens_per_s.iloc[0])
    assert rates[1] > 1.5 * rates[0]
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["profile"]["calibration"] == str(path)


def test_cpu_only_runs_at_the_calibrated_torch_curve(tmp_path):
    """cpu-only is transformers on the CPU: its experts cost the calibration's torch curve,
    not the native kernel's main curve that Fiddler's CPU path runs at."""
    data, _ = load_profile("h200-host")
    plain = {k: v for k, v in data.items() if k not in ("hardware", "profile")}
    torch_curve = plain.get("cpu_kernel_curves_s", {}).get("torch") or plain["cpu_expert_s"]
    slow_torch = plain | {"cpu_kernel_curves_s": {"torch": [3 * t for t in torch_curve]}}
    decode = {}
    for name, calibration in (("plain", plain), ("slow-torch", slow_torch)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(calibration))
        spec = SimulationSpec(
            systems=("cpu-only", "fiddler-hybrid"),
            cells=tuple(cells("single-batch", inputs=(32,), outputs=(8,))),
            config=MIXTRAL.with_layers(4),
            hardware="h200-host",
            gpu_memory_gb=8.0,
            samples=2,
            calibration=str(path),
        )
        decode[name] = {r["system"]: r["decode_tokens_per_s"] for r in simulate(spec)}
    assert decode["slow-torch"]["cpu-only"] < 0.6 * decode["plain"]["cpu-only"]
    assert decode["slow-torch"]["fiddler-hybrid"] == decode["plain"]["fiddler-hybrid"]


def test_simulated_accelerate_keeps_the_baselines_layers_on_the_gpu():
    """The simulator's accelerate-offload holds as many decoder layers on the GPU as the
    baseline's own plan (accelerate's device map, with the room kept for the decode copies)."""
    from baselines import SystemOptions
    from baselines.accelerate_offload import plan_device_map
    from fiddler.hf_reference import empty_transformers_model
    from harness.simulate import _Simulator

    spec = SimulationSpec(
        systems=("accelerate-offload",),
        cells=tuple(cells("single-batch", inputs=(256,), outputs=(512,))),
        config=MIXTRAL,
        hardware="h200-host",
        gpu_memory_gb=24.0,
        samples=1,
    )
    calibration, hw = load_profile("h200-host")
    state, refused = _Simulator(spec, calibration, hw).setup("accelerate-offload", 768, 1)
    options = SystemOptions(config=MIXTRAL, max_seq_len=768, device="cuda", dtype=torch.bfloat16, gpu_memory_gb=24)
    device_map = plan_device_map(empty_transformers_model(MIXTRAL), options, options.budget_bytes, index=0)
    on_gpu = [m for m, d in device_map.items() if d == 0 and m.startswith("model.layers.")]
    assert refused is None and state["layers_on_gpu"] == len(on_gpu) == 6
