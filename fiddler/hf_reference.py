"""transformers' ``MixtralForCausalLM`` on the same weights: the correctness reference, and the
model that transformers-based baselines run.

Contract: ``build_transformers_model(source, device, dtype)`` builds the model on the meta
device and assigns every parameter from the ``WeightSource``, allocated where it will live, so
no second copy and no random initialisation happens. This module holds the one mapping from
checkpoint names to transformers 5's in-memory names (per layer
``mlp.experts.gate_up_proj[e] = cat(w1, w3)`` and ``mlp.experts.down_proj[e] = w2``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fiddler.config import ModelConfig
from fiddler.loading import load_expert_stack
from fiddler.weights import EMBED, FINAL_NORM, LM_HEAD, WeightSource, dense_layer_names, load

# checkpoint role (fiddler.weights.dense_layer_names) -> transformers' in-memory suffix
_LAYER_PARAMS = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "moe_norm": "post_attention_layernorm.weight",
    "router": "mlp.gate.weight",
}


Placement = torch.device | str | Callable[[str], torch.device | str]  # one device, or one per parameter


def transformers_state_dict(source: WeightSource, device: Placement, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter of transformers' Mixtral, under its in-memory name, each allocated on
    ``device`` (or on ``device(name)`` when it is a function of the parameter name)."""
    cfg = source.config
    where = device if callable(device) else (lambda _name: device)
    state = {"model.embed_tokens.weight": load(source, EMBED, where("model.embed_tokens.weight"), dtype)}
    state["model.norm.weight"] = load(source, FINAL_NORM, where("model.norm.weight"), dtype)
    state["lm_head.weight"] = (
        state["model.embed_tokens.weight"]
        if cfg.tie_word_embeddings
        else load(source, LM_HEAD, where("lm_head.weight"), dtype)
    )
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}."
        names = dense_layer_names(layer)
        for role, suffix in _LAYER_PARAMS.items():
            state[prefix + suffix] = load(source, names[role], where(prefix + suffix), dtype)
        w13, w2 = load_expert_stack(source, layer, where(prefix + "mlp.experts.gate_up_proj"), dtype)
        state[prefix + "mlp.experts.gate_up_proj"] = w13
        state[prefix + "mlp.experts.down_proj"] = w2
    return state


def empty_transformers_model(config: ModelConfig, attn_implementation: str = "sdpa"):
    """transformers' Mixtral with every parameter on the meta device (nothing allocated)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    hf_config = MixtralConfig(**config.to_hf_dict())
    hf_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        return MixtralForCausalLM(hf_config)


def build_transformers_model(
    source: WeightSource,
    device: Placement,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    model=None,
    rotary_device: torch.device | str | None = None,
):  # -> transformers.MixtralForCausalLM
    """Fill ``model`` (default: a new empty one) from ``source``; parameters go to ``device``
    (one device or a function of the parameter name), the rotary tables to ``rotary_device``
    (default: ``device`` when it is one device)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    model = model if model is not None else empty_transformers_model(source.config, attn_implementation)
    hf_config = model.config
    state = transformers_state_dict(source, device, dtype)
    expected = set(model.state_dict())
    if set(state) != expected:
        raise RuntimeError(
            "transformers' Mixtral parameter names changed: "
            f"missing {sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}"
        )
    model.load_state_dict(state, assign=True, strict=True)
    # Non-persistent buffers are not in the state dict: rebuild the rotary tables for real.
    with torch.device(rotary_device if rotary_device is not None else device):
        model.model.rotary_emb = MixtralRotaryEmbedding(hf_config)
    model.eval()
    return model
