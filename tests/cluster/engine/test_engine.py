"""The serving engine end to end in one process: batching, sampling, stops, cancellation, limits."""

from __future__ import annotations

import pytest
import torch

from cluster import (
    LLM, CacheConfig, ContextLengthError, OverloadedError, SamplingParams, SchedulerConfig,
)
from cluster.model.tiny import TinySpec

SPEC = TinySpec(seed=8, num_experts=16, top_k=4)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def mixed_prompts(n: int = 16) -> list[list[int]]:
    return [[(7 * i + 13 * j) % 450 + 3 for j in range(1 + (i * 37) % 90)] for i in range(n)]


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    # a small token budget so that batches mix chunked prefills with decodes
    return LLM(model=make_checkpoint(SPEC), scheduler=SchedulerConfig(max_num_batched_tokens=64))


def test_greedy_alone_equals_inside_a_batch_of_16(llm):
    prompts = mixed_prompts()
    batched = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in prompts[:4]]
    assert alone == batched[:4]


def test_preemption_by_recomputation_keeps_outputs(make_checkpoint, llm):
    """A cache of 12 blocks of 4 tokens forces preemptions; greedy outputs do not change."""
    prompts = mixed_prompts(6)
    prompts = [p[:12] for p in prompts]
    expected = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    tight = LLM(model=make_checkpoint(SPEC), cache=CacheConfig(block_size=4, num_blocks=12))
    outputs = [c.token_ids for c in tight.generate(prompts, GREEDY)]
    assert outputs == expected
    assert tight.engine.scheduler.usage()["kv_blocks_used"] == 0


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(llm):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], params)[0].token_ids
    batch = llm.generate([[9, 9], [5, 6, 7], [1]], params)
    assert batch[1].token_ids == alone
    assert llm.generate([[5, 6, 7]], params)[0].token_ids == alone
    other = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0.9, seed=99, ignore_eos=True))
    assert other[0].token_ids != alone


def test_stop_strings_cut_the_text(llm):
    base = llm.generate(["hello world"], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    assert len(base.text) > 12
    stop = base.text[5:8]
    first = base.text.find(stop)
    out = llm.generate(["hello world"], SamplingParams(max_tokens=24, temperature=0.0, stop=[stop, "\x00never"]))[0]
    assert out.text == base.text[:first] and out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(base.token_ids)
    kept = llm.generate(["hello world"], SamplingParams(max_tokens=24, temperature=0.0, stop=stop,
                                                       include_stop_str_in_output=True))[0]
    assert kept.text == base.text[: first + len(stop)]


def test_streamed_deltas_never_show_a_stop_string(llm):
    base = llm.generate(["hello world"], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    stop = base.text[9:13]
    engine = llm.engine
    engine.add_request("stream", "hello world", SamplingParams(max_tokens=24, temperature=0.0, stop=stop))
    deltas = []
    while engine.has_unfinished():
        deltas += [o.new_text for o in engine.step()]
    assert stop not in "".join(deltas[:-1]) and "".join(deltas) == base.text[: base.text.find(stop)]


def test_stop_token_ids_and_length(llm):
    base = llm.generate([[4, 5]], GREEDY)[0].token_ids
    out = llm.generate([[4, 5]], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[base[3]]))[0]
    assert out.token_ids == base[: base.index(base[3]) + 1] and out.stop_reason == base[3]
    assert llm.generate([[4, 5]], GREEDY)[0].finish_reason == "length"


def test_logprobs_match_scored_logits(llm):
    prompt = [11, 12, 13]
    out = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, ignore_eos=True))[0]
    logits = llm.score([prompt + out.token_ids])[0]
    raw = torch.log_softmax(logits, -1)
    for i, lp in enumerate(out.logprobs):
        row = raw[len(prompt) - 1 + i]
        assert lp.token_id == out.token_ids[i] and lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        assert lp.top[0][0] == int(row.argmax())


