"""The LLM surface: text prompts, stopping, batching and input errors."""

from __future__ import annotations

import pytest

from cluster import LLM, SamplingParams
from cluster.model.tiny import TinySpec

SPEC = TinySpec(seed=7, num_experts=16, top_k=4)


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    return LLM(model=make_checkpoint(SPEC))


def test_text_prompt_round_trip(llm):
    [out] = llm.generate(["hello world"], SamplingParams(max_tokens=8, temperature=0.0))
    assert out.prompt == "hello world"
    assert out.prompt_token_ids == llm.tokenizer.encode("hello world")
    assert len(out.token_ids) == 8 and out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_batch_equals_one_by_one(llm):
    prompts = [[5, 6, 7], list(range(10, 90)), [42]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    together = llm.generate(prompts, params)
    for prompt, out in zip(prompts, together):
        assert llm.generate([prompt], params)[0].token_ids == out.token_ids


def test_stops_at_eos(llm):
    """Force the end-of-sequence token to be the greedy choice by scoring first."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    tokens = llm.generate([[9, 8, 7]], params)[0].token_ids
    eos = tokens[2]
    llm.tokenizer.eos_token_ids = (eos,)
    try:
        out = llm.generate([[9, 8, 7]], SamplingParams(max_tokens=6, temperature=0.0))[0]
    finally:
        llm.tokenizer.eos_token_ids = llm.config.eos_token_ids
    assert out.token_ids == tokens[: tokens.index(eos) + 1] and out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=123, ignore_eos=True)
    assert llm.generate([[1, 2, 3]], params)[0].token_ids == llm.generate([[1, 2, 3]], params)[0].token_ids


def test_score_releases_caches(llm):
    llm.score([[1, 2, 3], [4, 5]])
    assert llm.executor.num_cached_sequences() == 0


@pytest.mark.parametrize(
    "prompt, message",
    [([], "prompt is empty"), ([1, 10**6], "outside the vocabulary"), ([-1], "outside the vocabulary")],
)
def test_bad_prompts(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt])


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"temperature": -1.0}])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)
