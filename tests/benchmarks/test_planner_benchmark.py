"""pytest-benchmark: how long the planner takes for a routing it has not seen (the executor
plans on the CPU path's critical path: a decode layer's plans repeat and are cached, a prefill
layer's and a beam step's rarely). Full-size Mixtral-8x7B latencies from a calibration the GPU
host measured; milliseconds per plan go into ``extra_info``, not asserted (they describe the
CPU they ran on)."""

import json
from pathlib import Path

import pytest

from fiddler.cost_model import LatencyModel
from fiddler.planner import plan_layer

CALIBRATION = Path(__file__).resolve().parents[2] / "results" / "h200-long-prefill-24gb" / "calibration.json"
STAGING_SLOTS = 4
# one layer's routing (expert -> tokens), the experts resident there, and the rows sent down
ROUTINGS = {
    "decode": ({3: 1, 5: 1}, frozenset(), 1),
    "beam-width-4": ({0: 1, 1: 2, 2: 1, 3: 2, 4: 1, 6: 1}, frozenset({5}), 4),
    "beam-width-16": ({0: 3, 1: 4, 2: 5, 3: 4, 4: 3, 5: 5, 6: 4, 7: 4}, frozenset({0, 1}), 16),
    "prefill-32-tokens": ({0: 7, 1: 9, 2: 8, 3: 6, 4: 10, 5: 8, 6: 9, 7: 7}, frozenset({2}), 32),
}


@pytest.mark.parametrize("policy", ["hybrid", "paper"])
@pytest.mark.parametrize("routing", sorted(ROUTINGS))
def test_plan_a_new_routing(benchmark, routing, policy):
    calibration = json.loads(CALIBRATION.read_text())
    tokens, resident, rows = ROUTINGS[routing]

    def plan() -> None:  # a fresh model each time: nothing interpolated yet, as for a new run
        model = LatencyModel.from_calibration(calibration)
        plan_layer(tokens, resident, policy, model, STAGING_SLOTS, calibration["split_blocks"], rows)

    benchmark.pedantic(plan, rounds=50, iterations=1, warmup_rounds=5)
    benchmark.extra_info.update(ms_per_plan=benchmark.stats.stats.median * 1e3, routing=routing, policy=policy)
