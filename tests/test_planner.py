import json
import random
from pathlib import Path

import pytest

from fiddler.cost_model import LatencyModel
from fiddler.planner import POLICIES, Split, _balanced_blocks, layer_timeline, plan_layer, predict_layer

# A latency model shaped like the GPU host's (DESIGN.md): a CPU expert costs about a copy.
HOST_LIKE = LatencyModel(
    token_counts=[1, 16, 64, 128, 512],
    cpu_expert_s=[7.5e-3, 7.2e-3, 9.8e-3, 15.6e-3, 50e-3],
    gpu_expert_s=[1.2e-4, 1.3e-4, 1.4e-4, 1.4e-4, 3.1e-4],
    act_d2h_s=[2e-5] * 5,
    act_h2d_s=[2e-5] * 5,
    copy=6.4e-3,
    cpu_slowdown=1.3,
    copy_slowdown=1.0,
)
# ... and like the paper's hosts: copies far slower than CPU experts.
PAPER_LIKE = LatencyModel([1, 512], [6e-3, 3.0], [1e-3, 4e-3], [1e-4, 1e-3], [1e-4, 1e-3], 50e-3, 1.0, 1.0)


def test_interpolation():
    assert HOST_LIKE.cpu(1) == 7.5e-3 and HOST_LIKE.cpu(0) == 7.5e-3
    assert HOST_LIKE.cpu(32) == pytest.approx(7.2e-3 + (9.8e-3 - 7.2e-3) * 16 / 48)
    assert HOST_LIKE.cpu(1024) == pytest.approx(50e-3 + (50e-3 - 15.6e-3) * 512 / 384)


def test_paper_policy_runs_decode_on_cpu_and_long_prefill_by_copy():
    decode = plan_layer({0: 1, 3: 1}, {1}, "paper", PAPER_LIKE, 2)
    assert decode.cpu == (0, 3) and decode.copy == ()
    prefill = plan_layer({0: 512, 3: 1}, {1}, "paper", PAPER_LIKE, 2)
    assert prefill.copy == (0,) and prefill.cpu == (3,)


def test_resident_experts_stay_on_the_gpu():
    for policy in POLICIES:
        plan = plan_layer({1: 4, 2: 1, 5: 9}, {1, 5}, policy, HOST_LIKE, 2)
        assert plan.gpu == (1, 5) and set(plan.cpu) | set(plan.copy) == {2}


def test_hybrid_uses_both_paths_when_that_finishes_first():
    plan = plan_layer({e: 1 for e in range(6)}, set(), "hybrid", HOST_LIKE, 2)
    assert plan.cpu and plan.copy
    alone = [plan_layer({e: 1 for e in range(6)}, set(), p, HOST_LIKE, 2) for p in ("cpu-experts", "copy-experts")]
    assert plan.predicted_s < min(a.predicted_s for a in alone)


def test_hybrid_is_never_predicted_slower_than_the_other_policies():
    rng = random.Random(0)
    for _ in range(200):
        tokens = {e: rng.choice([1, 1, 2, 5, 40, 300]) for e in rng.sample(range(8), rng.randint(1, 8))}
        resident = set(rng.sample(range(8), rng.randint(0, 4)))
        for model in (HOST_LIKE, PAPER_LIKE):
            hybrid = plan_layer(tokens, resident, "hybrid", model, 2).predicted_s
            for policy in ("cpu-experts", "copy-experts"):
                assert hybrid <= plan_layer(tokens, resident, policy, model, 2).predicted_s + 1e-12


def test_staging_slots_bound_the_copy_pipeline():
    tokens = {e: 512 for e in range(4)}
    # With one slot each copy waits for the previous expert's compute; with more it does not.
    one = predict_layer(tokens, (), (), (0, 1, 2, 3), PAPER_LIKE, 1)
    many = predict_layer(tokens, (), (), (0, 1, 2, 3), PAPER_LIKE, 4)
    assert one == pytest.approx(4 * (50e-3 + 4e-3))
    assert many == pytest.approx(4 * 50e-3 + 4e-3)


