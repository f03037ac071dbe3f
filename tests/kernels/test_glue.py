"""kernels.backend.glue: the plain-torch glue that CUDA decode graphs run through torch.compile.
Here on CPU through dynamo and AOT autograd without code generation (backend aot_eager: the
tracing and functionalisation of the in-place cache and state writes are what could go wrong;
inductor's own kernels are checked against eager steps on a GPU, tests/cuda/test_engine.py)."""

from __future__ import annotations

import torch

from kernels import backend
from kernels.backend import compiled_glue, glue


def test_glue_runs_the_function_itself_outside_the_block_and_compiled_inside():
    calls = []

    @glue
    def scaled(x):
        calls.append(torch.compiler.is_compiling())
        return x * 2

    x = torch.arange(4.0)
    assert torch.equal(scaled(x), x * 2) and calls == [False]
    with compiled_glue("eager"):
        assert torch.equal(scaled(x), x * 2)
    assert calls[-1] is True  # traced by dynamo
    assert torch.equal(scaled(x), x * 2) and calls[-1] is False


def test_compiled_glue_gives_the_eager_steps(make_checkpoint):
    """The engine on the batched torch path (what a GPU runs), prefill, mixed and decode steps,
    with every @glue function compiled: the same logits and tokens as eagerly."""
    from cluster import LLM, SamplingParams
    from tests.conftest import FEW_EXPERTS

    loaded, backend._cpu_kernels = backend._cpu_kernels, False  # as on a device without C++ kernels
    try:
        llm = LLM(model=make_checkpoint(FEW_EXPERTS), dtype="float32", warm_up=False)
        prompts = [[5, 9, 13, 2, 7] * n for n in (1, 3, 13)]
        params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=1, ignore_eos=True)
        eager_logits, eager = llm.score(prompts), llm.generate(prompts, params)
        with compiled_glue("aot_eager"):
            compiled_logits, compiled = llm.score(prompts), llm.generate(prompts, params)
        llm.shutdown()
    finally:
        backend._cpu_kernels = loaded
    for a, b in zip(eager_logits, compiled_logits):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    for a, b in zip(eager, compiled):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5
