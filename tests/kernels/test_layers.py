"""The composite ops (kernels.layers: a mixer or a MoE block in one C++ call, and every layer of a
forward in one call) give the very bits of the same kernels called one by one, in prefill chunks,
decodes and mixed steps, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

import attention.deltanet
import attention.gated_attention
import cluster.model.model
import router.moe_layer
from cluster import LLM, SamplingParams, SchedulerConfig
from cluster.model.tiny import TinySpec
from kernels import cpu_kernels_loaded, separate_layers, separate_sublayers

pytestmark = pytest.mark.skipif(not cpu_kernels_loaded(), reason="the C++ CPU kernels did not build")

PROMPTS = [[(7 * i + 5 * j) % 300 + 3 for j in range(4 + 19 * i)] for i in range(4)]  # 4 .. 61 tokens


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def llm(request, make_checkpoint):
    small_chunks = SchedulerConfig(max_num_batched_tokens=24)  # prefill chunks beside decodes
    return LLM(model=make_checkpoint(TinySpec(seed=5, num_experts=16, top_k=4)), dtype=request.param,
               scheduler=small_chunks)


@pytest.fixture
def calls(monkeypatch):
    """Counts the composite ops the model calls."""
    counts = {"deltanet_mixer": 0, "attention_mixer": 0, "moe_block": 0, "decoder_layers": 0}
    for module in (attention.deltanet, attention.gated_attention, router.moe_layer, cluster.model.model):
        for name in counts:
            if hasattr(module, name):
                op = getattr(module, name)

                def counted(*args, _op=op, _name=name):
                    counts[_name] += 1
                    return _op(*args)
                monkeypatch.setattr(module, name, counted)
    return counts


def run(llm):
    """The logits of the prompts scored, the tokens and logprobs of a generation, and the expert
    load counted over both."""
    load = llm.executor.runner.load
    load.reset()
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    outputs = llm.generate(PROMPTS, params)
    return llm.score(PROMPTS), [o.token_ids for o in outputs], [o.logprobs for o in outputs], load.totals()


def same_bits(a, b) -> bool:
    (logits, tokens, logprobs, load), (other_logits, other_tokens, other_logprobs, other_load) = a, b
    return (all(torch.equal(x, y) for x, y in zip(logits, other_logits)) and tokens == other_tokens
            and logprobs == other_logprobs and torch.equal(load, other_load))


def test_one_call_per_sublayer_and_per_forward_give_the_same_bits(llm, calls):
    with separate_sublayers():
        op_by_op = run(llm)
    assert not any(calls.values())
    assert op_by_op[3].sum() > 0
    with separate_layers():
        per_sublayer = run(llm)
    sublayer_ops = ("deltanet_mixer", "attention_mixer", "moe_block")
    assert calls["decoder_layers"] == 0 and all(calls[op] > 0 for op in sublayer_ops), calls
    assert same_bits(per_sublayer, op_by_op)  # the kernel counts routed pairs as record() does
    per_forward = run(llm)
    assert calls["decoder_layers"] > 0, calls
    assert same_bits(per_forward, op_by_op)


def test_one_call_forward_adds_the_moe_time_to_the_experts_phase(llm):
    timer = llm.executor.timer
    timer.reset()
    run(llm)
    assert timer.seconds["experts"] > 0 and timer.seconds["experts"] < timer.seconds["step"]
