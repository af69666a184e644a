"""Weights by checkpoint name: a local safetensors checkpoint or seeded random tensors.

Contract:
- Names and shapes follow the Mixtral checkpoint layout (``tensor_shapes``), with experts
  stored one by one as ``model.layers.{i}.block_sparse_moe.experts.{j}.w1/w2/w3.weight``
  (the real checkpoint and transformers 5's ``save_pretrained`` both write this).
- A ``WeightSource`` copies one named tensor into a caller's buffer (``load_into``), converting
  dtype and device on the way, so each tensor goes straight to where it will live and nothing
  is held twice. Loading is lazy: nothing is read before it is asked for.
- ``RandomWeights`` derives a generator seed from (seed, tensor name), so any process gets
  bit-identical tensors for the same seed and generator device type, in any order. Values are
  drawn in float32 and then cast (the same seed gives the same model in every dtype):
  matrices ~ N(0, std), norm weights = 1. CPU and CUDA generators differ: record the device.
- ``CheckpointWeights`` reads ``model.safetensors`` or a sharded set with
  ``model.safetensors.index.json``; every problem (missing directory, corrupt or truncated
  file, missing tensor, wrong shape) raises one ``ValueError`` / ``FileNotFoundError`` naming
  the file and what to change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from fiddler.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EXPERT_MATRICES = ("w1", "w2", "w3")  # w1: gate, w3: up (both [F, D]); w2: down ([D, F])


# ---- names ------------------------------------------------------------------------------


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def expert_name(layer: int, expert: int, matrix: str) -> str:
    return f"{layer_prefix(layer)}block_sparse_moe.experts.{expert}.{matrix}.weight"


def dense_layer_names(layer: int) -> dict[str, str]:
    """Role -> checkpoint name for one layer's non-expert tensors."""
    p = layer_prefix(layer)
    return {
        "attn_norm": f"{p}input_layernorm.weight",
        "wq": f"{p}self_attn.q_proj.weight",
        "wk": f"{p}self_attn.k_proj.weight",
        "wv": f"{p}self_attn.v_proj.weight",
        "wo": f"{p}self_attn.o_proj.weight",
        "moe_norm": f"{p}post_attention_layernorm.weight",
        "router": f"{p}block_sparse_moe.gate.weight",
    }


EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, by name, with its shape."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {EMBED: (v, d), FINAL_NORM: (d,)}
    if not config.tie_word_embeddings:
        shapes[LM_HEAD] = (v, d)
    for layer in range(config.num_layers):
        names = dense_layer_names(layer)
        shapes[names["attn_norm"]] = (d,)
        shapes[names["moe_norm"]] = (d,)
        shapes[names["wq"]] = (config.q_size, d)
        shapes[names["wk"]] = (config.kv_size, d)
        shapes[names["wv"]] = (config.kv_size, d)
        shapes[names["wo"]] = (d, config.q_size)
        shapes[names["router"]] = (config.num_experts, d)
        for expert in range(config.num_experts):
            shapes[expert_name(layer, expert, "w1")] = (f, d)
            shapes[expert_name(layer, expert, "w3")] = (f, d)
            shapes[expert_name(layer, expert, "w2")] = (d, f)
    return shapes


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


# ---- sources ----------------------------------------------------------------------------


class WeightSource(Protocol):
    config: ModelConfig

    def load_into(self, name: str, out: torch.Tensor) -> None:
        """Copy tensor ``name`` into ``out`` (any device and dtype; shape must match)."""
        ...

    def describe(self) -> dict[str, object]:
        """What these weights are, for run records."""
        ...


