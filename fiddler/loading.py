"""Assemble the model's tensors from a ``WeightSource``, each written straight into the buffer
where it will live (no intermediate copy of the model).

Contract: ``load_dense`` gives the non-expert weights on one device, with q/k/v fused;
``load_expert_stack`` gives one layer's experts stacked as w13 [X, 2F, D] (w1 rows, then w3
rows) and w2 [X, D, F]; ``load_expert_into`` fills one expert's w13 / w2 buffers wherever
they are (GPU, pinned host memory); ``load_host_weights`` puts every expert, in the split
layout of ``fiddler.expert_layout`` (and optionally every dense tensor), into one page-locked
``HostArena``.
"""

from __future__ import annotations

import dataclasses

import torch

from fiddler.config import ModelConfig
from fiddler.expert_layout import split_blocks, split_shapes, to_split_layout
from fiddler.host_memory import HostArena, nbytes_of
from fiddler.model import DenseWeights, LayerWeights
from fiddler.weights import (
    EMBED,
    FINAL_NORM,
    LM_HEAD,
    WeightSource,
    dense_layer_names,
    expert_name,
    load,
    tensor_shapes,
)


def load_dense(source: WeightSource, device: torch.device | str, dtype: torch.dtype) -> DenseWeights:
    cfg = source.config
    layers = []
    for layer in range(cfg.num_layers):
        names = dense_layer_names(layer)
        wqkv = torch.empty(cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size, device=device, dtype=dtype)
        q, k, v = wqkv.split((cfg.q_size, cfg.kv_size, cfg.kv_size))
        for part, role in ((q, "wq"), (k, "wk"), (v, "wv")):
            source.load_into(names[role], part)
        layers.append(
            LayerWeights(
                attn_norm=load(source, names["attn_norm"], device, dtype),
                wqkv=wqkv,
                wo=load(source, names["wo"], device, dtype),
                moe_norm=load(source, names["moe_norm"], device, dtype),
                router=load(source, names["router"], device, dtype),
            )
        )
    embed = load(source, EMBED, device, dtype)
    lm_head = embed if cfg.tie_word_embeddings else load(source, LM_HEAD, device, dtype)
    return DenseWeights(embed=embed, layers=layers, norm=load(source, FINAL_NORM, device, dtype), lm_head=lm_head)


def load_expert_into(source: WeightSource, layer: int, expert: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
    w1, w3 = w13.chunk(2, dim=0)
    source.load_into(expert_name(layer, expert, "w1"), w1)
    source.load_into(expert_name(layer, expert, "w3"), w3)
    source.load_into(expert_name(layer, expert, "w2"), w2)


def expert_shapes(config: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(w13 shape, w2 shape) of one expert."""
    return (2 * config.intermediate_size, config.hidden_size), (config.hidden_size, config.intermediate_size)


def load_expert_stack(
    source: WeightSource, layer: int, device: torch.device | str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = source.config
    w13_shape, w2_shape = expert_shapes(cfg)
    w13 = torch.empty(cfg.num_experts, *w13_shape, device=device, dtype=dtype)
    w2 = torch.empty(cfg.num_experts, *w2_shape, device=device, dtype=dtype)
    for expert in range(cfg.num_experts):
        load_expert_into(source, layer, expert, w13[expert], w2[expert])
    return w13, w2


@dataclasses.dataclass
class HostWeights:
    arena: HostArena
    experts: list[list[tuple[torch.Tensor, torch.Tensor]]]  # [layer][expert] -> (w13b, w2b), split layout
    dense: dict[str, torch.Tensor]  # checkpoint name -> tensor (empty unless asked for)
    blocks: int  # split-layout blocks per expert

    def close(self) -> None:
        self.experts, self.dense = [], {}
        self.arena.close()


def load_host_weights(
    source: WeightSource, dtype: torch.dtype, pin: bool = True, include_dense: bool = False
) -> HostWeights:
    """Every expert (split layout; w13b and w2b of one expert adjacent) and, if asked, every
    dense tensor, in one host arena, page-locked when CUDA is present. Experts are assembled
    where the source produces them (the GPU for GPU-generated random weights) and rearranged
    there, so only finished tensors cross to the host."""
    cfg = source.config
    blocks = split_blocks(cfg)
    w13_shape, w2_shape = split_shapes(cfg)
    work_device = getattr(source, "generator_device", "cpu")
    plain13, plain2 = (torch.empty(s, dtype=dtype, device=work_device) for s in expert_shapes(cfg))
    dense_shapes = {n: s for n, s in tensor_shapes(cfg).items() if ".experts." not in n} if include_dense else {}
    sizes = [nbytes_of(s, dtype) for s in dense_shapes.values()]
    sizes += [nbytes_of(s, dtype) for _ in range(cfg.num_expert_slots) for s in (w13_shape, w2_shape)]
    arena = HostArena(sizes, pin=pin)
    dense = {}
    for name, shape in dense_shapes.items():
        dense[name] = arena.take(shape, dtype)
        source.load_into(name, dense[name])
    experts = []
    for layer in range(cfg.num_layers):
        row = []
        for expert in range(cfg.num_experts):
            w13b, w2b = arena.take(w13_shape, dtype), arena.take(w2_shape, dtype)
            load_expert_into(source, layer, expert, plain13, plain2)
            to_split_layout(plain13, plain2, blocks, w13b, w2b)
            row.append((w13b, w2b))
        experts.append(row)
    if torch.device(work_device).type == "cuda":
        torch.cuda.synchronize()  # the last copies into the arena are asynchronous
    return HostWeights(arena=arena, experts=experts, dense=dense, blocks=blocks)
