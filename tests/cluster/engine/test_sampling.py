"""SamplingParams validation and the sampler: filters, penalties, seeded draws, logprobs, and the
batched selection against the row-by-row reference."""

from __future__ import annotations

import pytest
import torch

from cluster.worker.sampler import sample_batch, sampling_tensors
from cluster.engine.sampling import SamplingParams
from cluster.worker.step import SamplingSpec
from kernels.sampling import apply_penalties, filter_logits, sample, sample_reference


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
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])

    def keep(spec):
        return torch.isfinite(filter_logits(logits, sampling_tensors([spec], [[0]], 5).draws)).tolist()[0]

    assert keep(SamplingSpec(temperature=1.0, top_k=2)) == [True, True, False, False, False]
    # probs ~ [.64, .24, .09, .03, .01]: top_p .8 keeps the first two (.64 < .8 <= .88)
    assert keep(SamplingSpec(temperature=1.0, top_p=0.8)) == [True, True, False, False, False]
    assert keep(SamplingSpec(temperature=1.0, top_p=0.5)) == [True, False, False, False, False]
    assert keep(SamplingSpec(temperature=1.0, min_p=0.1)) == [True, True, True, False, False]
    # rows filter by their own values in one batch
    specs = [SamplingSpec(temperature=1.0, top_k=2), SamplingSpec(temperature=1.0, top_p=0.5),
             SamplingSpec(temperature=1.0)]
    kept = torch.isfinite(filter_logits(logits.repeat(3, 1), sampling_tensors(specs, [[0]] * 3, 5).draws))
    assert kept.sum(-1).tolist() == [2, 1, 5]


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    spec = SamplingSpec(repetition_penalty=2.0, prompt_len=1)
    assert apply_penalties(logits, sampling_tensors([spec], [[0, 1]], 4).penalties).tolist() == [[1.0, -4.0, 1.0, 0.5]]
    spec = SamplingSpec(presence_penalty=0.5, frequency_penalty=0.25, prompt_len=1)
    # prompt token 0 is not penalised; output tokens 2, 2, 3
    penalised = apply_penalties(logits, sampling_tensors([spec], [[0, 2, 2, 3]], 4).penalties)
    assert penalised.tolist() == [[2.0, -2.0, 0.0, -0.25]]


def test_seeded_draws_depend_on_seed_and_position_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    spec = SamplingSpec(temperature=1.0, seed=7, prompt_len=2)
    alone = sample_batch(logits[1:2], [spec], [[1, 2, 3]])[0][0]
    in_batch = sample_batch(logits, [SamplingSpec(temperature=1.0, seed=1), spec, SamplingSpec()],
                            [[5], [1, 2, 3], [6]])[1][0]
    assert alone == in_batch
    draws = {sample_batch(logits[1:2], [SamplingSpec(temperature=1.0, seed=s)], [[1]])[0][0] for s in range(20)}
    assert len(draws) > 3  # different seeds, different tokens


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.log()[None]
    tokens = [sample_batch(logits, [SamplingSpec(temperature=1.0, seed=s)], [[0]])[0][0] for s in range(3000)]
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / len(tokens)
    assert freq[3] == 0 and (freq - probs).abs().max() < 0.03


def test_batched_selection_equals_row_by_row():
    g = torch.Generator().manual_seed(3)
    V = 300
    specs = [
        SamplingSpec(), SamplingSpec(temperature=0.7, seed=1), SamplingSpec(temperature=1.3, top_k=5, seed=2),
        SamplingSpec(temperature=1.0, top_p=0.6, seed=3), SamplingSpec(temperature=0.9, min_p=0.2, seed=4),
        SamplingSpec(temperature=1.0, top_k=40, top_p=0.9, min_p=0.01, seed=5, logprobs=3),
        SamplingSpec(repetition_penalty=1.5, prompt_len=2, logprobs=0),
        SamplingSpec(temperature=1.0, presence_penalty=0.8, frequency_penalty=0.3, seed=6, prompt_len=1),
    ] * 2
    histories = [torch.randint(0, V, (1 + i % 7,), generator=g).tolist() for i in range(len(specs))]
    logits = 3 * torch.randn(len(specs), V, generator=g)
    st = sampling_tensors(specs, histories, V)
    fast, ref = sample(logits, st), sample_reference(logits, st)
    assert torch.equal(fast.tokens, ref.tokens)
    assert torch.allclose(fast.logprobs, ref.logprobs) and torch.equal(fast.top_ids, ref.top_ids)


def test_logprobs_are_raw_model_logprobs():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    token, logprob, top = sample_batch(logits, [SamplingSpec(temperature=0.0, logprobs=2)], [[0]])[0]
    raw = torch.log_softmax(logits[0], -1)
    assert token == 1 and logprob == pytest.approx(raw[1].item())
    assert [t for t, _ in top] == [1, 2] and top[1][1] == pytest.approx(raw[2].item())


def test_logit_bias_steers_selection_but_not_logprobs(make_checkpoint):
    """A biased and an unbiased request in one batch: the bias moves only its own row."""
    from cluster import LLM, SamplingParams
    from tests.conftest import FLAGSHIP_SHAPE

    llm = LLM(model=make_checkpoint(FLAGSHIP_SHAPE), warm_up=False)
    greedy = dict(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    [reference] = llm.generate([[5, 6, 7]], SamplingParams(**greedy))
    requests = {"plain": SamplingParams(**greedy),
                "forced": SamplingParams(**greedy, logit_bias={42: 100.0}),
                "banned": SamplingParams(**greedy, logit_bias={reference.token_ids[0]: -100.0})}
    for request_id, params in requests.items():
        llm.engine.add_request(request_id, [5, 6, 7], params)
    tokens = {request_id: [] for request_id in requests}
    logprobs = {request_id: [] for request_id in requests}
    while llm.engine.has_unfinished():
        for out in llm.engine.step():
            tokens[out.request_id] += out.new_token_ids
            logprobs[out.request_id] += [lp.logprob for lp in out.logprobs]
    assert tokens["plain"] == reference.token_ids
    assert tokens["forced"] == [42] * 6
    assert tokens["banned"][0] != reference.token_ids[0]
    assert all(lp < -1e-3 for lp in logprobs["forced"])  # the model's own logprob of token 42, not 0
