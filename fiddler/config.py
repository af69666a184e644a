"""Model configuration: one validated ``ModelConfig`` from a checkpoint's config.json or a preset.

Contract: every architecture size used anywhere in the project comes from a ``ModelConfig``.
``ModelConfig.from_dict`` accepts both spellings of config.json in circulation (the original
Mixtral file's top-level ``rope_theta`` / ``torch_dtype`` and transformers 5's
``rope_parameters`` / ``dtype``) and raises ``ValueError`` naming the field to change when the
file describes something this engine cannot run. ``resolve_model`` turns what a user types
(a preset name or a checkpoint directory, plus an optional layer count) into a config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fiddler.files import read_json
from fiddler.presets import PRESETS

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM",)
SUPPORTED_MODEL_TYPES = ("mixtral",)
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_token: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    tie_word_embeddings: bool
    dtype: str

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any], name: str) -> ModelConfig:
        """Parse a config.json dictionary; ``name`` says where it came from, for messages."""
        where = f"config {name!r}"
        architectures = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if not (set(architectures) & set(SUPPORTED_ARCHITECTURES)) and model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{where} describes architecture {architectures or model_type!r}; this engine runs the "
                f"Mixtral family only ({', '.join(SUPPORTED_ARCHITECTURES)}, model_type 'mixtral')"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act {act!r} is not supported; Mixtral experts use 'silu'")

        def need_int(key: str, minimum: int = 1) -> int:
            value = raw.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{where}: {key!r} must be an integer >= {minimum}, got {value!r}")
            return value

        hidden = need_int("hidden_size")
        heads = need_int("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        head_dim = raw.get("head_dim") or (hidden // heads)
        if raw.get("head_dim") is None and hidden % heads:
            raise ValueError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
            raise ValueError(
                f"{where}: num_attention_heads {heads} must be a multiple of num_key_value_heads {kv_heads}"
            )
        if head_dim % 2:
            raise ValueError(f"{where}: head_dim {head_dim} must be even for rotary embeddings")
        experts = need_int("num_local_experts")
        top_k = need_int("num_experts_per_tok")
        if top_k > experts:
            raise ValueError(f"{where}: num_experts_per_tok {top_k} exceeds num_local_experts {experts}")

        rope_theta = cls._rope_theta(raw, where)
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"{where}: dtype {dtype!r} is not one of {DTYPE_NAMES}")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        window = raw.get("sliding_window")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"{where}: sliding_window must be null or a positive integer, got {window!r}")
        return cls(
            name=name,
            vocab_size=need_int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need_int("intermediate_size"),
            num_layers=need_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            num_experts=experts,
            num_experts_per_token=top_k,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            max_position_embeddings=need_int("max_position_embeddings"),
            sliding_window=window,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            dtype=dtype,
        )

    @staticmethod
    def _rope_theta(raw: dict[str, Any], where: str) -> float:
        params = raw.get("rope_parameters") or raw.get("rope_scaling")
        if params:
            rope_type = params.get("rope_type", params.get("type", "default"))
            if rope_type != "default":
                raise ValueError(f"{where}: rope_type {rope_type!r} is not supported; only 'default' RoPE")
            if "rope_theta" in params:
                return float(params["rope_theta"])
        if "rope_theta" in raw:
            return float(raw["rope_theta"])
        raise ValueError(f"{where}: no rope_theta (top-level or in rope_parameters)")

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        raw = read_json(
            path, f"no config.json at {path}: is this a Hugging Face checkpoint directory?", "fix or replace the file"
        )
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(raw, name=path.parent.name)

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or give a checkpoint directory")
        return cls.from_dict(PRESETS[name], name=name)

    def with_layers(self, num_layers: int | None) -> ModelConfig:
        """A truncated model: the first ``num_layers`` decoder layers (for quick runs)."""
        if num_layers is None or num_layers == self.num_layers:
            return self
        if not 1 <= num_layers <= self.num_layers:
            raise ValueError(f"--layers must be between 1 and {self.num_layers} for {self.name}, got {num_layers}")
        return dataclasses.replace(self, num_layers=num_layers, name=f"{self.name}-L{num_layers}")

    # ---- export -------------------------------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers 5 writes it (for building the reference model)."""
        return {
            "architectures": list(SUPPORTED_ARCHITECTURES),
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_token,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "dtype": self.dtype,
        }

    # ---- sizes --------------------------------------------------------------------------

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def expert_params(self) -> int:
        """Parameters of one expert (w1, w2, w3)."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def num_expert_slots(self) -> int:
        return self.num_layers * self.num_experts

    @property
    def layer_dense_params(self) -> int:
        """Per decoder layer, everything but the experts: attention, router, two norms."""
        attention = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        return attention + self.num_experts * self.hidden_size + 2 * self.hidden_size

    @property
    def dense_params(self) -> int:
        """Every non-expert parameter: embeddings, LM head, final norm, per-layer dense parts."""
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.vocab_size * self.hidden_size + self.hidden_size + self.num_layers * self.layer_dense_params

    @property
    def total_params(self) -> int:
        return self.dense_params + self.num_expert_slots * self.expert_params

    def kv_cache_bytes(self, seq_len: int, batch: int, bytes_per_element: int) -> int:
        return 2 * self.num_layers * batch * seq_len * self.kv_size * bytes_per_element


def resolve_recorded_model(name: str, layers: int) -> tuple[ModelConfig, Path | None]:
    """The model a run record names: its ``model`` and ``num_layers`` columns (a truncated
    preset is recorded as '<preset>-L<layers>', the name ``ModelConfig.with_layers`` gives it)."""
    return resolve_model(str(name).removesuffix(f"-L{layers}"), layers)


def resolve_model(model: str, layers: int | None = None) -> tuple[ModelConfig, Path | None]:
    """A preset name or checkpoint directory -> (config, checkpoint directory or None)."""
    path = Path(model)
    if model in PRESETS:
        return ModelConfig.preset(model).with_layers(layers), None
    if path.is_dir():
        return ModelConfig.from_file(path / "config.json").with_layers(layers), path
    if path.exists():
        raise ValueError(f"--model {model!r} is a file; give the checkpoint directory that holds config.json")
    raise FileNotFoundError(
        f"--model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing checkpoint directory"
    )
