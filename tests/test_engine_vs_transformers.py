"""The engine against transformers' MixtralForCausalLM on the same tiny checkpoint."""

import pytest
import torch
from conftest import PROMPT

from fiddler.config import ModelConfig
from fiddler.engine import Engine
from fiddler.generate import GenerationSettings, generate
from fiddler.hf_reference import build_transformers_model
from fiddler.weights import CheckpointWeights, RandomWeights

FP32_TOL = 1e-4  # absolute, on logits of magnitude ~1: only summation order differs
BF16_TOL = 0.1  # bf16 carries ~3 significant digits through every layer
STRATEGIES = ["grouped", "loop"]


def engine_for(tiny_checkpoint, config, dtype=torch.float32, strategy="grouped", max_seq_len=256):
    return Engine.resident(CheckpointWeights(tiny_checkpoint, config), "cpu", dtype, max_seq_len, strategy)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_prefill_and_decode_logits_match(tiny_checkpoint, tiny_config, hf_model, strategy):
    engine = engine_for(tiny_checkpoint, tiny_config, strategy=strategy)
    continuation = [17, 900, 31000, 5, 2, 444]
    reference = hf_logits(hf_model, PROMPT + continuation)
    engine.begin(1, len(PROMPT) + len(continuation))
    logits = engine.prefill(torch.tensor(PROMPT))[0]
    assert (logits - reference[len(PROMPT) - 1]).abs().max() < FP32_TOL
    for i, token in enumerate(continuation):  # teacher-forced decode steps
        logits = engine.decode(torch.tensor([token]))[0]
        assert (logits - reference[len(PROMPT) + i]).abs().max() < FP32_TOL, f"decode step {i}"


def test_bf16_logits_close(tiny_checkpoint, tiny_config, hf_model):
    from transformers import MixtralForCausalLM

    hf16 = MixtralForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).eval()
    engine = engine_for(tiny_checkpoint, tiny_config, dtype=torch.bfloat16)
    engine.begin(1, len(PROMPT))
    logits = engine.prefill(torch.tensor(PROMPT))[0]
    reference = hf_logits(hf16, PROMPT)[-1]
    assert (logits - reference).abs().max() < BF16_TOL
    exact = hf_logits(hf_model, PROMPT)[-1]
    assert (logits - exact).abs().max() < BF16_TOL


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_greedy_tokens_identical(tiny_checkpoint, tiny_config, hf_model, strategy):
    engine = engine_for(tiny_checkpoint, tiny_config, strategy=strategy)
    new = 24
    ours = generate(engine, PROMPT, GenerationSettings(max_new_tokens=new)).token_ids
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([PROMPT]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert ours == ref[0, len(PROMPT) :].tolist()


@pytest.mark.parametrize("width", [2, 3, 4])
def test_beam_search_identical(tiny_checkpoint, tiny_config, hf_model, width):
    engine = engine_for(tiny_checkpoint, tiny_config)
    new = 12
    ours = generate(engine, PROMPT, GenerationSettings(max_new_tokens=new, beam_width=width))
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor([PROMPT]), max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=width
        )
    assert ours.token_ids == ref[0, len(PROMPT) :].tolist()
    assert len(ours.step_times_s) == new - 1


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_beam_search_with_eos_identical(tiny_checkpoint, tiny_config, hf_model, early_stopping):
    """Make a token the greedy run produces the EOS, so that hypotheses finish early."""
    engine = engine_for(tiny_checkpoint, tiny_config)
    greedy = generate(engine, PROMPT, GenerationSettings(max_new_tokens=8)).token_ids
    eos = greedy[3]
    from dataclasses import replace

    engine.config = replace(engine.config, eos_token_ids=(eos,))
    new, width = 16, 3
    ours = generate(
        engine,
        PROMPT,
        GenerationSettings(max_new_tokens=new, beam_width=width, ignore_eos=False, early_stopping=early_stopping),
    )
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor([PROMPT]),
            max_new_tokens=new,
            do_sample=False,
            num_beams=width,
            eos_token_id=eos,
            pad_token_id=eos,
            early_stopping=early_stopping,
        )
    expected = ref[0, len(PROMPT) :].tolist()
    assert ours.token_ids == expected


