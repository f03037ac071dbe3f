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


def _saved_as(tmp_path, make_checkpoint, **fields) -> str:
    """A copy of a tiny checkpoint's directory whose config.json says it was saved as `fields`."""
    import shutil

    source = make_checkpoint(TinySpec(seed=2, num_experts=8, top_k=2))
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    raw = json.loads((target / "config.json").read_text())
    raw.pop("dtype", None)
    raw.pop("torch_dtype", None)
    (target / "config.json").write_text(json.dumps(raw | fields))
    return str(target)


@pytest.mark.parametrize("fields, expected", [({"dtype": "bfloat16"}, "bfloat16"),
                                              ({"torch_dtype": "float16"}, "float16"),
                                              ({}, "float32")])
def test_auto_dtype_is_the_one_the_checkpoint_was_saved_in(tmp_path, make_checkpoint, fields, expected):
    from cluster.config import resolve_dtype

    model_dir = _saved_as(tmp_path, make_checkpoint, **fields)
    assert resolve_dtype("auto", model_dir) == expected
    assert resolve_dtype("float32", model_dir) == "float32"  # an explicit dtype wins


def test_auto_dtype_reads_a_multimodal_checkpoints_text_model(tmp_path):
    from cluster.config import resolve_dtype

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe",
                                                      "text_config": {"dtype": "bfloat16"}}))
    assert resolve_dtype("auto", tmp_path) == "bfloat16"


def test_unknown_dtypes_are_refused_by_name(tmp_path, make_checkpoint):
    from cluster.config import resolve_dtype

    with pytest.raises(ConfigError, match="'int8'"):
        resolve_dtype("int8", None)
    with pytest.raises(ConfigError, match="'float64'.*pass a dtype"):
        resolve_dtype("auto", _saved_as(tmp_path, make_checkpoint, dtype="float64"))


def test_the_engine_runs_a_bf16_checkpoint_in_bf16_by_default(tmp_path, make_checkpoint):
    import torch

    from cluster import LLM

    with LLM(_saved_as(tmp_path, make_checkpoint, dtype="bfloat16"), warm_up=False) as llm:
        assert llm.engine.dtype == "bfloat16"
        assert {p.dtype for p in llm.executor.runner.model.parameters()} == {torch.bfloat16}
        assert len(llm.generate([[1, 2, 3]])[0].token_ids) > 0


def test_the_served_dtype_choices_are_the_engines(make_checkpoint):
    from typing import get_args

    from cluster.config import DTYPES
    from deploy.config import DTYPES as SERVED, AppConfig

    assert get_args(AppConfig.model_fields["dtype"].annotation) == SERVED == DTYPES
    assert AppConfig(model=make_checkpoint(TinySpec(seed=2, num_experts=8, top_k=2))).dtype == "auto"
