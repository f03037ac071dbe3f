"""Live expert placement changes: replicas, rebalancing and scaling expert workers mid-generation."""

from __future__ import annotations

import asyncio
import time

from cluster import LLM, AsyncLLM, ClusterConfig, SamplingParams
from cluster.model.tiny import TinySpec
from tests.conftest import worker_processes

SPEC = TinySpec(seed=12, num_experts=16, top_k=4)
PROMPTS = [[3, 4, 5], list(range(10, 40)), [7], list(range(100, 170))]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def expert_processes() -> int:
    return len(worker_processes("ExpertWorker"))


def wait_for(predicate, seconds: float = 20) -> bool:
    deadline = time.time() + seconds
    while not predicate() and time.time() < deadline:
        time.sleep(0.5)
    return predicate()


def test_logits_unchanged_after_rebalance_and_scaling(ray_cluster, make_checkpoint):
    model_dir = make_checkpoint(SPEC)
    reference = LLM(model=model_dir).score(PROMPTS)
    before = expert_processes()
    with LLM(model=model_dir, expert_workers=2, use_ray=True) as llm:
        llm.generate(PROMPTS, GREEDY)  # fills the load window
        load = llm.expert_load()
        assert load.shape == (4, 16) and int(load.sum()) > 0
        result = llm.rebalance(redundant_slots=6)
        assert result["after"].max_load <= result["before"].max_load
        assert sum(len(ids) for ids in result["placement"].held[0]) in (16, 22)
        checks = [llm.score(PROMPTS)]
        llm.scale_experts(3)
        assert expert_processes() == before + 3
        checks.append(llm.score(PROMPTS))
        llm.scale_experts(1)
        assert wait_for(lambda: expert_processes() == before + 1)
        checks.append(llm.score(PROMPTS))
        info = llm.worker_info()
        assert [i["role"] for i in info].count("expert") == 1
    for logits in checks:
        assert max((a - b).abs().max().item() for a, b in zip(logits, reference)) <= 1e-5
    assert wait_for(lambda: expert_processes() == before)  # nothing leaked


def test_rebalance_and_scale_out_in_the_middle_of_streams(ray_cluster, make_checkpoint):
    model_dir = make_checkpoint(SPEC)
    expected = [c.token_ids for c in LLM(model=model_dir).generate(PROMPTS, GREEDY)]
    engine = AsyncLLM(model_dir, cluster=ClusterConfig(expert_workers=2, use_ray=True))

    async def main():
        progress = [0] * len(PROMPTS)

        async def stream(i):
            tokens = []
            async for out in engine.generate(PROMPTS[i], GREEDY):
                tokens += out.new_token_ids
                progress[i] = len(tokens)
            return tokens

        tasks = [asyncio.create_task(stream(i)) for i in range(len(PROMPTS))]
        while min(progress) < 4:
            await asyncio.sleep(0.01)
        rebalanced = await engine.rebalance(redundant_slots=6)
        while min(progress) < 10:
            await asyncio.sleep(0.01)
        await engine.scale_experts(3)
        assert max(progress) < 24  # the changes really happened mid-stream
        return rebalanced, await asyncio.gather(*tasks)

    try:
        rebalanced, outputs = asyncio.run(main())
    finally:
        engine.shutdown()
    assert rebalanced["after"].max_load <= rebalanced["before"].max_load
    assert outputs == expected
