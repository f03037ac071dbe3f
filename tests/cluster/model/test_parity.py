"""epserve's single-process forward against transformers' Qwen3.5-MoE, fp32."""

from __future__ import annotations

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.model.tiny import TinySpec
from tests.conftest import FEW_EXPERTS, FLAGSHIP_SHAPE, TIED_FUSED
from tests.reference import hf_greedy, hf_logits

TOL = 1e-4
PROMPT_LENGTHS = (1, 5, 63, 64, 65, 150)  # around and past the DeltaNet chunk (64)
SHAPES = {
    "flagship-shape": FLAGSHIP_SHAPE,
    "few-experts": FEW_EXPERTS,
    "tied-fused": TIED_FUSED,
    "per-expert-sharded": TinySpec(seed=4, num_experts=32, top_k=8, max_shard_mb=0.5),
}


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % (vocab - 3) + 3 for i in range(n)]


@pytest.mark.parametrize("shape", SHAPES)
def test_score_matches_transformers(make_checkpoint, shape):
    model_dir = make_checkpoint(SHAPES[shape])
    llm = LLM(model=model_dir)
    prompts = [_prompt(n, llm.config.vocab_size, n) for n in PROMPT_LENGTHS]
    ours = llm.score(prompts)  # one flat batch of all lengths
    worst = 0.0
    for ids, logits in zip(prompts, ours):
        ref = hf_logits(model_dir, ids)
        assert logits.shape == ref.shape
        worst = max(worst, (logits - ref).abs().max().item())
    print(f"{shape}: max |dlogit| = {worst:.2e}")
    assert worst <= TOL


@pytest.mark.parametrize("shape", ["flagship-shape", "tied-fused"])
def test_greedy_generate_matches_transformers(make_checkpoint, shape):
    model_dir = make_checkpoint(SHAPES[shape])
    llm = LLM(model=model_dir)
    prompts = [_prompt(n, llm.config.vocab_size, n) for n in (3, 70)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)  # both prompts batched through prefill and decode
    for ids, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(model_dir, ids, 32)
        assert out.finish_reason == "length"


def test_multimodal_layout_equals_text_layout(make_checkpoint):
    """`model.language_model.` names + text_config wrapper + vision/MTP extras: same function."""
    text = TinySpec(seed=5, num_experts=16, top_k=4)
    multimodal = TinySpec(seed=5, num_experts=16, top_k=4, multimodal=True, fused_experts=True)
    ids = [_prompt(40, 500, 1)]
    a = LLM(model=make_checkpoint(text)).score(ids)[0]
    b = LLM(model=make_checkpoint(multimodal)).score(ids)[0]
    assert (a - b).abs().max().item() == 0.0
    assert (a - hf_logits(make_checkpoint(text), ids[0])).abs().max().item() <= TOL


def test_the_batched_torch_kernels_match_transformers(make_checkpoint, monkeypatch):
    """The path of a device without its own kernels (a GPU's, in fp32): every op's batched torch
    version instead of the C++ kernels, the same 1e-4."""
    from kernels import backend

    model_dir = make_checkpoint(FLAGSHIP_SHAPE)
    monkeypatch.setattr(backend, "_cpu_kernels", False)
    assert not backend.native(torch.zeros(1)) and backend.batched(torch.zeros(1))
    llm = LLM(model=model_dir, warm_up=False)
    prompts = [_prompt(n, llm.config.vocab_size, n) for n in PROMPT_LENGTHS]
    worst = max((logits - hf_logits(model_dir, ids)).abs().max().item()
                for ids, logits in zip(prompts, llm.score(prompts)))
    print(f"batched torch kernels: max |dlogit| = {worst:.2e}")
    assert worst <= TOL


def test_the_gpu_triton_kernels_match_transformers(make_checkpoint, gpu_kernels_on_cpu, monkeypatch):
    """The GPU path's own kernels wired into the real forward (kernels.gpu: paged attention, the
    DeltaNet decode step, the routed experts' passes and their few-rows kernels), run on CPU tensors
    through Triton's interpreter in fp32: scores of a mixed step and greedy decoding in a batch of
    two against transformers, the same 1e-4."""
    from kernels.gpu import attention as gpu_attention
    from kernels.gpu import delta_rule as gpu_delta_rule
    from kernels.gpu import moe as gpu_moe

    monkeypatch.setattr(gpu_moe, "BLOCK_N", 64)  # few-rows programs of 64 outputs, not 8 (tests/kernels: 8)
    model_dir = make_checkpoint(FEW_EXPERTS)  # top-2 of 8: few pairs, so the interpreter is quick
    llm = LLM(model=model_dir, warm_up=False)
    prompts = [_prompt(n, llm.config.vocab_size, n) for n in (1, 5, 65)]
    worst = max((logits - hf_logits(model_dir, ids)).abs().max().item()
                for ids, logits in zip(prompts, llm.score(prompts)))
    assert worst <= TOL
    outs = llm.generate(prompts[1:], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert [out.token_ids for out in outs] == [hf_greedy(model_dir, ids, 6) for ids in prompts[1:]]
    assert gpu_kernels_on_cpu == {gpu_attention.OP.name, gpu_delta_rule.OP.name, gpu_moe.OP.name,
                                  gpu_moe.FEW_ROWS.name}
