"""experiments/decode_gap.py: removing the simulator's terms one at a time never slows decode,
the first step is the simulator's own prediction, and each share is of one bound."""

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
from decode_gap import STEPS, decode_gap, main

from fiddler.config import ModelConfig
from harness.scenarios import cells
from harness.simulate import PROFILES, SimulationSpec, load_profile, simulate

CONFIG = ModelConfig.preset("mixtral-8x7b").with_layers(2)
CALIBRATION = PROFILES / "h200-host.json"  # a profile is a calibration-schema file
BUDGET_GB = 3.0  # some of the two layers' experts resident, most not: both paths busy


def test_each_removed_term_speeds_decode_cumulatively():
    rows = decode_gap("h200-host", CALIBRATION, CONFIG, gpu_memory_gb=BUDGET_GB, samples=2, inputs=16, outputs=8)
    assert [r["step"] for r in rows] == [name for name, _, _ in STEPS]
    speeds = [r["decode_tokens_per_s"] for r in rows]
    assert all(later > earlier for earlier, later in itertools.pairwise(speeds)), speeds
    # step 3 removes exactly the per-layer overhead, on top of step 2 (the hand-off stays removed)
    _, hw = load_profile("h200-host")
    assert rows[1]["ms_per_layer"] - rows[2]["ms_per_layer"] == pytest.approx(1e3 * hw.step_overhead_per_layer_s)
    spec = SimulationSpec(
        systems=("fiddler-hybrid",),
        cells=tuple(cells("single-batch", inputs=(16,), outputs=(8,))),
        config=CONFIG,
        hardware="h200-host",
        gpu_memory_gb=BUDGET_GB,
        samples=2,
        calibration=str(CALIBRATION),
    )
    assert speeds[0] == pytest.approx(simulate(spec)[0]["decode_tokens_per_s"])
    assert len({r["bound_tokens_per_s"] for r in rows}) == 1
    for r in rows:
        assert r["share_of_bound"] == pytest.approx(r["decode_tokens_per_s"] / r["bound_tokens_per_s"])
        assert r["ms_per_layer"] == pytest.approx(1e3 / r["decode_tokens_per_s"] / CONFIG.num_layers)


def test_a_missing_calibration_or_profile_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--calibration", str(tmp_path / "none.json")])
    assert "give a run folder's calibration.json" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="neither a profile"):
        decode_gap(str(tmp_path / "no-profile.json"), CALIBRATION, CONFIG)


def test_the_table_names_its_command_and_hit_rate(tmp_path):
    out = tmp_path / "gap.md"
    args = ["--calibration", str(CALIBRATION), "--model", "mixtral-8x7b", "--samples", "2", "--out", str(out)]
    assert main(args) == 0
    text = out.read_text()
    assert "python experiments/decode_gap.py " + " ".join(args) in text and "GPU hit rate" in text
    assert text.count("\n| ") == len(STEPS) + 1  # the header and one row per step
