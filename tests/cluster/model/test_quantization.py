"""Qwen's block-wise FP8 checkpoints load to the weights they encode; other methods are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster import LLM, ClusterConfig, SamplingParams
from cluster.model.checkpoint import CheckpointError
from cluster.model.quantization import (
    QuantizationError,
    dequantize,
    quantization_from,
    quantize,
    write_fp8_checkpoint,
)
from tests.conftest import FEW_EXPERTS, FLAGSHIP_SHAPE, TIED_FUSED

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


@pytest.mark.parametrize("shape", [FEW_EXPERTS, TIED_FUSED], ids=["per-expert", "fused-experts"])
def test_fp8_experts_read_as_stored_encode_their_dequantised_weights(make_checkpoint, tmp_path, shape):
    """Either layout's experts read as stored (per-expert gate and up blocks stacked into gate_up's):
    FP8 weights and block scales whose product is what the dequantised copy stores."""
    from cluster.model.checkpoint import CheckpointReader
    from kernels.moe import dequantize_blocks

    fp8, exact = tmp_path / "fp8", tmp_path / "exact"
    write_fp8_checkpoint(make_checkpoint(shape), fp8, block=(16, 40), dequantised=exact)
    ids, dims = [5, 0, 3], (shape.num_experts, shape.hidden, shape.moe_intermediate)
    gate_up, down, scales = CheckpointReader(fp8).read_experts_fp8(1, ids, *dims)
    want = CheckpointReader(exact).read_experts(1, ids, *dims)
    assert gate_up.dtype == down.dtype == torch.float8_e4m3fn and scales.block == (16, 40)
    got = (dequantize_blocks(gate_up, scales.gate_up, scales.block), dequantize_blocks(down, scales.down, scales.block))
    assert all(torch.equal(g, w.float()) for g, w in zip(got, want))


def test_fp8_weights_kept_as_stored_compute_with_their_dequantised_weights(make_checkpoint, tmp_path,
                                                                           gpu_kernels_on_cpu, monkeypatch):
    """Where the GPU path runs (here its Triton kernels on CPU tensors through the interpreter,
    fp32), an FP8 checkpoint's experts and dense linear layers stay FP8 (a quarter of the fp32
    bytes; DeltaNet's b / a projections, stored unquantized as Qwen does, fused in a run of their
    own): decode steps read the experts in the few-rows kernels, prefill steps in the grouped ones,
    the dense weights in the same kernels as a bank of one; greedy tokens those of its dequantised
    copy, scores within 1e-4; the memory plan counts the bytes they take."""
    from cluster.engine import engine
    from cluster.model import loading
    from kernels import Fp8Weight
    from kernels.gpu import attention as gpu_attention
    from kernels.gpu import delta_rule as gpu_delta_rule
    from kernels.gpu import moe as gpu_moe

    for op in (gpu_attention.OP, gpu_delta_rule.OP):  # the FP8 weights' kernels only: quicker
        monkeypatch.setattr(op, "unavailable", "not under test")
    monkeypatch.setattr(gpu_moe, "BLOCK_N", 64)  # few-rows programs of 64 outputs, not 8 (tests/kernels: 8)

    fp8, exact = tmp_path / "fp8", tmp_path / "exact"  # the layout read: the test above
    write_fp8_checkpoint(make_checkpoint(FEW_EXPERTS), fp8, block=(16, 40), dequantised=exact)  # I = 32: 2 block rows
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    runs = []
    for model_dir, kept in ((exact, False), (fp8, True)):
        for module in (loading, engine):
            monkeypatch.setattr(module, "fp8_banks_supported", lambda device, dtype: kept)
        for op in (gpu_moe.OP, gpu_moe.FEW_ROWS, gpu_moe.GROUPED):  # the copy: torch's versions (quicker)
            monkeypatch.setattr(op, "unavailable", None if kept else "the reference run")
        llm = LLM(model=str(model_dir), warm_up=False)
        model = llm.engine.executor.runner.model
        dense = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for n, b in model.named_buffers()
                                                                 if n.endswith("weight_scale_inv"))
        plan = llm.engine.memory_plan.attention  # one process: the dense weights and every expert
        assert plan.weights == dense + llm.engine.executor.expert_bytes
        attention, deltanet = model.layers[3].self_attn, model.layers[0].linear_attn
        if kept:
            assert isinstance(attention.qkv, Fp8Weight) and isinstance(attention.o_weight, Fp8Weight)
            qkvz, ba = deltanet.in_proj  # FP8 qkv and z, then the unquantized b and a
            assert isinstance(qkvz, Fp8Weight) and qkvz.shape[0] == deltanet.conv_channels + deltanet.value_dim
            assert ba.dtype == torch.float32 and ba.shape[0] == 2 * deltanet.num_value_heads
            assert isinstance(model.layers[0].mlp.shared_expert.gate_up, Fp8Weight)
        runs.append((dense, llm.engine.executor.expert_bytes, llm.score([list(range(10, 55))]),  # 90 pairs: grouped
                     [c.token_ids for c in llm.generate([PROMPTS[0], PROMPTS[2]], params)]))  # few rows
    (exact_dense, exact_bytes, exact_scores, exact_tokens), (fp8_dense, fp8_bytes, fp8_scores, fp8_tokens) = runs
    assert fp8_bytes < exact_bytes / 3.9 and fp8_dense < 0.6 * exact_dense  # embeddings, LM head stay fp32
    assert max((a - b).abs().max().item() for a, b in zip(fp8_scores, exact_scores)) <= 1e-4
    assert fp8_tokens == exact_tokens
    assert {gpu_moe.OP.name, gpu_moe.FEW_ROWS.name, gpu_moe.GROUPED.name, gpu_moe.DENSE_FP8.name} <= gpu_kernels_on_cpu


def test_fp8_activations_reach_this_process_kernels_and_need_a_gpu(make_checkpoint, monkeypatch, caplog):
    """ClusterConfig(fp8_activations=True) turns W8A8 on for the kernels of the process that computes
    (tests/kernels: what the kernels then do; a Ray worker gets it as it starts), says when nothing
    stays FP8 for it to act on, and is refused where the device is a CPU."""
    from cluster import ConfigError
    from kernels.gpu import fp8_activations as w8a8

    monkeypatch.setattr(w8a8, "_on", False)  # restored after the test
    with LLM(model=make_checkpoint(FEW_EXPERTS), warm_up=False, cluster=ClusterConfig(fp8_activations=True)) as llm:
        assert [w["fp8_activations"] for w in llm.worker_info()] == [True]
    assert "fp8_activations has no effect: no FP8 weights are kept as stored here" in caplog.text
    with LLM(model=make_checkpoint(FEW_EXPERTS), warm_up=False) as llm:
        assert [w["fp8_activations"] for w in llm.worker_info()] == [False]
    with pytest.raises(ConfigError, match="fp8_activations needs GPUs"):
        ClusterConfig(device="cpu", fp8_activations=True)


def test_fp8_on_expert_workers_matches_one_process(ray_cluster, make_checkpoint, tmp_path):
    write_fp8_checkpoint(make_checkpoint(FLAGSHIP_SHAPE), tmp_path / "fp8")  # Qwen's 128x128 blocks
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    single = [c.token_ids for c in LLM(model=str(tmp_path / "fp8"), warm_up=False).generate(PROMPTS, params)]
    # fp8_activations reaches each worker's kernels (on CPUs FP8 is dequantised at load: no effect)
    cluster = ClusterConfig(expert_workers=2, use_ray=True, fp8_activations=True)
    with LLM(model=str(tmp_path / "fp8"), cluster=cluster, warm_up=False) as llm:
        assert [c.token_ids for c in llm.generate(PROMPTS, params)] == single
        assert [w["fp8_activations"] for w in llm.worker_info()] == [True] * 3


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
