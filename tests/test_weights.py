import json
import subprocess
import sys

import pytest
import torch

from fiddler.config import ModelConfig
from fiddler.weights import CheckpointWeights, RandomWeights, expert_name, load, tensor_shapes

NAMES = ["model.embed_tokens.weight", "model.layers.1.block_sparse_moe.experts.3.w2.weight", "model.norm.weight"]

_CHILD = """
import sys, torch
from fiddler.config import ModelConfig
from fiddler.weights import RandomWeights, load
src = RandomWeights(ModelConfig.preset("mixtral-tiny"), seed=int(sys.argv[1]))
for name in sys.argv[2:]:
    t = load(src, name, "cpu", torch.float32)
    print(float(t.double().sum()), float(t.double().pow(2).sum()))
"""


def _child_digest(seed: int, names: list[str]) -> str:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(seed), *names], capture_output=True, text=True, check=True)
    return out.stdout


def test_random_weights_are_identical_across_processes_and_orders():
    assert _child_digest(3, NAMES) == _child_digest(3, NAMES)
    # per-name seeds: the order of requests does not matter
    first = _child_digest(3, NAMES).splitlines()
    reversed_order = _child_digest(3, NAMES[::-1]).splitlines()[::-1]
    assert first == reversed_order
    assert _child_digest(3, NAMES) != _child_digest(4, NAMES)


def test_random_weights_statistics(tiny_config):
    src = RandomWeights(tiny_config, seed=0)
    w = load(src, expert_name(0, 1, "w1"), "cpu", torch.float32)
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(load(src, "model.norm.weight", "cpu", torch.float32), torch.ones(tiny_config.hidden_size))
    other = load(src, expert_name(0, 2, "w1"), "cpu", torch.float32)
    assert not torch.equal(w, other)
    # bf16 weights are the rounded float32 ones: one model in every dtype
    assert torch.equal(load(src, expert_name(0, 1, "w1"), "cpu", torch.bfloat16), w.to(torch.bfloat16))


def test_checkpoint_matches_the_weights_it_was_saved_from(tiny_checkpoint, tiny_config):
    ckpt = CheckpointWeights(tiny_checkpoint, tiny_config)
    rand = RandomWeights(tiny_config, seed=7)
    for name in tensor_shapes(tiny_config):
        assert torch.equal(load(ckpt, name, "cpu", torch.float32), load(rand, name, "cpu", torch.float32)), name


def test_sharded_checkpoint(tmp_path, tiny_config, hf_model):
    hf_model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ckpt = CheckpointWeights(tmp_path, tiny_config)
    rand = RandomWeights(tiny_config, seed=7)
    name = expert_name(1, 2, "w3")
    assert torch.equal(load(ckpt, name, "cpu", torch.float32), load(rand, name, "cpu", torch.float32))


def test_missing_directory(tmp_path, tiny_config):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CheckpointWeights(tmp_path / "absent", tiny_config)
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors"):
        CheckpointWeights(tmp_path, tiny_config)


def _copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_file(tmp_path, tiny_checkpoint, tiny_config):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        CheckpointWeights(ckpt, tiny_config)


def test_corrupt_header(tmp_path, tiny_checkpoint, tiny_config):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage-garbage!" + b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        CheckpointWeights(ckpt, tiny_config)


def test_missing_tensors_and_wrong_config(tmp_path, tiny_checkpoint, tiny_config):
    bigger = ModelConfig.from_dict(
        {**json.loads((tiny_checkpoint / "config.json").read_text()), "num_local_experts": 6}, "bigger"
    )
    with pytest.raises(ValueError, match=r"lacks \d+ tensors"):
        CheckpointWeights(tiny_checkpoint, bigger)
    wider = ModelConfig.from_dict(
        {**json.loads((tiny_checkpoint / "config.json").read_text()), "intermediate_size": 256}, "wider"
    )
    ckpt = CheckpointWeights(tiny_checkpoint, wider)
    with pytest.raises(ValueError, match="has shape"):
        load(ckpt, expert_name(0, 0, "w1"), "cpu", torch.float32)
