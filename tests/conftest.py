"""Shared fixtures: a tiny Mixtral checkpoint written by transformers' save_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fiddler.config import ModelConfig
from fiddler.hf_reference import build_transformers_model
from fiddler.weights import RandomWeights

PROMPT = [1, 22557, 1526, 28725, 910, 460, 368, 28804, 415, 5565]


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return ModelConfig.preset("mixtral-tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_config: ModelConfig) -> Path:
    """Seeded random weights saved by transformers (per-expert layout, single file)."""
    directory = tmp_path_factory.mktemp("tiny-ckpt")
    model = build_transformers_model(RandomWeights(tiny_config, seed=7), "cpu", torch.float32)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint: Path):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
