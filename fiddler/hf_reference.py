"""transformers' ``MixtralForCausalLM`` on the same weights: the correctness reference, and the
model that transformers-based baselines run.

Contract: ``build_transformers_model(source, device, dtype)`` builds the model on the meta
device and assigns every parameter from the ``WeightSource``, allocated where it will live, so
no second copy and no random initialisation happens. This module holds the one mapping from
checkpoint names to transformers 5's in-memory names (per layer
``mlp.experts.gate_up_proj[e] = cat(w1, w3)`` and ``mlp.experts.down_proj[e] = w2``).
"""

from __future__ import annotations

import torch

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


def transformers_state_dict(
    source: WeightSource, device: torch.device | str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every parameter of transformers' Mixtral, under its in-memory name."""
    cfg = source.config
    state = {"model.embed_tokens.weight": load(source, EMBED, device, dtype)}
    state["model.norm.weight"] = load(source, FINAL_NORM, device, dtype)
    state["lm_head.weight"] = (
        state["model.embed_tokens.weight"] if cfg.tie_word_embeddings else load(source, LM_HEAD, device, dtype)
    )
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}."
        names = dense_layer_names(layer)
        for role, suffix in _LAYER_PARAMS.items():
            state[prefix + suffix] = load(source, names[role], device, dtype)
        w13, w2 = load_expert_stack(source, layer, device, dtype)
        state[prefix + "mlp.experts.gate_up_proj"] = w13
        state[prefix + "mlp.experts.down_proj"] = w2
    return state


def build_transformers_model(
    source: WeightSource, device: torch.device | str, dtype: torch.dtype, attn_implementation: str = "sdpa"
):  # -> transformers.MixtralForCausalLM
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    hf_config = MixtralConfig(**source.config.to_hf_dict())
    hf_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = MixtralForCausalLM(hf_config)
    state = transformers_state_dict(source, device, dtype)
    expected = set(model.state_dict())
    if set(state) != expected:
        raise RuntimeError(
            "transformers' Mixtral parameter names changed: "
            f"missing {sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}"
        )
    model.load_state_dict(state, assign=True, strict=True)
    # Non-persistent buffers are not in the state dict: rebuild the rotary tables for real.
    with torch.device(device):
        model.model.rotary_emb = MixtralRotaryEmbedding(hf_config)
    model.eval()
    return model
