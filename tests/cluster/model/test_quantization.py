"""Qwen's block-wise FP8 checkpoints load to the weights they encode; other methods are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster import LLM, SamplingParams
from cluster.model.checkpoint import CheckpointError
from cluster.model.quantization import (
    QuantizationError,
    dequantize,
    quantization_from,
    quantize,
    write_fp8_checkpoint,
)
from tests.conftest import FLAGSHIP_SHAPE, TIED_FUSED

PROMPTS = [[3], list(range(10, 40)), [7, 7, 9, 200, 31]]


def test_block_quantization_round_trip_and_ragged_blocks():
    w = torch.randn(70, 45)
    q, scale_inv = quantize(w, (32, 16))
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and scale_inv.shape == (3, 3)
    back = dequantize(q, scale_inv, (32, 16))
    assert (back - w).abs().max() <= 0.07 * w.abs().max()  # e4m3 keeps 3 mantissa bits
    block = back[32:64, 16:32]  # each block is fp8 values times its own scale
    assert torch.equal(block, q[32:64, 16:32].float() * scale_inv[1, 1])
    with pytest.raises(QuantizationError, match="scale shape"):
        dequantize(q, scale_inv[:2], (32, 16))


@pytest.mark.parametrize("shape", [FLAGSHIP_SHAPE, TIED_FUSED], ids=["per-expert", "fused-experts"])
def test_fp8_checkpoint_gives_the_logits_of_its_dequantised_weights(make_checkpoint, tmp_path, shape):
    fp8, exact = tmp_path / "fp8", tmp_path / "exact"
    write_fp8_checkpoint(make_checkpoint(shape), fp8, block=(24, 40), dequantised=exact)
    stored = load_file(next(fp8.glob("*.safetensors")))
    assert any(t.dtype == torch.float8_e4m3fn for t in stored.values())
    assert any(name.endswith("weight_scale_inv") for name in stored)
    got = LLM(model=str(fp8), warm_up=False).score(PROMPTS)
    want = LLM(model=str(exact), warm_up=False).score(PROMPTS)
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) <= 1e-4


def test_fp8_on_expert_workers_matches_one_process(ray_cluster, make_checkpoint, tmp_path):
    write_fp8_checkpoint(make_checkpoint(FLAGSHIP_SHAPE), tmp_path / "fp8")  # Qwen's 128x128 blocks
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    single = [c.token_ids for c in LLM(model=str(tmp_path / "fp8"), warm_up=False).generate(PROMPTS, params)]
    with LLM(model=str(tmp_path / "fp8"), expert_workers=2, use_ray=True, warm_up=False) as llm:
        assert [c.token_ids for c in llm.generate(PROMPTS, params)] == single


def _with_quantization(src: str, dst, quantization: dict):
    write_fp8_checkpoint(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quantization
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


@pytest.mark.parametrize("quantization, message", [
    ({"quant_method": "gptq", "bits": 4}, "'gptq' is not supported"),
    ({"quant_method": "awq"}, "'awq' is not supported"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "'e5m2'"),
    ({"quant_method": "fp8"}, "weight_block_size must be two positive ints"),
])
def test_other_quantization_is_refused_by_name(make_checkpoint, tmp_path, quantization, message):
    model = _with_quantization(make_checkpoint(FLAGSHIP_SHAPE), tmp_path / "q", quantization)
    with pytest.raises(ValueError, match=message):
        LLM(model=model, warm_up=False)


def test_quantization_config_is_found_in_the_multimodal_wrapper():
    raw = {"model_type": "qwen3_5_moe", "text_config": {"quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128, 128]}}}
    assert quantization_from(raw).block == (128, 128)


def test_fp8_weight_without_its_scale_names_the_tensor(make_checkpoint, tmp_path):
    write_fp8_checkpoint(make_checkpoint(FLAGSHIP_SHAPE), tmp_path / "fp8")
    path = next((tmp_path / "fp8").glob("*.safetensors"))
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    del tensors[name + "_scale_inv"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=f"{name}.*weight_scale_inv"):
        LLM(model=str(tmp_path / "fp8"), warm_up=False)
