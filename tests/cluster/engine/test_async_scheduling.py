"""Async scheduling (one process): step N + 1 is scheduled and launched before step N's tokens are
read, its decodes fed N's tokens on the device. On a CPU it gains nothing (the same cores do both)
but must give exactly what step-by-step scheduling gives: the same tokens, logprobs, stops and
finish reasons, with preemptions, aborts and penalties."""

from __future__ import annotations

import pytest
import torch

from cluster import LLM, CacheConfig, ClusterConfig, SamplingParams, SchedulerConfig
from cluster.config import ConfigError
from cluster.engine.engine import EngineCore
from cluster.model.tiny import TinySpec
from cluster.worker.step import FUTURE_TOKEN

SPEC = TinySpec(seed=8, num_experts=16, top_k=4)
ASYNC = ClusterConfig(async_scheduling=True)


def prompts(n: int = 12) -> list[list[int]]:
    return [[(7 * i + 13 * j) % 450 + 3 for j in range(1 + (i * 37) % 70)] for i in range(n)]


@pytest.fixture(scope="module")
def pair(make_checkpoint):
    """The same model scheduled step by step and ahead (a small token budget: chunked prefills
    share steps with decodes)."""
    scheduler = SchedulerConfig(max_num_batched_tokens=48)
    model = make_checkpoint(SPEC)
    return LLM(model=model, scheduler=scheduler), LLM(model=model, scheduler=scheduler, cluster=ASYNC)


def both(pair, prompts, params):
    step_by_step, ahead = pair
    assert not step_by_step.engine.async_scheduling and ahead.engine.async_scheduling
    return step_by_step.generate(prompts, params), ahead.generate(prompts, params)


def as_tuples(completions):
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason,
             [(lp.token_id, round(lp.logprob, 5), [(t, round(v, 5)) for t, v in lp.top]) for lp in c.logprobs])
            for c in completions]


def test_the_next_step_is_launched_with_the_tokens_of_the_one_in_flight(pair):
    _, ahead = pair
    executor = ahead.engine.executor
    launched, futures = executor.launch, []

    def spy(messages):
        futures.extend(t for m in messages for c in m.chunks for t in c.token_ids if t == FUTURE_TOKEN)
        return launched(messages)

    executor.launch = spy
    try:
        ahead.generate(prompts(3), SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    finally:
        executor.launch = launched
    assert len(futures) >= 3 * 6  # every decode after the first of each sequence reads a token in flight
    assert not ahead.engine.has_unfinished() and ahead.engine.scheduler.usage()["kv_blocks_used"] == 0


def test_greedy_tokens_and_logprobs_equal_step_by_step_scheduling(pair):
    params = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logprobs=3)
    step_by_step, ahead = both(pair, prompts(), params)
    assert as_tuples(ahead) == as_tuples(step_by_step)


def test_seeded_sampling_and_penalties_equal_step_by_step_scheduling(pair):
    sampled = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=7, ignore_eos=True)
    penalised = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=1.5,
                               frequency_penalty=0.5, repetition_penalty=1.3)
    # rewarding repeats: the token just sampled (in flight when the next step is launched) counts most
    rewarded = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, frequency_penalty=-2.0)
    for params in (sampled, penalised, rewarded):
        step_by_step, ahead = both(pair, prompts(6), params)
        assert as_tuples(ahead) == as_tuples(step_by_step)


def test_stops_end_sequences_at_the_same_token_and_the_row_in_flight_is_dropped(pair):
    step_by_step, _ = pair
    reference = step_by_step.generate(prompts(6), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    # each sequence stops at its 3rd-6th token; lengths differ, so some stop while others go on
    stops = [c.token_ids[3 + i % 4] for i, c in enumerate(reference)]
    params = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=stops, ignore_eos=True)
    by_step, ahead = both(pair, prompts(6), params)
    assert as_tuples(ahead) == as_tuples(by_step)
    assert any(c.finish_reason == "stop" for c in ahead) and any(len(c.token_ids) < 20 for c in ahead)
    text = reference[0].text
    if len(text) > 8:  # a stop string too (detokenised on the host, after the token is read)
        params = SamplingParams(max_tokens=20, temperature=0.0, stop=[text[4:7]], ignore_eos=True)
        by_step, ahead = both(pair, prompts(2), params)
        assert as_tuples(ahead) == as_tuples(by_step)
    assert pair[1].engine.scheduler.usage()["kv_blocks_used"] == 0


def test_scored_prompts_give_the_same_logits(make_checkpoint, pair):
    step_by_step, ahead = pair
    long = [p * 3 for p in prompts(3)]  # chunked over several steps (the budget is 48 tokens)
    for a, b in zip(ahead.score(long), step_by_step.score(long)):
        assert torch.equal(a, b)
    # a cache of 12 blocks of 4 tokens: scored prompts are preempted and scored again
    forty = [[(7 * i + 13 * j) % 450 + 3 for j in range(40)] for i in range(4)]
    cache, budget = CacheConfig(block_size=4, num_blocks=12), SchedulerConfig(max_num_batched_tokens=16)
    roomy = LLM(model=make_checkpoint(SPEC), scheduler=budget, cache=CacheConfig(block_size=4, num_blocks=200))
    expected = roomy.score(forty)
    tight = LLM(model=make_checkpoint(SPEC), scheduler=budget, cache=cache, cluster=ASYNC)
    preempted = []
    preempt = tight.engine.scheduler._preempt
    tight.engine.scheduler._preempt = lambda seq: (preempted.append(seq), preempt(seq))
    for a, b in zip(tight.score(forty), expected):
        assert torch.equal(a, b)
    assert preempted