def test_the_cpu_path_waits_for_the_hidden_rows_sent_down():
    """The executor sends a pass's every hidden row down before planning: a CPU path that
    computes a few rows of a long pass starts only once all of them have landed."""
    model = LatencyModel([1, 512], [6e-3, 3.0], [1e-3, 4e-3], [1e-5, 1e-3], [1e-5, 1e-3], 50e-3, 1.0, 1.0)
    tokens = {0: 1, 1: 511}
    own = predict_layer(tokens, (), (0,), (1,), model, 2)
    same = predict_layer(tokens, (), (0,), (1,), model, 2, hidden_rows=1)
    whole = predict_layer(tokens, (), (0,), (1,), model, 2, hidden_rows=512)
    assert own == same
    cpu_alone = predict_layer(tokens, (), (0,), (), model, 2, hidden_rows=512)
    assert cpu_alone == pytest.approx(1e-3 + 6e-3 + 1e-5)
    assert whole >= own
    plan = plan_layer(tokens, set(), "hybrid", model, 2, hidden_rows=512)
    assert plan.predicted_s == predict_layer(tokens, (), plan.cpu, plan.copy, model, 2, plan.split, 512)


def test_bad_policy_and_slots():
    with pytest.raises(ValueError, match="unknown policy"):
        plan_layer({0: 1}, set(), "fastest", HOST_LIKE, 2)
    with pytest.raises(ValueError, match="staging slot"):
        plan_layer({0: 1}, set(), "hybrid", HOST_LIKE, 0)


def test_share_curve_and_cpu_factor():
    import dataclasses

    curved = dataclasses.replace(HOST_LIKE, cpu_shares=(0.0, 0.0625, 0.5, 1.0), cpu_share_cost=(0.0, 0.16, 0.44, 1.0))
    assert curved.cpu_part(1, 0.0625) == pytest.approx(0.16 * 7.5e-3)
    assert curved.cpu_part(1, 0.25) == pytest.approx(7.5e-3 * (0.16 + (0.44 - 0.16) * (0.25 - 0.0625) / 0.4375))
    assert HOST_LIKE.cpu_part(1, 0.25) == pytest.approx(0.25 * 7.5e-3)  # no curve: proportional
    slower = HOST_LIKE.with_cpu_factor(2.0)
    assert slower.cpu(16) == pytest.approx(2 * HOST_LIKE.cpu(16)) and slower.copy == HOST_LIKE.copy
    # A slower CPU gets a smaller share of a divided expert.
    fast = plan_layer({0: 1}, set(), "hybrid", HOST_LIKE, 2, 16).split
    slow = plan_layer({0: 1}, set(), "hybrid", slower, 2, 16).split
    assert fast is not None and slow is not None and slow.cpu_blocks < fast.cpu_blocks


def _every_division(tokens, resident, model, slots, blocks, hidden_rows):
    """Hybrid's search before it was narrowed: every whole division, and a division of every
    missing expert at the block counts around its balance point."""
    gpu = tuple(sorted(e for e in tokens if e in resident))
    missing = sorted((e for e in tokens if e not in resident), key=lambda e: (tokens[e], e))

    def predicted(cpu, copy, split=None):
        copy_order = tuple(sorted(copy, key=lambda e: (-tokens[e], e)))
        return predict_layer(tokens, gpu, tuple(sorted(cpu)), copy_order, model, slots, split, hidden_rows)

    times = [predicted(missing[:k], missing[k:]) for k in range(len(missing) + 1)]
    for k in range(len(missing) if blocks > 1 else 0):
        for b in _balanced_blocks(tokens, missing[:k], missing[k], missing[k + 1 :], model, blocks):
            times.append(predicted(missing[:k], missing[k + 1 :], Split(missing[k], b, blocks)))
    return min(times)


