import pytest
import torch

from fiddler.config import ModelConfig
from fiddler.placement import expert_order, load_popularity, plan_placement
from fiddler.profiling import save_popularity

MIXTRAL = ModelConfig.preset("mixtral-8x7b")


@pytest.mark.parametrize(("budget", "expected"), [(24, 56), (48, 124)])
def test_mixtral_budgets_land_near_the_paper(budget, expected):
    placement = plan_placement(MIXTRAL, budget, torch.bfloat16, max_seq_len=256 + 512)
    assert placement.num_resident == expected
    b = placement.breakdown
    used = b.dense + b.kv_cache + b.staging + b.workspace + placement.num_resident * b.expert
    assert used <= b.budget < used + b.expert


def test_longer_sequences_and_beams_leave_fewer_experts():
    short = plan_placement(MIXTRAL, 24, torch.bfloat16, max_seq_len=512)
    long = plan_placement(MIXTRAL, 24, torch.bfloat16, max_seq_len=8192)
    beams = plan_placement(MIXTRAL, 24, torch.bfloat16, max_seq_len=512, beam_width=16)
    assert long.num_resident < short.num_resident and beams.num_resident < short.num_resident


def test_too_small_budget_says_what_is_needed():
    with pytest.raises(ValueError, match=r"cannot hold even the non-expert part .* needs 4\.\d\d GB"):
        plan_placement(MIXTRAL, 3, torch.bfloat16, max_seq_len=512)


def test_uniform_order_spreads_experts_over_layers():
    placement = plan_placement(MIXTRAL, 24, torch.bfloat16, max_seq_len=768)
    per_layer = [len(placement.resident_in_layer(layer)) for layer in range(MIXTRAL.num_layers)]
    assert max(per_layer) - min(per_layer) <= 1


def test_popularity_order_is_respected(tmp_path):
    cfg = ModelConfig.preset("mixtral-tiny")
    counts = [[1, 50, 3, 7], [40, 2, 60, 5]]
    order = expert_order(cfg, counts)
    assert order[:4] == [(1, 2), (0, 1), (1, 0), (0, 3)]
    path = tmp_path / "pop.json"
    save_popularity(counts, cfg.name, 3, path)
    placement = plan_placement(cfg, 1.0, torch.float32, 64, popularity=load_popularity(path))
    assert placement.order == "popularity"
    assert placement.expected_hit_rate(counts) == 1.0  # the tiny model fits entirely
    with pytest.raises(ValueError, match="another model shape"):
        expert_order(cfg, [[1, 2, 3]])
    with pytest.raises(FileNotFoundError, match="fiddler profile"):
        load_popularity(tmp_path / "missing.json")
