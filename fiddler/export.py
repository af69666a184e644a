"""Write a model as a Hugging Face checkpoint directory (what other tools read).

Contract: ``export_checkpoint(source, directory, dtype)`` writes ``config.json`` (transformers 5
spelling), the weights as safetensors in the per-expert checkpoint layout
(``model.layers.{i}.block_sparse_moe.experts.{j}.w1/w2/w3.weight``), one shard per decoder
layer plus one for the rest, ``model.safetensors.index.json``, and the tokenizer file when
one is given. Tensors are produced and written shard by shard, so memory holds one layer at a
time. Files are written beside their final names and renamed when complete, the directory is
complete when ``config.json`` (written last) exists. The result loads with
``fiddler.weights.CheckpointWeights`` and transformers' ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from fiddler.files import write_json_atomic
from fiddler.weights import INDEX_FILE, WeightSource, layer_prefix, load, tensor_shapes


def _shards(names: list[str], num_layers: int) -> list[tuple[str, list[str]]]:
    by_layer: list[list[str]] = [[] for _ in range(num_layers)]
    rest = []
    for name in names:
        for layer in range(num_layers):
            if name.startswith(layer_prefix(layer)):
                by_layer[layer].append(name)
                break
        else:
            rest.append(name)
    total = num_layers + 1
    shards = [(f"model-{i + 1:05d}-of-{total:05d}.safetensors", group) for i, group in enumerate(by_layer)]
    return [*shards, (f"model-{total:05d}-of-{total:05d}.safetensors", rest)]


def export_checkpoint(
    source: WeightSource, directory: str | Path, dtype: torch.dtype, tokenizer_file: Path | None = None
) -> Path:
    cfg = source.config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").unlink(missing_ok=True)  # incomplete until written again, last
    names = list(tensor_shapes(cfg))
    weight_map = {}
    for file_name, group in _shards(names, cfg.num_layers):
        tensors = {name: load(source, name, "cpu", dtype) for name in group}
        tmp = directory / f".{file_name}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / file_name)
        weight_map.update(dict.fromkeys(group, file_name))
    write_json_atomic(directory / INDEX_FILE, {"metadata": {}, "weight_map": weight_map})
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, directory / "tokenizer.model")
    config = cfg.to_hf_dict() | {"dtype": str(dtype).removeprefix("torch.")}
    write_json_atomic(directory / "config.json", config)
    return directory


def checkpoint_is_complete(directory: Path) -> bool:
    return (directory / "config.json").exists() and (directory / INDEX_FILE).exists()


def read_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())
