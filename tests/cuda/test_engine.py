"""The engine on CUDA against the engine on CPU (fp32 logits and greedy tokens; images, MTP, FP8
checkpoints), the MoE exchange with rows and banks on the GPU, bf16 decode through CUDA graphs and
compiled glue against eager steps, async scheduling. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.cuda.test_kernels import TOLERANCE, error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_engine_on_cuda_gives_the_cpu_engines_logits_and_tokens(make_checkpoint):
    from cluster import LLM, SamplingParams
    from tests.conftest import FEW_EXPERTS

    model = make_checkpoint(FEW_EXPERTS)
    prompts = [[5, 9, 13, 2, 7] * n for n in (1, 3, 30)]
    results = {}
    for device in ("cpu", "cuda"):
        llm = LLM(model=model, dtype="float32", device=device, warm_up=False)
        assert llm.engine.executor.runner.graphs is None  # fp32 steps eagerly (decode_graphs.supported)
        greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        results[device] = ([t.float().cpu() for t in llm.score(prompts)],
                           [c.token_ids for c in llm.generate(prompts, greedy)])
        llm.shutdown()
    for cpu, cuda in zip(results["cpu"][0], results["cuda"][0]):
        assert error(cuda, cpu) <= 1e-4, error(cuda, cpu)
    assert results["cpu"][1] == results["cuda"][1]


@pytest.mark.parametrize("dtype", TOLERANCE)
def test_the_moe_exchange_with_rows_and_banks_on_cuda(dtype):
    """What a Ray layout's workers do on GPUs (without Ray): the attention side's rows copied to the
    host once and sent over links to two expert workers (threads) whose banks are on the GPU, their
    fp64 partial sums back onto the GPU and added: one shard holding every expert's rows."""
    from tests.cluster.parallel.test_exchange import exchange_on_one_device

    combined, whole = exchange_on_one_device("cuda", dtype)
    assert combined.is_cuda and combined.dtype == dtype
    assert error(combined, whole) <= TOLERANCE[dtype], error(combined, whole)


def test_images_on_cuda_give_the_cpu_engines_logits_and_tokens(make_checkpoint):
    """Prompts with images (the vision tower, M-RoPE positions, the image rows' embeddings) on
    CUDA in fp32 against the CPU engine, chunked prefill splitting the image tokens."""
    from cluster import LLM, SamplingParams
    from cluster.engine.scheduler import SchedulerConfig
    from tests.cluster.model.test_multimodal import SPEC, prompts

    model = make_checkpoint(SPEC)
    requests = [{"prompt_token_ids": ids, "images": images} for ids, images in prompts(model)]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results = {}
    for device in ("cpu", "cuda"):
        with LLM(model=model, dtype="float32", device=device, warm_up=False,
                 scheduler=SchedulerConfig(max_num_batched_tokens=8)) as llm:
            results[device] = ([t.float().cpu() for t in llm.score(requests)],
                               [c.token_ids for c in llm.generate(requests, greedy)])
    for cpu, cuda in zip(results["cpu"][0], results["cuda"][0]):
        assert error(cuda, cpu) <= 1e-4, error(cuda, cpu)
    assert results["cpu"][1] == results["cuda"][1]


def test_mtp_speculative_decoding_on_cuda(make_checkpoint):
    """Verify steps, the DeltaNet roll-back after rejected drafts (outside the model's forward) and
    the drafts on CUDA: fp32 greedy tokens those of the CPU engine without speculation; bf16 runs
    its verify steps (through the same kernels as prefill chunks) to the requested lengths."""
    from cluster import LLM, SamplingParams
    from tests.cluster.engine.test_speculative import MTP_SHAPE, PROMPTS

    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    speculative = {"method": "mtp", "num_speculative_tokens": 2}
    with LLM(model=make_checkpoint(MTP_SHAPE), dtype="float32", device="cpu", warm_up=False) as llm:
        plain = [c.token_ids for c in llm.generate(PROMPTS, greedy)]
    for dtype in ("float32", "bfloat16"):
        with LLM(model=make_checkpoint(MTP_SHAPE), dtype=dtype, device="cuda", warm_up=False,
                 speculative_config=speculative) as llm:
            tokens = [c.token_ids for c in llm.generate(PROMPTS, greedy)]
            assert llm.spec_stats()["verify_steps"] > 0
        assert tokens == plain if dtype == "float32" else all(len(t) == 12 for t in tokens)