def test_preemptions_keep_the_tokens(make_checkpoint, pair):
    short = [p[:12] for p in prompts(6)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = [c.token_ids for c in pair[0].generate(short, params)]
    tight = LLM(model=make_checkpoint(SPEC), cache=CacheConfig(block_size=4, num_blocks=12), cluster=ASYNC)
    scheduler, preempted = tight.engine.scheduler, []
    preempt = scheduler._preempt
    scheduler._preempt = lambda seq: (preempted.append(seq.pending), preempt(seq))
    assert [c.token_ids for c in tight.generate(short, params)] == expected
    assert preempted and any(preempted)  # some with a token in flight
    assert scheduler.usage()["kv_blocks_used"] == 0


def stepped(pair, n: int, params: SamplingParams, between) -> tuple[list[list[int]], list[list[int]]]:
    """n prompts through the async engine's step(), between(engine, tokens so far) called after each
    step; returns their tokens and those of step-by-step scheduling."""
    step_by_step, ahead = pair
    expected = [c.token_ids for c in step_by_step.generate(prompts(n), params)]
    engine, ids = ahead.engine, [f"stepped-{i}" for i in range(n)]
    for request_id, prompt in zip(ids, prompts(n)):
        engine.add_request(request_id, prompt, params)
    got = {request_id: [] for request_id in ids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        between(engine, [got[request_id] for request_id in ids])
    return [got[request_id] for request_id in ids], expected


def test_an_abort_with_its_row_in_flight_leaves_the_others_unchanged(pair):
    aborted = []

    def abort(engine, tokens):
        if not aborted and len(tokens[1]) >= 3 and engine._unread:
            aborted.append(engine.abort_request("stepped-1").finish_reason)

    got, expected = stepped(pair, 3, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True), abort)
    assert aborted == ["abort"] and got[0] == expected[0] and got[2] == expected[2]
    assert got[1] == expected[1][: len(got[1])] and len(got[1]) < len(expected[1])
    assert pair[1].engine.scheduler.usage()["kv_blocks_used"] == 0


def test_turning_it_off_between_steps_lands_the_step_in_flight(pair):
    steps = []

    def switch_off(engine, tokens):
        steps.append(bool(engine._unread))
        if len(steps) == 4:
            assert engine._unread
            engine.async_scheduling = False

    try:
        got, expected = stepped(pair, 2, SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True), switch_off)
    finally:
        pair[1].engine.async_scheduling = True
    assert got == expected and not any(steps[4:])


def test_refused_with_speculative_decoding(make_checkpoint):
    with pytest.raises(ConfigError, match="speculative"):
        EngineCore(make_checkpoint(SPEC), cluster=ASYNC, speculative_config={"num_speculative_tokens": 2},
                   warm_up=False)


def test_a_control_operation_reads_the_step_in_flight_first(pair):
    controlled = []

    def control(engine, tokens):
        if not controlled and engine._unread and all(tokens):
            engine._controlled("reading step timings", engine.executor.timings)
            controlled.append(not engine._unread and bool(engine._held))  # read, kept for the next step

    got, expected = stepped(pair, 2, SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True), control)
    assert controlled == [True] and got == expected


@pytest.mark.parametrize("fault", [None, "expert:1:9", "attention:0:10"])
def test_on_ray_layouts_and_through_a_lost_worker(ray_cluster, make_checkpoint, fault):
    """The engine sends step N + 1 to the workers before reading step N's replies; a worker lost
    with two steps unread costs a replay of both (expert) or a recompute (attention), no token."""
    from tests.conftest import FLAGSHIP_SHAPE

    model = make_checkpoint(FLAGSHIP_SHAPE)
    few = [[3], list(range(10, 17)), [(i * 37) % 400 + 3 for i in range(70)], [5, 6, 7, 8]]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    expected = [c.token_ids for c in LLM(model=model).generate(few, params)]
    cluster = ClusterConfig(expert_workers=2, use_ray=True, async_scheduling=True, fault_injection=fault)
    with LLM(model=model, cluster=cluster) as llm:
        executor, futures = llm.engine.executor, []
        launch = executor.launch
        executor.launch = lambda steps: (futures.extend(
            t for step in steps for c in step.chunks for t in c.token_ids if t == FUTURE_TOKEN), launch(steps))[1]
        assert [c.token_ids for c in llm.generate(few, params)] == expected
        assert futures
        recoveries = llm.engine.recoveries
        if fault is None:
            assert not recoveries
        elif fault.startswith("expert"):
            assert [r["replayed"] for r in recoveries] == [True]
        else:
            assert [r["recomputed"] for r in recoveries] == [len(few)]


def test_decodes_through_the_decode_graphs_static_rows_read_the_tokens_in_flight(make_checkpoint, pair):
    """The GPU's path on a CPU: decode steps through DecodeGraphs' padded static rows (eagerly here),
    their inputs fed from the step in flight, give step-by-step scheduling's tokens."""
    from cluster.worker.runner import ModelRunner

    params = SamplingParams(max_tokens=10, temperature=0.0, logprobs=1, ignore_eos=True)
    expected = as_tuples(pair[0].generate(prompts(5), params))
    llm = LLM(model=make_checkpoint(SPEC), scheduler=SchedulerConfig(max_num_batched_tokens=48), cluster=ASYNC,
              warm_up=False)
    runner = llm.engine.executor.runner = ModelRunner(llm.engine.executor.runner.model, llm.engine.scheduler.layout,
                                                      decode_graphs=True)
    assert as_tuples(llm.generate(prompts(5), params)) == expected
    assert runner.graphs.graphs  # decode steps went through them
