"""The in-process step copies device values to the host once (the sampled tokens), never inside
the forward: on a GPU every such copy stalls the step."""

from __future__ import annotations

from cluster import LLM, SamplingParams, SchedulerConfig
from cluster.worker.timing import count_host_syncs
from cluster.model.tiny import TinySpec

SPEC = TinySpec(seed=8, num_experts=16, top_k=4)


def test_one_host_sync_per_step_none_inside_the_forward(make_checkpoint):
    llm = LLM(model=make_checkpoint(SPEC), scheduler=SchedulerConfig(max_num_batched_tokens=64))
    engine, model = llm.engine, llm.executor.runner.model
    for i, n in enumerate([3, 40, 1, 90]):
        engine.add_request(f"r{i}", [5 + i] * n, SamplingParams(max_tokens=8, temperature=0.8 * (i % 2), seed=i,
                                                               ignore_eos=True))
    engine.step()  # admits all four; the 90-token prompt takes two more steps
    forward, inside = model.forward, []

    def counted_forward(*args, **kwargs):
        with count_host_syncs() as counts:
            out = forward(*args, **kwargs)
        inside.append(sum(counts.values()))
        return out

    model.forward = counted_forward
    try:
        for _ in range(3):  # decodes beside the rest of a chunked prefill, then decodes alone
            with count_host_syncs() as counts:
                engine.step()
            assert dict(counts) == {"tolist": 1}  # the sampled tokens
    finally:
        del model.forward
    assert inside == [0, 0, 0]
    while engine.has_unfinished():
        engine.step()