def test_greedy_stops_at_eos_when_asked(tiny_checkpoint, tiny_config):
    engine = engine_for(tiny_checkpoint, tiny_config)
    greedy = generate(engine, PROMPT, GenerationSettings(max_new_tokens=8)).token_ids
    from dataclasses import replace

    engine.config = replace(engine.config, eos_token_ids=(greedy[2],))
    stopped = generate(engine, PROMPT, GenerationSettings(max_new_tokens=8, ignore_eos=False)).token_ids
    assert stopped == greedy[: greedy.index(greedy[2]) + 1]
    forced = generate(engine, PROMPT, GenerationSettings(max_new_tokens=8)).token_ids
    assert len(forced) == 8 and greedy[2] not in forced


def test_sampling_is_seeded(tiny_checkpoint, tiny_config):
    engine = engine_for(tiny_checkpoint, tiny_config)
    hot = GenerationSettings(max_new_tokens=10, temperature=1.0, seed=5)
    a = generate(engine, PROMPT, hot).token_ids
    assert a == generate(engine, PROMPT, hot).token_ids
    from dataclasses import replace

    assert a != generate(engine, PROMPT, replace(hot, seed=6)).token_ids
    # top_p small enough keeps only the most likely token: sampling becomes greedy
    narrow = generate(engine, PROMPT, GenerationSettings(max_new_tokens=10, temperature=1.0, top_p=1e-6)).token_ids
    assert narrow == generate(engine, PROMPT, GenerationSettings(max_new_tokens=10)).token_ids


def test_sliding_window_matches_transformers():
    cfg = ModelConfig.from_dict({**ModelConfig.preset("mixtral-tiny").to_hf_dict(), "sliding_window": 4}, "sw")
    source = RandomWeights(cfg, seed=1)
    hf = build_transformers_model(source, "cpu", torch.float32, attn_implementation="eager")
    engine = Engine.resident(source, "cpu", torch.float32, max_seq_len=64)
    reference = hf_logits(hf, [*PROMPT, 5, 6, 7])
    engine.begin(1, len(PROMPT) + 3)
    assert (engine.prefill(torch.tensor(PROMPT))[0] - reference[len(PROMPT) - 1]).abs().max() < FP32_TOL
    for i, token in enumerate([5, 6]):
        logits = engine.decode(torch.tensor([token]))[0]
        assert (logits - reference[len(PROMPT) + i]).abs().max() < FP32_TOL


def test_truncated_model_matches_transformers_truncated(tiny_checkpoint, tiny_config):
    one_layer = tiny_config.with_layers(1)
    engine = engine_for(tiny_checkpoint, one_layer)
    hf = build_transformers_model(CheckpointWeights(tiny_checkpoint, one_layer), "cpu", torch.float32)
    engine.begin(1, len(PROMPT))
    logits = engine.prefill(torch.tensor(PROMPT))[0]
    assert (logits - hf_logits(hf, PROMPT)[-1]).abs().max() < FP32_TOL


def test_prompt_longer_than_context_is_refused(tiny_checkpoint, tiny_config):
    engine = engine_for(tiny_checkpoint, tiny_config, max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds this model's context of 16 tokens"):
        generate(engine, PROMPT, GenerationSettings(max_new_tokens=10))


def test_bad_prompt_ids_are_refused(tiny_checkpoint, tiny_config):
    engine = engine_for(tiny_checkpoint, tiny_config)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(engine, [1, 40000], GenerationSettings(max_new_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        generate(engine, [], GenerationSettings(max_new_tokens=2))