def test_hybrids_narrowed_search_finds_what_trying_every_division_finds():
    """Hybrid tries dividing only the experts beside its best whole division (the planner runs
    on the CPU path's critical path); on every measured calibration and the models above, with
    corrections, slot counts and routings of decode, beam steps and prefills, it finds plans as
    fast as trying every expert."""
    models = [HOST_LIKE, PAPER_LIKE]
    for path in sorted(Path(__file__).resolve().parent.parent.glob("results/*/calibration.json")):
        models.append(LatencyModel.from_calibration(json.loads(path.read_text())))
    rng = random.Random(1)
    for case in range(3000):
        model = rng.choice(models).with_cpu_factor(rng.choice([0.7, 1.0, 1.4]), rng.choice([None, 1.0, 1.5]))
        model = model.with_path_offsets(rng.choice([0.0, 3e-4, -2e-4]), rng.choice([0.0, 7e-4, -3e-4]))
        rows = rng.choice([1, 1, 4, 8, 16, 32, 128, 1024])
        tokens: dict[int, int] = {}
        for _ in range(rows):
            for e in rng.sample(range(8), 2):
                tokens[e] = tokens.get(e, 0) + 1
        resident = set(rng.sample(range(8), rng.randint(0, 3)))
        slots, blocks = rng.choice([1, 2, 4]), rng.choice([1, 4, 16])
        hidden_rows = rng.choice([None, rows])
        plan = plan_layer(tokens, resident, "hybrid", model, slots, blocks, hidden_rows)
        best = _every_division(tokens, resident, model, slots, blocks, hidden_rows)
        assert plan.predicted_s <= best * (1 + 1e-12), (case, tokens, resident, slots, blocks)


def test_path_offsets_move_each_path_and_the_division_follows():
    """A decode layer like the GPU host's (one expert on the CPU, one divided): an offset moves
    its path's end by itself; copies measured late move blocks of the divided expert to the CPU,
    a CPU measured late moves them to the copies, and the plan's path ends are its timeline's."""
    tokens, blocks = {2: 1, 5: 1}, 32
    base = plan_layer(tokens, set(), "hybrid", HOST_LIKE, 2, blocks)
    assert base.split is not None and base.cpu_done_s > 0 and base.copies_landed_s > 0
    args = (tokens, (), base.cpu, base.copy, HOST_LIKE, 2, base.split)
    plain = layer_timeline(*args)
    moved = layer_timeline(*args[:4], HOST_LIKE.with_path_offsets(2e-4, 5e-4), *args[5:])
    assert (plain.cpu_done_s, plain.copies_landed_s) == (base.cpu_done_s, base.copies_landed_s)
    assert moved.cpu_done_s == pytest.approx(plain.cpu_done_s + 2e-4)
    assert moved.copies_landed_s == pytest.approx(plain.copies_landed_s + 5e-4)
    assert predict_layer(*args) == plain.end_s == base.predicted_s
    early = layer_timeline(*args[:4], HOST_LIKE.with_path_offsets(-2e-4, -5e-4), *args[5:])
    assert early.cpu_done_s == pytest.approx(plain.cpu_done_s - 2e-4)
    assert early.copies_landed_s == pytest.approx(plain.copies_landed_s - 5e-4)  # copies faster than modelled
    late_copies = plan_layer(tokens, set(), "hybrid", HOST_LIKE.with_path_offsets(0.0, 1e-3), 2, blocks)
    late_cpu = plan_layer(tokens, set(), "hybrid", HOST_LIKE.with_path_offsets(1e-3, 0.0), 2, blocks)
    early_copies = plan_layer(tokens, set(), "hybrid", HOST_LIKE.with_path_offsets(0.0, -1e-3), 2, blocks)
    assert late_copies.split.cpu_blocks > base.split.cpu_blocks > late_cpu.split.cpu_blocks
    assert early_copies.split.cpu_blocks < base.split.cpu_blocks
    # balanced again, and as fast as trying every block count of the divided expert
    for plan, offsets in ((late_copies, (0.0, 1e-3)), (late_cpu, (1e-3, 0.0)), (early_copies, (0.0, -1e-3))):
        model = HOST_LIKE.with_path_offsets(*offsets)
        block = HOST_LIKE.copy / blocks
        assert abs(plan.cpu_done_s - plan.copies_landed_s) < 2 * block, (plan, offsets)
        every = [
            predict_layer(tokens, (), plan.cpu, plan.copy, model, 2, Split(plan.split.expert, b, blocks))
            for b in range(1, blocks)
        ]
        assert plan.predicted_s <= min(every) * (1 + 1e-12), offsets
