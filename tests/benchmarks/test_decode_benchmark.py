"""pytest-benchmark: every system's decode on a small model on the CPU (`cpu` stands in for the
GPU; budgets force offloading). Decode tokens/s goes into ``extra_info``; ``make bench`` saves
the JSON under results/benchmarks/. Speed targets belong here, not in unit tests: these
numbers describe the CPU they ran on and are not asserted."""

import pytest
import torch

from baselines import SYSTEMS, SystemOptions, load_system
from fiddler.config import ModelConfig
from fiddler.generate import GenerationSettings
from harness.prompts import random_prompts
from harness.reproduce import cpu_budget_gb

CONFIG = ModelConfig.preset("mixtral-tiny")
PROMPT = random_prompts(CONFIG.vocab_size, 16, 1, seed=0)[0]
SETTINGS = GenerationSettings(max_new_tokens=16)
# Systems that hold whole models or whole layers: a budget that keeps a fifth of the experts
# refuses them, so they run unlimited here.
UNBUDGETED = ("gpu-resident", "transformers-resident", "layer-streaming")


@pytest.mark.parametrize("name", sorted(set(SYSTEMS) - {"llama-cpp", "llama-cpp-cpu-moe"}))
def test_decode(benchmark, name):
    options = SystemOptions(
        config=CONFIG,
        max_seq_len=64,
        device="cpu",
        dtype=torch.float32,
        gpu_memory_gb=None if name in UNBUDGETED else cpu_budget_gb(CONFIG, 64),
    )
    system = load_system(name, options)
    system.generate(PROMPT, SETTINGS)  # warm-up
    result = benchmark.pedantic(system.generate, args=(PROMPT, SETTINGS), rounds=3, iterations=1)
    benchmark.extra_info.update(
        decode_tokens_per_s=result.decode_tokens_per_s,
        ttft_s=result.ttft_s,
        model=CONFIG.name,
        device="cpu",
        gpu_memory_gb=options.gpu_memory_gb,
    )
    assert len(result.token_ids) == SETTINGS.max_new_tokens
    system.close()