def test_cancellation_returns_every_block_and_slot(llm):
    engine = llm.engine
    for i in range(5):
        engine.add_request(f"c{i}", mixed_prompts(5)[i][:10], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    usage = engine.cache_usage()
    assert usage["kv_blocks_used"] > 0 and usage["state_slots_used"] == 5
    outs = [engine.abort_request(f"c{i}") for i in range(5)]
    assert all(o.finished and o.finish_reason == "abort" for o in outs)
    usage = engine.cache_usage()
    assert usage["kv_blocks_used"] == 0 and usage["state_slots_used"] == 0 and usage["running"] == 0
    engine.flush()
    assert llm.executor.num_cached_sequences() == 0
    assert not engine.has_unfinished()


def test_overload_is_refused_with_a_clear_error(make_checkpoint):
    small = LLM(model=make_checkpoint(SPEC), scheduler=SchedulerConfig(max_waiting=1, max_num_seqs=2))
    for name in "abc":  # two free slots + one queue place
        small.engine.add_request(name, [1, 2], GREEDY)
    with pytest.raises(OverloadedError, match="overloaded"):
        small.engine.add_request("d", [1, 2], GREEDY)
    for _ in range(12):
        small.engine.step()  # a and b finish, c runs: the queue has room again
    assert [c.finish_reason for c in small.generate([[3, 4]], GREEDY)] == ["length"]


def test_context_errors(make_checkpoint, llm):
    short = LLM(model=make_checkpoint(SPEC), scheduler=SchedulerConfig(max_model_len=32))
    with pytest.raises(ContextLengthError, match="prompt has 40 tokens; the model's context is 32"):
        short.generate([list(range(3, 43))], GREEDY)
    out = short.generate([list(range(3, 30))], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 32 - 27 and out.finish_reason == "length"  # stopped at the context
    with pytest.raises(ValueError, match="already in use"):
        llm.engine.add_request("dup", [1], GREEDY)
        llm.engine.add_request("dup", [1], GREEDY)
    llm.engine.abort_request("dup")


def test_logits_do_not_depend_on_the_batch(llm):
    """A sequence's logits are the same bits alone, inside a batch of mixed prefills and decodes,
    and split into two micro-batches: every kernel is row-wise, expert sums are exact."""
    prompts = mixed_prompts(12)
    alone = llm.score([prompts[3]])[0]
    assert torch.equal(llm.score(prompts)[3], alone)
    runner = llm.executor.runner
    runner.overlap = True
    try:
        assert torch.equal(llm.score(prompts)[3], alone)
    finally:
        runner.overlap = False


def test_block_tables_grow_and_reused_slots_keep_outputs(make_checkpoint, llm):
    """Blocks of 2 tokens: a 300-token prompt's table outgrows the runner's tables (64 entries, 128
    after the warm-up's sequences) while its prefill chunks come in, and the short prompts after it
    reuse its slot over stale entries; greedy outputs equal 16-token blocks'."""
    prompts = [mixed_prompts(16)[i] for i in (2, 1, 5)]
    prompts[0] = prompts[0] * 4
    assert len(prompts[0]) > 2 * 128
    expected = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    small = LLM(model=make_checkpoint(SPEC), cache=CacheConfig(block_size=2, num_blocks=400),
                scheduler=SchedulerConfig(max_num_batched_tokens=32))  # the table grows over chunks
    assert [small.generate([p], GREEDY)[0].token_ids for p in prompts] == expected


def test_block_tables_gather_rows_of_slots():
    from attention import BlockTables

    tables = BlockTables(num_slots=3, width=2)
    tables.write(2, 0, (7, 8))
    tables.write(0, 0, (1, 2))
    tables.write(0, 2, (3, 4, 5))  # grows to width 5, keeping what was written
    assert tables.gather(torch.tensor([0, 2]), 5).tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0]]
    assert tables.gather(torch.tensor([2]), 2).tolist() == [[7, 8]]


def test_a_scored_prompt_preempted_half_way_gives_its_logits_once(make_checkpoint):
    """Generations growing into a 12-block cache preempt a prompt being scored after some of its
    chunks came back; scored again from its start, it gives one row per token (not the earlier
    chunks twice), equal to the logits of a cache with room."""
    forty = [(13 * j) % 450 + 3 for j in range(40)]
    budget = SchedulerConfig(max_num_batched_tokens=16)
    expected = LLM(model=make_checkpoint(SPEC), scheduler=budget,
                   cache=CacheConfig(block_size=4, num_blocks=200)).score([forty])[0]
    engine = LLM(model=make_checkpoint(SPEC), scheduler=budget, cache=CacheConfig(block_size=4, num_blocks=12)).engine
    preempted = []
    preempt = engine.scheduler._preempt
    engine.scheduler._preempt = lambda seq: (preempted.append(seq.score_only and seq.num_computed > 0), preempt(seq))
    for i in range(2):
        engine.add_request(f"g{i}", [5 + i, 6, 7], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    engine.step()
    engine.add_request("scored", forty, SamplingParams(max_tokens=1), score_only=True)
    logits = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == "scored" and out.finished:
                logits = out.prompt_logits
    assert any(preempted)  # after some of its chunks were computed
    assert logits.shape == expected.shape and torch.equal(logits, expected)
