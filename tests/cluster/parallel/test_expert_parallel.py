"""Expert parallelism on Ray: every (E, A) layout computes the single-process function."""

from __future__ import annotations

import time

import pytest

from cluster import LLM, ClusterConfig, SamplingParams, SchedulerConfig
from router.placement import ExpertPlacement
from tests.conftest import FLAGSHIP_SHAPE, worker_processes
from tests.reference import hf_logits

# (expert workers, attention workers, two-batch overlap)
LAYOUTS = [(1, 1, True), (2, 1, True), (2, 1, False), (4, 1, True), (2, 2, True)]
PROMPTS = [[3], list(range(10, 17)), [(i * 37) % 400 + 3 for i in range(70)]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def single_process(make_checkpoint):
    llm = LLM(model=make_checkpoint(FLAGSHIP_SHAPE))
    return llm.score(PROMPTS), [c.token_ids for c in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("experts, attention, overlap", LAYOUTS,
                         ids=[f"E{e}A{a}" + ("" if o else "-no-overlap") for e, a, o in LAYOUTS])
def test_layout_matches_single_process_and_reference(
    ray_cluster, make_checkpoint, single_process, experts, attention, overlap
):
    model_dir = make_checkpoint(FLAGSHIP_SHAPE)
    ref_logits, ref_tokens = single_process
    cluster = ClusterConfig(expert_workers=experts, attention_workers=attention, use_ray=True,
                            two_batch_overlap=overlap)
    with LLM(model=model_dir, cluster=cluster) as llm:
        assert llm.executor.overlap == overlap
        logits = llm.score(PROMPTS)
        tokens = [c.token_ids for c in llm.generate(PROMPTS, GREEDY)]
        info = llm.worker_info()
    vs_local = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits))
    vs_hf = max((a - hf_logits(model_dir, p)).abs().max().item() for a, p in zip(logits, PROMPTS))
    print(f"E={experts} A={attention}: vs single process {vs_local:.1e}, vs transformers {vs_hf:.1e}")
    assert vs_local == 0.0  # the same bits: row-wise kernels, expert sums exact whatever the split
    assert vs_hf <= 1e-4
    assert tokens == ref_tokens

    expert_bytes = [i["expert_bytes"] for i in info if i["role"] == "expert"]
    total = ref_total_expert_bytes(llm.config)
    assert len(expert_bytes) == experts and sum(expert_bytes) == total
    assert max(expert_bytes) <= total / experts * 1.01  # each holds its 1/E share, no more
    assert all(i["bytes_read"] == i["expert_bytes"] for i in info if i["role"] == "expert")


def ref_total_expert_bytes(cfg) -> int:
    return cfg.num_hidden_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4


def test_mixed_batch_and_seeded_sampling_match_single_process(ray_cluster, make_checkpoint):
    """16 mixed-length prompts with chunked prefill, greedy and seeded: identical on E=2, A=2."""
    model_dir = make_checkpoint(FLAGSHIP_SHAPE)
    prompts = [[(7 * i + 13 * j) % 450 + 3 for j in range(1 + (i * 37) % 90)] for i in range(16)]
    seeded = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)
    budget = SchedulerConfig(max_num_batched_tokens=128)
    local = LLM(model=model_dir, scheduler=budget)
    expected = [c.token_ids for c in local.generate(prompts, GREEDY)]
    expected_seeded = [c.token_ids for c in local.generate(prompts[:4], seeded)]
    with LLM(model=model_dir, expert_workers=2, attention_workers=2, scheduler=budget) as llm:
        assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == expected
        assert [c.token_ids for c in llm.generate(prompts[:4], seeded)] == expected_seeded


def test_replicated_experts_match_single_process(ray_cluster, make_checkpoint, single_process):
    """Hot experts held twice: worker 1 also holds worker 0's first 64 experts, and vice versa."""
    model_dir = make_checkpoint(FLAGSHIP_SHAPE)
    base = ExpertPlacement.contiguous(512, 2, list(range(4)))
    held = {
        layer: (tuple(sorted(set(w0) | set(range(256, 320)))), tuple(sorted(set(w1) | set(range(64)))))
        for layer, (w0, w1) in base.held.items()
    }
    placement = ExpertPlacement(512, held)
    assert int(placement.tables(0).count.max()) == 2
    cluster = ClusterConfig(expert_workers=2, use_ray=True, placement=placement)
    with LLM(model=model_dir, cluster=cluster) as llm:
        logits = llm.score(PROMPTS)
        tokens = [c.token_ids for c in llm.generate(PROMPTS, GREEDY)]
    ref_logits, ref_tokens = single_process
    assert max((a - b).abs().max().item() for a, b in zip(logits, ref_logits)) <= 1e-5
    assert tokens == ref_tokens


def test_sequences_spread_over_attention_workers_and_are_released(ray_cluster, make_checkpoint):
    with LLM(model=make_checkpoint(FLAGSHIP_SHAPE), expert_workers=2, attention_workers=2) as llm:
        llm.generate(PROMPTS + PROMPTS, SamplingParams(max_tokens=3, temperature=0.0))
        assert llm.executor.num_cached_sequences() == 0
        # during a run both attention workers own sequences
        for i in range(4):
            llm.engine.add_request(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0))
        llm.engine.step()
        per_worker = [i["sequences"] for i in llm.worker_info() if i["role"] == "attention"]
        assert per_worker == [2, 2]
        while llm.engine.has_unfinished():
            llm.engine.step()
        llm.engine.flush()
        assert llm.executor.num_cached_sequences() == 0


def test_shutdown_leaves_no_actors_or_processes(ray_cluster, make_checkpoint):
    import ray

    llm = LLM(model=make_checkpoint(FLAGSHIP_SHAPE), expert_workers=2, attention_workers=1)
    workers = list(llm.executor.workers)
    assert len(worker_processes()) >= 3
    llm.shutdown()
    llm.shutdown()  # idempotent
    # ray.kill is asynchronous: a call sent right after it may still be answered, so each actor
    # must stop answering within the deadline rather than at once
    deadline = time.time() + 20
    for w in workers:
        while True:
            try:
                ray.get(w.info.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                break
            assert time.time() < deadline, "a killed worker still answers"
            time.sleep(0.2)
    while worker_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert worker_processes() == []
