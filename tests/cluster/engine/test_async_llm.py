"""AsyncLLM: streaming, cancellation, refusals, and the server going on serving."""

from __future__ import annotations

import asyncio

import pytest

from cluster import AsyncLLM, ContextLengthError, OverloadedError, SamplingParams, SchedulerConfig
from cluster.model.tiny import TinySpec

SPEC = TinySpec(seed=9, num_experts=16, top_k=4)


@pytest.fixture(scope="module")
def engine(make_checkpoint):
    llm = AsyncLLM(make_checkpoint(SPEC), scheduler=SchedulerConfig(max_waiting=8, max_model_len=128))
    yield llm
    llm.shutdown()


async def collect(engine, prompt, params, request_id=None):
    return [o async for o in engine.generate(prompt, params, request_id)]


def test_streams_concurrent_requests(engine):
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def main():
        return await asyncio.gather(*(collect(engine, f"hello {i}", params) for i in range(6)))

    results = asyncio.run(main())
    for outs in results:
        assert sum(len(o.new_token_ids) for o in outs) == 8
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert outs[0].time_to_first_token is not None and outs[-1].num_output_tokens == 8
    tokens = [[t for o in outs for t in o.new_token_ids] for outs in results]
    alone = asyncio.run(collect(engine, "hello 3", params))
    assert [t for o in alone for t in o.new_token_ids] == tokens[3]


def test_cancel_by_leaving_the_stream_frees_the_request(engine):
    async def main():
        stream = engine.generate([5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True), "leaver")
        async for out in stream:
            if out.num_output_tokens >= 3:
                break
        await stream.aclose()  # what a disconnecting client's handler does
        await asyncio.sleep(0)

    asyncio.run(main())
    usage = engine.cache_usage()
    assert usage["running"] == 0 and usage["kv_blocks_used"] == 0 and usage["state_slots_used"] == 0


def test_refusals_are_raised_and_the_server_keeps_serving(engine):
    async def main():
        with pytest.raises(ContextLengthError):
            await collect(engine, list(range(3, 200)), SamplingParams())
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await collect(engine, [10**9], SamplingParams())
        with pytest.raises(ValueError, match="prompt is empty"):
            await collect(engine, "", SamplingParams())
        return await collect(engine, "still here?", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].num_output_tokens == 4


def test_overload_is_an_explicit_error(engine):
    async def main():
        params = SamplingParams(max_tokens=64, ignore_eos=True)
        streams = [engine.generate([3, 4], params) for _ in range(60)]  # 32 slots + 8 queued fit
        tasks = [asyncio.create_task(collect_stream(s)) for s in streams]
        return await asyncio.gather(*tasks, return_exceptions=True)

    async def collect_stream(stream):
        return [o async for o in stream]

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, OverloadedError)]
    served = [r for r in results if isinstance(r, list)]
    assert refused and served and len(refused) + len(served) == 60
    assert all(r[-1].num_output_tokens == 64 for r in served)


def test_a_slow_consumer_gets_merged_deltas(engine):
    """Deltas that queue up while the consumer is busy arrive merged, nothing lost or reordered."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1)

    async def slow():
        outs = []
        async for out in engine.generate("hello merged", params):
            outs.append(out)
            await asyncio.sleep(0.05)  # the engine runs ahead meanwhile
        return outs

    outs = asyncio.run(slow())
    fast = asyncio.run(collect(engine, "hello merged", params))
    # fewer messages than tokens: merged (not against the fast reader's count, which the engine,
    # ~24 tokens in a few ms on the toy, can outrun into merged deltas too)
    assert len(outs) < params.max_tokens
    assert [t for o in outs for t in o.new_token_ids] == [t for o in fast for t in o.new_token_ids]
    assert "".join(o.new_text for o in outs) == "".join(o.new_text for o in fast)
    assert [lp.token_id for o in outs for lp in o.logprobs] == [t for o in fast for t in o.new_token_ids]
    assert outs[-1].finished and outs[-1].num_output_tokens == 24 and outs[0].time_to_first_token is not None


def test_complete_returns_the_whole_request_at_once(engine):
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def main():
        wholes = await asyncio.gather(*(engine.complete(f"hello {i}", params) for i in range(4)))
        streamed = await collect(engine, "hello 2", params)
        with pytest.raises(ValueError, match="empty"):
            await engine.complete("", params)
        return wholes, streamed

    wholes, streamed = asyncio.run(main())
    assert all(w.finished and len(w.new_token_ids) == 8 == w.num_output_tokens for w in wholes)
    assert wholes[2].new_token_ids == [t for o in streamed for t in o.new_token_ids]
    assert wholes[2].new_text == "".join(o.new_text for o in streamed)
    assert not engine._held  # nothing left behind


def test_stream_interval_sends_the_first_token_alone_then_groups(engine):
    params = SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True)

    async def main():
        return [o async for o in engine.generate("hello", params, stream_interval=4)]

    grouped = asyncio.run(main())
    sizes = [len(o.new_token_ids) for o in grouped]
    assert sizes[0] == 1 and all(n >= 4 for n in sizes[1:-1]) and sum(sizes) == 11 and grouped[-1].finished
    plain = asyncio.run(collect(engine, "hello", params))
    assert [t for o in grouped for t in o.new_token_ids] == [t for o in plain for t in o.new_token_ids]
    assert "".join(o.new_text for o in grouped) == "".join(o.new_text for o in plain)


def test_the_engine_thread_takes_the_threads_asked_for_in_process(make_checkpoint, monkeypatch):
    """In process, ClusterConfig.threads_per_worker sets the engine thread's torch threads (a Serve
    replica running the model itself passes the CPUs it reserved); 1 otherwise."""
    import torch

    from cluster import ClusterConfig

    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    for cluster in (ClusterConfig(threads_per_worker=2), None):
        llm = AsyncLLM(make_checkpoint(SPEC), cluster=cluster) if cluster else AsyncLLM(make_checkpoint(SPEC))
        llm.shutdown()
    assert asked[:1] == [2] and asked[-1:] == [1]
