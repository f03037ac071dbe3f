"""Scheduler policy with fake capacities: no model, no tensors."""

from __future__ import annotations

import pytest

from cluster.engine.cache_plan import CacheLayout
from cluster.engine.sampling import SamplingParams
from cluster.engine.scheduler import ContextLengthError, OverloadedError, Scheduler, SchedulerConfig
from cluster.engine.sequence import Sequence, Status


def layout(blocks: int, slots: int = 8, block_size: int = 4) -> CacheLayout:
    return CacheLayout(num_blocks=blocks, block_size=block_size, num_slots=slots, block_bytes=1, slot_bytes=1)


def seq(i: int, prompt_len: int, max_tokens: int = 8) -> Sequence:
    return Sequence(seq_id=i, request_id=f"r{i}", prompt_ids=list(range(1, prompt_len + 1)),
                    params=SamplingParams(max_tokens=max_tokens), seed=0,
                    max_total_tokens=prompt_len + max_tokens)


def run(s: Scheduler):
    """One step, then pretend the workers computed everything and sampled token 7."""
    scheduled, messages = s.schedule()
    for item in scheduled:
        item.seq.num_computed += item.num_tokens
        if item.sample:
            item.seq.output_ids.append(7)
    return scheduled, messages


def test_chunked_prefill_splits_a_long_prompt_under_the_budget():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=10), layout(100), 1, 1000)
    a = seq(0, 25)
    s.add(a)
    chunks = []
    for _ in range(3):
        scheduled, messages = run(s)
        chunks.append([(c.past, len(c.token_ids), c.sample) for c in messages[0].chunks])
    assert chunks == [[(0, 10, False)], [(10, 10, False)], [(20, 5, True)]]


def test_decodes_go_first_and_prefill_takes_the_rest_of_the_budget():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=8), layout(100), 1, 1000)
    a, b = seq(0, 3), seq(1, 20)
    s.add(a)
    run(s)  # a prefilled
    s.add(b)
    scheduled, messages = run(s)
    assert [(x.seq.seq_id, x.num_tokens) for x in scheduled] == [(0, 1), (1, 7)]


def test_messages_send_only_what_changed():
    s = Scheduler(SchedulerConfig(), layout(100, block_size=4), 1, 1000)
    s.add(seq(0, 5))
    _, [first] = run(s)
    c = first.chunks[0]
    assert c.past == 0 and c.slot >= 0 and c.sampling is not None and c.new_blocks == (0, 1)
    _, [second] = run(s)  # token 6 fits block 1: nothing new but the token
    c = second.chunks[0]
    assert (c.past, c.token_ids, c.new_blocks, c.slot, c.sampling) == (5, (7,), (), -1, None)
    run(s)
    run(s)  # positions 6 and 7 still fit block 1
    _, [fifth] = run(s)  # position 8 needs block 2
    assert fifth.chunks[0].new_blocks == (2,)


def test_admission_is_bounded_by_slots_and_blocks():
    s = Scheduler(SchedulerConfig(max_num_seqs=2), layout(100, slots=2), 1, 1000)
    for i in range(3):
        s.add(seq(i, 3))
    scheduled, _ = run(s)
    assert [x.seq.seq_id for x in scheduled] == [0, 1] and len(s.waiting) == 1

    s = Scheduler(SchedulerConfig(), layout(3, block_size=4), 1, 1000)
    for i in range(3):
        s.add(seq(i, 5, max_tokens=2))  # 2 blocks each
    scheduled, _ = run(s)
    assert [x.seq.seq_id for x in scheduled] == [0]  # FCFS: the second does not fit, nobody skips it


def test_preemption_frees_the_newest_and_recomputes_it_later():
    s = Scheduler(SchedulerConfig(), layout(4, block_size=4), 1, 1000)
    a, b = seq(0, 4, max_tokens=6), seq(1, 4, max_tokens=6)
    s.add(a)
    s.add(b)
    run(s)  # both prefilled: one block each, 2 free
    run(s)  # both decode position 4: one more block each, 0 free
    for _ in range(3):
        run(s)  # positions 5-7 fit
    scheduled, messages = run(s)  # position 8 for a needs a block: b is preempted
    assert b.status == Status.WAITING and b.num_computed == 0 and b.num_preemptions == 1
    assert messages[0].freed == (1,)
    assert [x.seq.seq_id for x in scheduled] == [0]
    assert s.waiting[0] is b  # recomputed first once there is room
    s.finish(a, "length")
    scheduled, messages = run(s)
    recomputed = messages[0].chunks[0]
    assert recomputed.seq_id == 1 and recomputed.past == 0
    assert len(recomputed.token_ids) == 4 + 5  # prompt + the 5 outputs it had
    assert b.num_tokens == 4 + 5 + 1  # and it sampled the next one


def test_finish_returns_every_block_and_slot():
    s = Scheduler(SchedulerConfig(), layout(10, slots=4), 2, 1000)
    seqs = [seq(i, 9) for i in range(4)]
    for x in seqs:
        s.add(x)
    run(s)
    assert {x.worker for x in seqs} == {0, 1}  # spread over both attention workers
    assert s.usage()["kv_blocks_used"] == 12
    for x in seqs:
        s.finish(x, "abort")
    usage = s.usage()
    assert usage["kv_blocks_used"] == 0 and usage["state_slots_used"] == 0
    freed = s.take_freed()
    assert sorted(freed[0].freed + freed[1].freed) == [0, 1, 2, 3]


def test_overload_and_context_errors():
    s = Scheduler(SchedulerConfig(max_waiting=2), layout(20, slots=1), 1, 64)
    for i in range(3):  # one will take the free slot at the next step, two wait
        s.add(seq(i, 3))
    with pytest.raises(OverloadedError, match="3 requests already waiting"):
        s.add(seq(3, 3))
    scheduled, _ = run(s)  # one is admitted and holds the slot: still full
    with pytest.raises(OverloadedError):
        s.add(seq(3, 3))
    s.finish(scheduled[0].seq, "length")  # its slot is free again: one more may queue
    s.add(seq(3, 3))
    with pytest.raises(ContextLengthError, match="prompt has 64 tokens; the model's context is 64"):
        s.check(64, 65)
    with pytest.raises(ContextLengthError, match="need 26 KV blocks"):
        s.check(50, 101)


def test_vision_cost_counts_in_the_budget_of_the_admitting_step():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=10), layout(100), 1, 1000)
    a, b, c = seq(0, 3), seq(1, 12), seq(2, 12)
    b.vision_cost, b.images = 6, ("an image",)
    c.vision_cost = 20  # above the whole budget: admitted alone, with one prompt token
    for x in (a, b, c):
        s.add(x)
    scheduled, messages = run(s)
    assert [(x.seq.seq_id, x.num_tokens) for x in scheduled] == [(0, 3), (1, 1)]  # 10 - 3 - 6 left 1
    assert [ch.images for ch in messages[0].chunks] == [(), ("an image",)]
    scheduled, messages = run(s)  # b's images were sent once; c waits for a step of its own
    assert [(x.seq.seq_id, x.num_tokens) for x in scheduled] == [(0, 1), (1, 9)]
    assert [ch.images for ch in messages[0].chunks] == [(), ()]
    s.finish(a, "stop")
    s.finish(b, "stop")
    scheduled, _ = run(s)
    assert [(x.seq.seq_id, x.num_tokens) for x in scheduled] == [(2, 1)]
