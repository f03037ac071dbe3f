"""SamplingParams validation and the sampler's filters, penalties and seeded draws."""

from __future__ import annotations

import pytest
import torch

from cluster.sampler import apply_penalties, filter_logits, sample_batch
from cluster.sampling import SamplingParams
from cluster.step import SamplingSpec


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": 0}, {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2},
    {"min_p": 2.0}, {"presence_penalty": 3.0}, {"frequency_penalty": -2.5}, {"repetition_penalty": 0.0},
    {"logprobs": 21}, {"seed": -1}, {"stop": [""]}, {"stop_token_ids": [-3]},
])
def test_invalid_values_are_named(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got "):
        SamplingParams(**kwargs)


def test_normalisation():
    p = SamplingParams(stop="###", top_k=-1, stop_token_ids=[5])
    assert p.stop == ("###",) and p.top_k == 0 and p.stop_token_ids == (5,)


def test_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    keep = lambda spec: torch.isfinite(filter_logits(logits, spec)).tolist()  # noqa: E731
    assert keep(SamplingSpec(temperature=1.0, top_k=2)) == [True, True, False, False, False]
    # probs ~ [.64, .24, .09, .03, .01]: top_p .8 keeps the first two (.64 < .8 <= .88)
    assert keep(SamplingSpec(temperature=1.0, top_p=0.8)) == [True, True, False, False, False]
    assert keep(SamplingSpec(temperature=1.0, top_p=0.5)) == [True, False, False, False, False]
    assert keep(SamplingSpec(temperature=1.0, min_p=0.1)) == [True, True, True, False, False]


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    spec = SamplingSpec(repetition_penalty=2.0, prompt_len=1)
    assert apply_penalties(logits.clone(), spec, [0, 1]).tolist() == [1.0, -4.0, 1.0, 0.5]
    spec = SamplingSpec(presence_penalty=0.5, frequency_penalty=0.25, prompt_len=1)
    # prompt token 0 is not penalised; output tokens 2, 2, 3
    assert apply_penalties(logits.clone(), spec, [0, 2, 2, 3]).tolist() == [2.0, -2.0, 0.0, -0.25]


def test_seeded_draws_depend_on_seed_and_position_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    spec = SamplingSpec(temperature=1.0, seed=7, prompt_len=2)
    alone = sample_batch(logits[1:2], [spec], [[1, 2, 3]])[0][0]
    in_batch = sample_batch(logits, [SamplingSpec(temperature=1.0, seed=1)] * 3 and
                            [SamplingSpec(temperature=1.0, seed=1), spec, SamplingSpec()],
                            [[5], [1, 2, 3], [6]])[1][0]
    assert alone == in_batch
    draws = {sample_batch(logits[1:2], [SamplingSpec(temperature=1.0, seed=s)], [[1]])[0][0] for s in range(20)}
    assert len(draws) > 3  # different seeds, different tokens


def test_logprobs_are_raw_model_logprobs():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    token, logprob, top = sample_batch(logits, [SamplingSpec(temperature=0.0, logprobs=2)], [[0]])[0]
    raw = torch.log_softmax(logits[0], -1)
    assert token == 1 and logprob == pytest.approx(raw[1].item())
    assert [t for t, _ in top] == [1, 2] and top[1][1] == pytest.approx(raw[2].item())
