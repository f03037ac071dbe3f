"""ModelConfig parsing from Hugging Face config.json files."""

from __future__ import annotations

import json

import pytest

from cluster import ConfigError, ModelConfig
from cluster.model.tiny import TinySpec


def _text_config(make_checkpoint) -> dict:
    return json.loads(open(make_checkpoint(TinySpec(seed=2, num_experts=8, top_k=2)) + "/config.json").read())


def test_text_config_fields(make_checkpoint):
    raw = _text_config(make_checkpoint)
    cfg = ModelConfig.from_dict(raw)
    assert cfg.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert cfg.num_experts == 8 and cfg.num_experts_per_tok == 2
    assert cfg.rotary_dim == 8 and cfg.rope_theta == 10000.0
    assert cfg.eos_token_ids == (raw["eos_token_id"],)


def test_multimodal_wrapper_and_interval_default(make_checkpoint):
    text = _text_config(make_checkpoint)
    del text["layer_types"]
    text["full_attention_interval"] = 2
    cfg = ModelConfig.from_dict({"model_type": "qwen3_5_moe", "text_config": text, "tie_word_embeddings": True})
    assert cfg.layer_types == ("linear_attention", "full_attention") * 2
    assert cfg.model_type == "qwen3_5_moe"


def test_legacy_top_level_rope_theta(make_checkpoint):
    raw = _text_config(make_checkpoint)
    del raw["rope_parameters"]
    raw["rope_theta"] = 1e7
    raw["partial_rotary_factor"] = 0.5
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_theta == 1e7 and cfg.rotary_dim == 16


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="llama"), "unsupported model_type 'llama'"),
        (lambda c: c.pop("num_experts"), "missing required field 'num_experts'"),
        (lambda c: c.update(num_experts_per_tok=99), "num_experts_per_tok = 99"),
        (lambda c: c.update(layer_types=["linear_attention"]), "layer_types has 1 entries"),
        (lambda c: c.update(norm_topk_prob=False), "norm_topk_prob"),
        (lambda c: c["rope_parameters"].update(rope_type="yarn"), "unsupported rope_type 'yarn'"),
    ],
)
def test_bad_configs_name_the_field(make_checkpoint, edit, message):
    raw = _text_config(make_checkpoint)
    edit(raw)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ModelConfig.from_dict(raw)


def test_multimodal_without_text_config():
    with pytest.raises(ConfigError, match="text_config"):
        ModelConfig.from_dict({"model_type": "qwen3_5_moe"})