def test_an_fp8_checkpoint_computes_with_its_weights_as_stored(make_checkpoint, tmp_path):
    """An FP8 checkpoint in bf16 on a GPU with e4m3: its experts and dense linear layers stay FP8
    (decode steps through CUDA graphs), its scores within bf16's tolerance of its dequantised
    copy's, its greedy tokens those of the copy for most prompts."""
    from cluster import LLM, SamplingParams
    from cluster.model.quantization import write_fp8_checkpoint
    from kernels import Fp8Weight
    from kernels.moe import fp8_banks_supported
    from tests.conftest import FEW_EXPERTS

    if not fp8_banks_supported("cuda", torch.bfloat16):
        pytest.skip("this GPU has no e4m3 (sm_89+) or no Triton: FP8 checkpoints are dequantised at load")
    fp8, exact = tmp_path / "fp8", tmp_path / "exact"
    write_fp8_checkpoint(make_checkpoint(FEW_EXPERTS), fp8, block=(32, 32), dequantised=exact)
    prompts = [[5, 9, 13, 2, 7] * n for n in (1, 3, 30)]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results = []
    for model in (fp8, exact):
        llm = LLM(model=str(model), dtype="bfloat16", device="cuda", warm_up=False)
        if model == fp8:
            assert isinstance(llm.engine.executor.runner.model.layers[3].self_attn.qkv, Fp8Weight)
        scores = [t.float().cpu() for t in llm.score(prompts)]
        results.append((scores, [c.token_ids for c in llm.generate(prompts, greedy)]))
        llm.shutdown()
    (fp8_scores, fp8_tokens), (exact_scores, exact_tokens) = results
    for a, b in zip(fp8_scores, exact_scores):
        assert error(a, b) <= TOLERANCE[torch.bfloat16], error(a, b)
    assert sum(a == b for a, b in zip(fp8_tokens, exact_tokens)) >= 2


def test_fp8_activations_in_the_engine_on_cuda(make_checkpoint, tmp_path, monkeypatch):
    """ClusterConfig(fp8_activations=True) on a GPU with e4m3: an FP8 checkpoint's prefill steps launch
    the W8A8 kernels, its scores near the W8A16 run's (the activations' rounding: on this random
    toy ~0.14 of a logit's spread in fp32 through the interpreter)."""
    from cluster import LLM, ClusterConfig
    from cluster.model.quantization import write_fp8_checkpoint
    from kernels.gpu import fp8_activations as w8a8
    from kernels.moe import fp8_banks_supported
    from tests.conftest import FEW_EXPERTS

    if not fp8_banks_supported("cuda", torch.bfloat16):
        pytest.skip("this GPU has no e4m3 (sm_89+): FP8 checkpoints are dequantised at load")
    write_fp8_checkpoint(make_checkpoint(FEW_EXPERTS), tmp_path / "fp8", block=(32, 32))
    launched, launch = [], w8a8.GROUPED_A8.launch
    monkeypatch.setattr(w8a8.GROUPED_A8, "launch", lambda run, *args: launched.append(args) or launch(run, *args))
    monkeypatch.setattr(w8a8, "_on", False)  # restored after the test
    prompts = [list(range(10, 55)), [5, 9, 13, 2, 7] * 30]
    scores = {}
    for on in (False, True):
        with LLM(model=str(tmp_path / "fp8"), dtype="bfloat16", device="cuda", warm_up=False,
                 cluster=ClusterConfig(fp8_activations=on)) as llm:
            scores[on] = [t.float().cpu() for t in llm.score(prompts)]
    assert launched and w8a8.GROUPED_A8.unavailable is None
    for a, b in zip(scores[True], scores[False]):
        assert 0 < (a - b).abs().mean() <= 0.5 * b.std(), ((a - b).abs().mean(), b.std())


