"""MTP speculative decoding: lossless greedy in every layout, exact state rollback after partial
acceptance, rejection sampling that keeps the target's distribution, and the switch-off under load."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from cluster import LLM, ConfigError, SamplingParams, SchedulerConfig, SpeculativeConfig
from cluster.model.tiny import TinySpec
from cluster.worker.runner import ModelRunner
from cluster.worker.speculative import verify
from cluster.worker.step import SamplingSpec
from tests.conftest import FEW_EXPERTS

MTP_SHAPE = TinySpec(seed=4, num_experts=16, top_k=4, mtp=True)
PROMPTS = [[3], list(range(10, 17)), [(i * 37) % 400 + 3 for i in range(70)]]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def spec(k: int) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def plain_tokens(make_checkpoint):
    with LLM(model=make_checkpoint(MTP_SHAPE)) as llm:
        return [c.token_ids for c in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_is_lossless_single_process(make_checkpoint, plain_tokens, k):
    """A random MTP module is almost always wrong: every verify step rolls back (accepted = 0)."""
    with LLM(model=make_checkpoint(MTP_SHAPE), speculative_config=spec(k)) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
        stats = llm.spec_stats()
    assert [c.token_ids for c in outs] == plain_tokens
    assert stats["verify_steps"] > 0 and stats["drafted"] == k * stats["verify_steps"]
    assert stats["mean_accepted_length"] == 1 + stats["accepted"] / stats["verify_steps"]


@pytest.mark.parametrize("transactional, cpu_kernels", [(False, True), (True, True), (False, False)],
                         ids=["in-place", "double-buffered", "in-place-torch-ops"])
def test_rollback_after_partial_acceptance(make_checkpoint, plain_tokens, monkeypatch, transactional, cpu_kernels):
    """Drafts replaced by the right continuation with one wrong token at a varying place: every
    verify keeps 0..k drafts, the DeltaNet states and caches go back to just after them, and the
    tokens are those of plain decoding. Transactional (an attention worker's runner): the states
    from before the step are the rows it read, not a copy. Torch ops (the C++ kernels off, as on a
    GPU): the roll-back, which runs outside the model's forward, must not join autograd."""
    from kernels import backend

    k = 3
    if not cpu_kernels:
        monkeypatch.setattr(backend, "_cpu_kernels", False)
    if transactional:
        real_init = ModelRunner.__init__
        monkeypatch.setattr(ModelRunner, "__init__",
                            lambda self, *args, **kw: real_init(self, *args, **{**kw, "transactional": True}))
    references = [list(p) + t for p, t in zip(PROMPTS, plain_tokens)]
    calls = []
    real_draft = ModelRunner._draft

    def oracle_draft(self, chunks, results, hidden):
        real_draft(self, chunks, results, hidden)
        for chunk, result in zip(chunks, results):
            if not (chunk.spec_tokens and chunk.sample):
                continue
            seq = self.sequences[chunk.seq_id]
            known = seq.tokens + [result.token_id]
            [ref] = [r for r in references if r[: len(known)] == known]
            drafts = (ref[len(known): len(known) + k] + [0] * k)[:k]
            wrong = len(calls) % (k + 1)  # k: all right
            if wrong < k:
                drafts[wrong] = (drafts[wrong] + 1) % 400 + 3
            calls.append(wrong)
            seq.drafts = drafts
            seq.draft_probs = torch.nn.functional.one_hot(torch.tensor(drafts), self.model.cfg.vocab_size).float()

    monkeypatch.setattr(ModelRunner, "_draft", oracle_draft)
    with LLM(model=make_checkpoint(MTP_SHAPE), speculative_config=spec(k), warm_up=False) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
        stats = llm.spec_stats()
        per_request = [c for c in outs]
    assert [c.token_ids for c in per_request] == plain_tokens
    assert 0 < stats["accepted"] < stats["drafted"]
    assert stats["mean_accepted_length"] > 1.8  # the oracle's pattern keeps 0, 1, 2, 3 drafts in turn


def test_seeded_sampling_reproducible_and_stats_reported(make_checkpoint):
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=7, ignore_eos=True)
    with LLM(model=make_checkpoint(MTP_SHAPE), speculative_config=spec(2)) as llm:
        first = llm.generate(PROMPTS, params)
        again = llm.generate(PROMPTS, params)
        engine_outputs = []
        llm.engine.add_request("one", PROMPTS[1], GREEDY)
        while llm.engine.has_unfinished():
            engine_outputs += llm.engine.step()
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert all(len(c.token_ids) == 12 for c in first)
    last = engine_outputs[-1]
    assert last.finished and last.speculative["verify_steps"] > 0
    assert 0 <= last.speculative["acceptance_rate"] <= 1