def load(source: WeightSource, name: str, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """A fresh tensor holding ``name``, allocated on ``device``."""
    out = torch.empty(tensor_shapes(source.config)[name], device=device, dtype=dtype)
    source.load_into(name, out)
    return out


def name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, name): stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RandomWeights:
    """Seeded random weights, generated per tensor on ``generator_device``."""

    def __init__(self, config: ModelConfig, seed: int = 0, generator_device: str = "cpu", std: float = 0.02):
        self.config = config
        self.seed = seed
        self.generator_device = torch.device(generator_device).type
        self.std = std
        self._shapes = tensor_shapes(config)

    def load_into(self, name: str, out: torch.Tensor) -> None:
        shape = self._shapes.get(name)
        if shape is None:
            raise KeyError(f"no tensor {name!r} in a {self.config.name} model")
        if tuple(out.shape) != shape:
            raise ValueError(f"{name}: buffer shape {tuple(out.shape)} != {shape}")
        if is_norm(name):
            out.fill_(1.0)
            return
        generator = torch.Generator(device=self.generator_device).manual_seed(name_seed(self.seed, name))
        values = torch.empty(shape, dtype=torch.float32, device=self.generator_device)
        values.normal_(0.0, self.std, generator=generator)
        if out.device.type != values.device.type:
            # Cast where the values are (the GPU when generating there), then one copy across.
            values = values.to(out.dtype)
        out.copy_(values, non_blocking=out.device.type == "cpu" and out.is_pinned())

    def describe(self) -> dict[str, object]:
        return {
            "kind": "random",
            "seed": self.seed,
            "generator_device": self.generator_device,
            "distribution": f"normal(0, {self.std}); norm weights = 1",
        }


class CheckpointWeights:
    """A local Hugging Face checkpoint directory (safetensors), read lazily tensor by tensor."""

    def __init__(self, directory: str | Path, config: ModelConfig):
        self.directory = Path(directory)
        self.config = config
        self._handles: dict[Path, object] = {}
        self._file_of = self._index()
        self._check_names()

    def _index(self) -> dict[str, Path]:
        if not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        index = self.directory / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index} is not a safetensors index ({err!r}); re-save the checkpoint") from None
            return {name: self.directory / file for name, file in weight_map.items()}
        single = self.directory / SINGLE_FILE
        if single.exists():
            return {name: single for name in self._open(single).keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
        raise FileNotFoundError(
            f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; "
            "give a directory written by save_pretrained (safetensors)"
        )

    def _open(self, path: Path):  # -> safetensors handle
        handle = self._handles.get(path)
        if handle is None:
            if not path.exists():
                raise FileNotFoundError(f"checkpoint file {path} is missing (named in {INDEX_FILE})")
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as err:
                raise ValueError(
                    f"cannot read {path}: {err}. The file is corrupt or truncated; download or save it again"
                ) from None
            self._handles[path] = handle
        return handle

    def _check_names(self) -> None:
        expected = tensor_shapes(self.config)
        missing = [name for name in expected if name not in self._file_of]
        if missing:
            fused = any(".mlp.experts." in name for name in self._file_of)
            hint = (
                " (the file stores fused in-memory expert tensors; re-save it in the per-expert layout)"
                if fused
                else ""
            )
            raise ValueError(
                f"checkpoint {self.directory} lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}{hint}"
            )

    def load_into(self, name: str, out: torch.Tensor) -> None:
        path = self._file_of[name]
        try:
            tensor = self._open(path).get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read tensor {name} from {path}: {err}; the file is corrupt") from None
        expected = tensor_shapes(self.config)[name]
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)} but config.json implies {expected}"
            )
        out.copy_(tensor)

    def describe(self) -> dict[str, object]:
        return {"kind": "checkpoint", "directory": str(self.directory.resolve())}

    def files(self) -> Iterator[Path]:
        yield from sorted(set(self._file_of.values()))


def open_weights(config: ModelConfig, checkpoint: Path | None, seed: int, generator_device: str) -> WeightSource:
    """The checkpoint when there is one, else seeded random weights."""
    if checkpoint is not None:
        return CheckpointWeights(checkpoint, config)
    return RandomWeights(config, seed=seed, generator_device=generator_device)
