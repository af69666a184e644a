"""Model presets by name: config.json dictionaries that need no download.

Each preset is written in the form of a checkpoint's ``config.json`` so it goes through the
same parser and validation as a real checkpoint (``fiddler.config``). The two full-size
presets are the published Mixtral configurations; the small ones keep Mixtral's vocabulary
(so the Mistral v1 tokenizer applies) and shrink every other size, for tests and CPU demos.
"""

from __future__ import annotations

from typing import Any

# mistralai/Mixtral-8x7B-v0.1 config.json, as published.
MIXTRAL_8X7B: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 32000,
}

# mistralai/Mixtral-8x22B-v0.1 config.json, as published.
MIXTRAL_8X22B: dict[str, Any] = {
    **MIXTRAL_8X7B,
    "hidden_size": 6144,
    "intermediate_size": 16384,
    "max_position_embeddings": 65536,
    "num_attention_heads": 48,
    "num_hidden_layers": 56,
    "router_aux_loss_coef": 0.001,
}

# Small models with Mixtral's structure (GQA, top-2 of 8 experts) and vocabulary.
MIXTRAL_TINY: dict[str, Any] = {
    **MIXTRAL_8X7B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "num_local_experts": 4,
    "torch_dtype": "float32",
}

MIXTRAL_SMALL: dict[str, Any] = {
    **MIXTRAL_8X7B,
    "hidden_size": 512,
    "intermediate_size": 1792,
    "max_position_embeddings": 8192,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "torch_dtype": "float32",
}

PRESETS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": MIXTRAL_8X7B,
    "mixtral-8x22b": MIXTRAL_8X22B,
    "mixtral-small": MIXTRAL_SMALL,
    "mixtral-tiny": MIXTRAL_TINY,
}