def _draw(probs: torch.Tensor, rng: random.Random) -> int:
    return int(torch.searchsorted(probs.double().cumsum(0), torch.tensor([rng.random()], dtype=torch.float64),
                                  right=True).clamp(max=len(probs) - 1))


def test_rejection_sampling_keeps_the_target_distribution():
    """V = 6, k = 2, target and draft distributions far apart: over 20,000 seeds the first and the
    second emitted tokens follow the target's distributions (total variation < 0.02)."""
    torch.manual_seed(0)
    V, k, trials = 6, 2, 20_000
    logits = torch.randn(k + 1, V) * 1.5
    q = torch.softmax(torch.randn(k, V) * 1.5, dim=-1)
    target = torch.softmax(logits, dim=-1)
    firsts, seconds = Counter(), Counter()
    rng = random.Random(0)
    for seed in range(trials):
        drafts = [_draw(q[j], rng) for j in range(k)]
        emitted = verify(logits, SamplingSpec(temperature=1.0, seed=seed), [1, 2] + drafts, drafts, q)
        firsts[emitted[0][0]] += 1
        if len(emitted) > 1:
            seconds[emitted[1][0]] += 1
    for counts, p in ((firsts, target[0]), (seconds, target[1])):
        n = sum(counts.values())
        empirical = torch.tensor([counts[v] / n for v in range(V)])
        assert 0.5 * (empirical - p).abs().sum() < 0.02, (empirical, p)


def test_greedy_verify_keeps_drafts_until_the_first_mismatch():
    logits = torch.full((4, 8), -5.0)
    for row, best in enumerate([2, 5, 1, 7]):
        logits[row, best] = 5.0
    one_hot = torch.nn.functional.one_hot(torch.tensor([2, 5, 3]), 8).float()
    emitted = verify(logits, SamplingSpec(), [9, 2, 5, 3], [2, 5, 3], one_hot)
    assert [t for t, _, _ in emitted] == [2, 5, 1]  # two accepted, the third replaced by the argmax


def test_speculation_switches_off_under_load(make_checkpoint, plain_tokens):
    prompts = PROMPTS * 4  # 12 sequences > max_batch 4
    config = SpeculativeConfig(num_speculative_tokens=2, max_batch=4)
    with LLM(model=make_checkpoint(MTP_SHAPE), speculative_config=config, warm_up=False,
             scheduler=SchedulerConfig(max_num_seqs=16)) as llm:
        outs = llm.generate(prompts, GREEDY)
        assert llm.spec_stats()["verify_steps"] == 0
        alone = llm.generate(PROMPTS[:1], GREEDY)
        assert llm.spec_stats()["verify_steps"] > 0  # a new sequence on a quiet instance speculates
    assert [c.token_ids for c in outs] == plain_tokens * 4
    assert alone[0].token_ids == plain_tokens[0]


def test_bad_speculative_configs_are_refused(make_checkpoint):
    with pytest.raises(ConfigError, match="num_speculative_tokens must be in 1..3"):
        SpeculativeConfig.parse(spec(4))
    with pytest.raises(ConfigError, match="speculative method"):
        SpeculativeConfig.parse({"method": "eagle"})
    with pytest.raises(ConfigError, match="unknown speculative_config keys"):
        SpeculativeConfig.parse({"method": "mtp", "draft_model": "x"})
    with pytest.raises(ConfigError, match="MTP module"):
        LLM(model=make_checkpoint(FEW_EXPERTS), speculative_config=spec(1), warm_up=False)


def test_expert_parallel_greedy_is_lossless(ray_cluster, make_checkpoint, plain_tokens):
    """Ray, 1 attention + 2 expert workers: the MTP layer's experts live on the expert workers."""
    with LLM(model=make_checkpoint(MTP_SHAPE), expert_workers=2, use_ray=True, speculative_config=spec(2)) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
        stats = llm.spec_stats()
        experts = [i for i in llm.worker_info() if i["role"] == "expert"]
    assert [c.token_ids for c in outs] == plain_tokens
    assert stats["verify_steps"] > 0
    assert all(MTP_SHAPE.layers in info["experts_per_layer"] for info in experts)
