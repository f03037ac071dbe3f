"""Checkpoint reading: layouts, partial expert reads, and errors that name tensor and file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster import LLM, ModelConfig
from cluster.model.checkpoint import CheckpointError, CheckpointReader, canonical_name
from cluster.model.tiny import TinySpec

PER_EXPERT = TinySpec(seed=6, num_experts=16, top_k=4)
FUSED = TinySpec(seed=6, num_experts=16, top_k=4, fused_experts=True)
SHARDED_FUSED = TinySpec(seed=6, num_experts=16, top_k=4, fused_experts=True, max_shard_mb=0.2)


def test_canonical_names():
    assert canonical_name("model.layers.0.mlp.gate.weight") == "layers.0.mlp.gate.weight"
    assert canonical_name("model.language_model.norm.weight") == "norm.weight"
    assert canonical_name("model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert canonical_name("vision_tower.x") is None
    assert canonical_name("mtp.fc.weight") == "mtp.fc.weight"
    assert canonical_name("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize("spec", [PER_EXPERT, FUSED, SHARDED_FUSED], ids=["per-expert", "fused", "sharded"])
def test_layouts_give_the_same_experts(make_checkpoint, spec):
    cfg = ModelConfig.from_pretrained(make_checkpoint(spec))
    reference = CheckpointReader(make_checkpoint(PER_EXPERT))
    reader = CheckpointReader(make_checkpoint(spec))
    args = (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
    for ids in ([0, 1, 2, 3], [5, 9, 10, 15], [7]):
        a, b = reader.read_experts(2, ids, *args), reference.read_experts(2, ids, *args)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_subset_reads_only_its_share_of_bytes(make_checkpoint):
    cfg = ModelConfig.from_pretrained(make_checkpoint(FUSED))
    reader = CheckpointReader(make_checkpoint(FUSED))
    args = (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
    reader.read_experts(0, list(range(4)), *args)
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    assert reader.bytes_read == 4 * per_expert  # a quarter of the layer, nothing more


def test_multimodal_names_vision_tower_and_mtp_kept_aside(make_checkpoint):
    reader = CheckpointReader(make_checkpoint(TinySpec(seed=6, num_experts=16, top_k=4, multimodal=True)))
    assert reader.mtp_names == ["mtp.fc.weight"]
    assert "visual.merger.linear_fc2.weight" in reader.names()
    assert "layers.0.mlp.gate.weight" in reader.dense_names()


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("victim", ["layers.1.mlp.shared_expert_gate.weight", "layers.3.mlp.experts.11.up_proj.weight"])
def test_missing_tensor_is_named(make_checkpoint, tmp_path, victim):
    model_dir = _copy(make_checkpoint(PER_EXPERT), tmp_path / "m")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model." + victim]
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=victim):
        LLM(model=model_dir)


def test_shape_mismatch_names_tensor_and_file(make_checkpoint, tmp_path):
    model_dir = _copy(make_checkpoint(SHARDED_FUSED), tmp_path / "m")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    name = "model.layers.2.mlp.experts.down_proj"
    file = index["weight_map"][name]
    tensors = load_file(model_dir / file)
    tensors[name] = tensors[name][:, :, :-1].contiguous()
    save_file(tensors, model_dir / file)
    with pytest.raises(CheckpointError, match=rf"'{name}' in .*{file} has shape \[16, 128, 31\]"):
        LLM(model=model_dir)


def test_missing_shard_file_is_named(make_checkpoint, tmp_path):
    model_dir = _copy(make_checkpoint(SHARDED_FUSED), tmp_path / "m")
    victim = sorted(model_dir.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        LLM(model=model_dir)


def test_no_weights_at_all(tmp_path):
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        CheckpointReader(tmp_path)