def test_bf16_decode_through_graphs_follows_eager_steps(make_checkpoint):
    """bf16 on CUDA (flash-linear-attention when installed): decode steps replayed from CUDA graphs
    (batch padded to its bucket) against the same engine stepping eagerly."""
    from cluster import LLM, SamplingParams
    from tests.conftest import FEW_EXPERTS

    prompts = [[5, 9, 13, 2, 7] * n for n in (1, 3, 30)]
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=1, ignore_eos=True)
    llm = LLM(model=make_checkpoint(FEW_EXPERTS), dtype="bfloat16", device="cuda", warm_up=False)
    runner = llm.engine.executor.runner
    assert runner.graphs is not None
    replayed = llm.generate(prompts, params)
    assert runner.graphs.graphs, "no decode step went through a graph"
    runner.graphs = None
    eager = llm.generate(prompts, params)
    llm.shutdown()
    for a, b in zip(replayed, eager):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) <= 0.05


def test_the_warm_up_captures_every_bucket_and_the_compiled_graphs_follow_eager_steps(make_checkpoint):
    """The serving path: the engine's warm-up captures a graph per batch bucket up to max_num_seqs
    with the glue compiled (inductor); decode steps of batches that shrink through the buckets then
    give the eager steps' greedy tokens, and no new compile or capture happens at the narrow width."""
    from cluster import LLM, SamplingParams
    from cluster.engine.scheduler import SchedulerConfig
    from tests.conftest import FEW_EXPERTS

    llm = LLM(model=make_checkpoint(FEW_EXPERTS), dtype="bfloat16", device="cuda",
              scheduler=SchedulerConfig(max_num_seqs=8))
    runner = llm.engine.executor.runner
    assert runner.graphs is not None and runner.graphs.compile_glue
    captured = set(runner.graphs.graphs)
    assert {(1, 4), (2, 4), (4, 4), (8, 4), (8, 8)} <= captured

    def generate(tag: str) -> dict:  # six sequences ending two steps apart: batches 6, 5, ..., 1
        engine, out = llm.engine, {}
        for i in range(6):
            engine.add_request(f"{tag}{i}", [5, 9, 13, 2, 7] * (i + 1),
                               SamplingParams(max_tokens=2 + 2 * i, temperature=0.0, logprobs=1, ignore_eos=True))
        while engine.has_unfinished():
            for o in engine.step():
                out.setdefault(o.request_id[1:], []).extend(zip(o.new_token_ids, (lp.logprob for lp in o.logprobs)))
        engine.flush()
        return out

    replayed = generate("g")
    assert {key for key in runner.graphs.graphs if key[1] == 4} <= captured
    runner.graphs = None
    eager = generate("e")
    llm.shutdown()
    assert replayed.keys() == eager.keys()
    for key in eager:
        assert [t for t, _ in replayed[key]] == [t for t, _ in eager[key]]
        assert max(abs(a - b) for (_, a), (_, b) in zip(replayed[key], eager[key])) <= 0.05


def test_host_tensors_reach_the_device_in_one_transfer():
    from cluster.worker.runner import to_device

    host = [torch.arange(5), torch.arange(12).view(3, 4), torch.tensor([], dtype=torch.long), torch.tensor([7])]
    moved = to_device(torch.device("cuda"), *host)
    assert all(m.is_cuda and m.shape == h.shape and torch.equal(m.cpu(), h) for m, h in zip(moved, host))
    assert to_device(torch.device("cpu"), *host)[1] is host[1]


def test_async_scheduling_is_on_and_gives_the_step_by_step_tokens(make_checkpoint):
    """On a GPU the engine launches step N + 1 (through its decode graph) before reading step N's
    tokens; greedy tokens, logprobs and penalised tokens equal the same engine scheduled step by step."""
    from cluster import LLM, SamplingParams
    from tests.conftest import FEW_EXPERTS

    prompts = [[5, 9, 13, 2, 7] * n for n in (1, 3, 30)]
    llm = LLM(model=make_checkpoint(FEW_EXPERTS), dtype="bfloat16", device="cuda", warm_up=False)
    assert llm.engine.async_scheduling
    for params in (SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, ignore_eos=True),
                   SamplingParams(max_tokens=12, temperature=0.0, frequency_penalty=-2.0, ignore_eos=True)):
        ahead = llm.generate(prompts, params)
        llm.engine.async_scheduling = False
        step_by_step = llm.generate(prompts, params)
        llm.engine.async_scheduling = True
        for a, b in zip(ahead, step_by_step):
            assert a.token_ids == b.token_ids
            assert max((abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)), default=0) <= 1e-4
    llm.shutdown()
