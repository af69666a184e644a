import json

import pytest

from fiddler.config import ModelConfig, resolve_model
from fiddler.presets import MIXTRAL_8X7B, PRESETS


def test_mixtral_8x7b_sizes_match_the_paper():
    cfg = ModelConfig.preset("mixtral-8x7b")
    assert cfg.expert_params == 176_160_768  # 352.3 MB in bf16
    assert cfg.num_expert_slots == 256
    assert round(cfg.dense_params * 2 / 1e9, 1) == 3.2
    assert round(cfg.total_params * 2 / 1e9, 1) == 93.4
    assert cfg.rope_theta == 1e6 and cfg.dtype == "bfloat16" and cfg.eos_token_ids == (2,)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_parses_and_round_trips_through_transformers(name):
    from transformers import MixtralConfig

    cfg = ModelConfig.preset(name)
    hf = MixtralConfig(**cfg.to_hf_dict())
    again = ModelConfig.from_dict(hf.to_dict(), name=name)
    assert again == cfg


def test_both_config_dialects_read_the_same():
    old = dict(MIXTRAL_8X7B)  # top-level rope_theta / torch_dtype
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "torch_dtype")}
    new["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    new["dtype"] = "bfloat16"
    assert ModelConfig.from_dict(old, "a") == ModelConfig.from_dict(new, "a")


def test_layer_override_truncates():
    cfg = ModelConfig.preset("mixtral-8x7b").with_layers(4)
    assert cfg.num_layers == 4 and cfg.name == "mixtral-8x7b-L4"
    with pytest.raises(ValueError, match="--layers must be between 1 and 32"):
        ModelConfig.preset("mixtral-8x7b").with_layers(33)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "Mixtral family only"),
        ({"num_attention_heads": 30}, "not divisible"),
        ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
        ({"num_experts_per_tok": 9}, "exceeds num_local_experts"),
        ({"hidden_size": "big"}, "'hidden_size' must be an integer"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "rope_type 'yarn' is not supported"),
        ({"torch_dtype": "int8"}, "dtype 'int8'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ],
)
def test_bad_configs_get_one_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**MIXTRAL_8X7B, **change}, "bad")


def test_resolve_model(tmp_path):
    cfg, ckpt = resolve_model("mixtral-tiny", layers=1)
    assert ckpt is None and cfg.num_layers == 1
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    cfg, ckpt = resolve_model(str(tmp_path))
    assert ckpt == tmp_path and cfg.hidden_size == 4096
    with pytest.raises(ValueError, match="is a file"):
        resolve_model(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_model(str(tmp_path))
