"""One GPU, one run (well under 6 minutes on an H100/H200): is the CUDA path right, and how fast?

    python benchmarks/gpu_check.py [--device cuda] [--layers 4] [--experts 512] [--json OUT] [--profile OUT]
    python benchmarks/gpu_check.py --smoke        # tiny sizes on CPU: checks the script itself
    python benchmarks/gpu_check.py --sections decode_prefill,glue_compile   # some parts only

On a flagship-width slice (hidden 4096, the flagship's attention / DeltaNet / expert widths and
vocabulary, --layers layers in the 3:1 pattern, --experts experts top-10) with random weights made
on the device (no 50 GB checkpoint to write; the engine's LocalExecutor is swapped for one that
builds them), through the real engine (scheduler, runner, kernels, sampler):
  1. bf16 logits against fp32 on a narrower slice (64 experts): max |diff|, diff / logit std, top-1
     agreement, over prompts of 17-300 tokens; the tolerance is what bf16 costs anyway: the same
     model in bf16 through the plain-torch reference kernels (random models amplify rounding:
     on make-tiny's checkpoint transformers' own bf16 is 0.97 from its fp32, top-1 87%, as ours);
  2. decode tok/s at batch 1 and 64 (bf16), with the engine's CUDA graphs (every batch bucket
     captured first, as the engine's warm-up does, and timed: the compile's cost at start) and
     eagerly, and at batch 1 the fraction of HBM bandwidth: the bytes a decode step must read
     (dense weights, LM head, the top-10 experts of every layer, DeltaNet states, KV) / step time,
     against a measured device-to-device copy and the card's spec; the step is the whole engine
     step (scheduling, forward, LM head, sampling, the host copy of the tokens); and the same
     engine scheduled the other way (async scheduling, the default on a GPU, against step by step);
  3. prefill tok/s (4 prompts of 2048 tokens, 8192-token steps);
  4. the routed experts at 4k and 16k tokens with random top-10 routing: the whole op as the engine
     runs it (kernels.moe_experts: at these sizes the padded batched matmuls, its path printed) and
     through the grouped GEMMs (sort by expert, two torch._grouped_mm, SwiGLU and the fp64 weighted
     sum as Triton passes), and those two grouped GEMMs alone, TFLOP/s against the card's bf16 peak
     (spec and a measured 8192^3 matmul) and against the roofline (the GEMMs' least bytes at the
     measured copy bandwidth); the same GEMMs as one batched matmul over rows padded to the busiest
     expert's alone; and the grouped op's other passes
     alone (sort, gather, SwiGLU, weighted sum: ms; the last two as torch's passes and as Triton's),
     where its time besides the GEMMs goes, and the grouped op with torch's passes (TFLOP/s);
  5. a probe of Qwen's block-scaled FP8 GEMM on the card's FP8 units (torch._scaled_mm): error and
     TFLOP/s beside bf16 (the engine keeps FP8 experts as stored but computes in bf16: 14);
  6. the split of a batch-1 decode step's wall time (scheduled step by step): layout, forward, LM
     head and sampling, the rest;
  7. with --profile, the heaviest ops of eager decode steps (torch.profiler) and kernels per step;
  8. K/V stored as fp8 (e4m3, e5m2) under the bf16 model: the logits against bf16 K/V on the
     narrower slice (max and mean |diff|, top-1 agreement), and batch-64 decode with fp8 e4m3 K/V;
  9. decode graphs with their plain-torch glue compiled (the engine's default) against the same
     graphs without it and against eager steps: tokens, logprobs, decode tok/s, first capture time;
 10. paged attention with the flagship's heads: the Triton kernel (kernels.gpu.attention) against
     the batched torch version it replaced, on decode batches with long contexts and a prefill step;
 11. the DeltaNet decode step at batch 64 with the flagship's heads: the Triton kernel (states in place,
     kernels.gpu.delta_rule) against FLA's with the slots gathered and scattered, and batched torch;
 12. batch-1 decode through the engine after a 16-token and after a 32k-token prompt (its ratio);
 13. the routed experts at decode batches (1-64 rows, 512 experts top-10): the few-rows kernels
     (kernels.gpu.moe, what the engine runs up to 8 rows) against the sorted grouped-GEMM path: us a
     call and the experts' weight bytes over it;
 14. the routed experts of an FP8 checkpoint kept FP8 (few-rows kernels over the stored weights up
     to 8 rows, past them grouped Triton kernels dequantising each weight tile as they load it)
     against the bank dequantised to bf16 at load: us a call at 1-4096 rows, each way FP8 can take
     at every size (few-rows, grouped, the experts hit dequantised for torch's grouped GEMMs), the
     grouped Triton kernels over bf16 beside torch's grouped GEMMs, TFLOP/s at 512 and 4096 rows,
     the whole bank's dequantisation alone, and how far FP8's outputs are from bf16's; past 8 rows
     the same with W8A8 (ClusterConfig.fp8_activations: activations in e4m3, FP8 x FP8);
 15. a dense linear layer of an FP8 checkpoint kept FP8 (DeltaNet's fused in_proj_qkv and z,
     through kernels.linear: the few-rows kernel up to 8 rows, tiles of rows past them) against
     bf16 F.linear over it dequantised at load: us a call at 1-4096 rows, weight GB/s at 1 and 8
     rows, TFLOP/s at 512 and 4096, and how far FP8's outputs are from bf16's; past 8 rows W8A8 too.
 16. the slice of 2 with random FP8 experts and dense layers held as stored (as an FP8 checkpoint's
     are on sm_89+): decode tok/s at batch 1 and 64 and batch 1's fraction of the copy bandwidth
     over the bytes it reads, and its speed-up over the bf16 slice at batch 1; prefill tok/s as in
     3, W8A16 and W8A8.
Each part records its figures as it goes; a part that fails is reported and the next one runs.
The CUDA tests (the ops and the engine): `python -m pytest tests/cuda` (skipped without a GPU).
Prints a table and, with --json, writes the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import time
import traceback
from pathlib import Path

import torch
from gpu_probes import (card_spec, copy_bandwidth, delta_rule_decode, dense_fp8, dense_tflops, environment,
                        fp8_block_gemm, grouped_gemm, paged_attention, routed_experts_few_rows, routed_experts_fp8,
                        sync, w8a8)

from gpu_slice import RandomWeightsExecutor, slice_dir

import cluster.engine.engine as engine_module
from cluster import LLM, SamplingParams
from cluster.config import ModelConfig
from cluster.engine.cache_plan import CacheConfig
from cluster.engine.memory_plan import FLAGSHIP
from cluster.engine.scheduler import SchedulerConfig
from cluster.model.loading import fp8_dense_names
from cluster.model.model import Qwen35MoeModel
from kernels import reference_kernels


@contextlib.contextmanager
def decoding(llm: LLM, tag: str, batch: int, max_tokens: int, mix: tuple[int, int], vocab: int,
             prompt_len: int = 16):
    """`batch` greedy requests of prompt_len tokens (token j of request i: (i * mix[0] + j * mix[1])
    mod vocab) past their prefill and first decode step: the block's first max_tokens engine steps
    are decodes of all of them (none finishes inside it, however many steps the prefills took).
    Afterwards they are aborted and the engine's finished state is dropped."""
    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens + batch, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}{batch}-{i}", [(i * mix[0] + j * mix[1]) % vocab for j in range(prompt_len)], params)
    scheduler = engine.scheduler
    while scheduler.waiting or any(not seq.output_ids for seq in scheduler.running):
        engine.step()  # prefills (several steps when the batch's prompts pass the step's token budget)
    engine.step()  # the first decode step of the batch (and its graph's capture)
    yield engine
    for i in range(batch):
        engine.abort_request(f"{tag}{batch}-{i}")
    while engine.has_unfinished():  # async scheduling: the step in flight lands
        engine.step()
    engine.flush()


def decode_rate(llm: LLM, batch: int, steps: int, device: str, vocab: int, prompt_len: int = 16) -> float:
    """Decode steps per second at `batch` sequences (after their prefill of prompt_len tokens), as
    tokens per second."""
    with decoding(llm, "d", batch, steps + 3, (31, 7), vocab, prompt_len) as engine:
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync(device)
        seconds = (time.perf_counter() - start) / steps
    return batch / seconds


def prefill_rate(llm: LLM, prompt_len: int, device: str, vocab: int) -> float:
    """Prompt tokens per second of 4 prompts of prompt_len, one output token each (after a warm run)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([[(i + j) % vocab for j in range(prompt_len)] for i in range(4)], params)  # warm
    sync(device)
    start = time.perf_counter()
    llm.generate([[(i * 3 + j) % vocab for j in range(prompt_len)] for i in range(4)], params)
    sync(device)
    return 4 * prompt_len / (time.perf_counter() - start)


def step_split(llm: LLM, batch: int, steps: int, device: str, vocab: int) -> dict:
    """Where a decode step's wall time goes at `batch`: the runner's layout of the step (host lists
    to device tensors), the forward (graph replay or eager), the LM head and sampling, and the rest
    (scheduling, detokenising, bookkeeping): medians in ms, the device synchronised at each edge
    (which adds a little to each part), scheduled step by step (async scheduling would overlap them)."""
    import statistics

    runner = llm.engine.executor.runner
    scheduled_ahead, llm.engine.async_scheduling = llm.engine.async_scheduling, False
    parts: dict[str, list[float]] = {"layout": [], "forward": [], "logits_sampling": [], "step": []}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            sync(device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            parts[name].append(time.perf_counter() - start)
            return out
        return wrapper

    originals = {"_layout": runner._layout, "_forward": runner._forward, "_results": runner._results}
    runner._layout, runner._forward = timed("layout", runner._layout), timed("forward", runner._forward)
    runner._results = timed("logits_sampling", runner._results)
    try:
        with decoding(llm, "s", batch, steps + 3, (13, 3), vocab) as engine:
            for values in parts.values():
                values.clear()
            for _ in range(steps):
                timed("step", engine.step)()
    finally:
        for name in originals:
            delattr(runner, name)  # the class's methods again
        llm.engine.async_scheduling = scheduled_ahead
    split = {name: statistics.median(values) * 1e3 for name, values in parts.items()}
    split["other"] = split["step"] - split["layout"] - split["forward"] - split["logits_sampling"]
    return {f"step_split_batch{batch}_{name}_ms": ms for name, ms in split.items()}


def decode_bytes(cfg: ModelConfig, dtype_bytes: int, context: int, fp8: bool = False) -> int:
    """What one batch-1 decode step must read: every dense weight but the embedding table (one row),
    the 10 routed experts of each layer, and the DeltaNet states (fp32, read and written) and KV;
    fp8: the experts and the dense layers Qwen's FP8 release stores FP8 a byte a weight."""
    with torch.device("meta"):
        model = Qwen35MoeModel(cfg)
    stored_fp8 = set(fp8_dense_names(cfg, None)) if fp8 else set()
    dense = sum(p.numel() * (1 if n in stored_fp8 else dtype_bytes)
                for n, p in model.named_parameters() if "embed_tokens" not in n)
    experts = len(cfg.moe_layer_ids) * cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    linear = cfg.layer_types.count("linear_attention")
    full = cfg.layer_types.count("full_attention")
    states = 2 * linear * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    kv = full * 2 * context * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes
    return dense + experts * (1 if fp8 else dtype_bytes) + states + kv


def profile_decode(llm: LLM, batch: int, device: str, vocab: int, out: Path | None) -> dict:
    """Kernel launches and the heaviest device ops of decode steps at `batch` (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    steps = 4
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with decoding(llm, "p", batch, 12, (17, 3), vocab) as engine, profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync(device)
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=25)
    if out is not None:  # and every op by how often it runs: where the launches come from
        out.write_text(table + "\n\nBy count:\n" + events.table(sort_by="count", row_limit=120))
    print(table)
    kernels_run = sum(e.count for e in events if e.device_type == DeviceType.CUDA)
    return {f"profile_batch{batch}_kernels_per_step": kernels_run / steps}


SECTIONS = ("grouped_gemm", "bf16_vs_fp32", "decode_prefill", "fp8_kv", "fp8_block_gemm", "glue_compile",
            "paged_attention", "delta_rule_decode", "routed_experts_few_rows", "routed_experts_fp8", "dense_fp8",
            "fp8_decode", "long_context")  # in the order they run (the 16 parts above, some sharing one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per batch size")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the script runs")
    parser.add_argument("--json", type=Path, help="write the figures here (after every section)")
    parser.add_argument("--profile", type=Path, help="also profile decode steps; tables written beside this stem")
    parser.add_argument("--sections", type=lambda names: names.split(","), default=list(SECTIONS),
                        help=f"run only these, comma-separated (default all): {','.join(SECTIONS)}")
    args = parser.parse_args()
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: no section {', '.join(unknown)} (there are {', '.join(SECTIONS)})")
    device = "cpu" if args.smoke else args.device
    engine_module.LocalExecutor = RandomWeightsExecutor  # random weights made on the device
    RandomWeightsExecutor.cpu_graphs = args.smoke
    width = dict(num_hidden_layers=args.layers, num_experts=args.experts)
    if args.smoke:  # every width small; the structure (3:1, top-10, shared expert) kept
        width |= dict(vocab_size=512, hidden_size=128, num_attention_heads=4, head_dim=32, linear_num_key_heads=2,
                      linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
                      moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=16)
    name, peak_tflops, spec_tbps = card_spec(device)
    copy_bytes_s = copy_bandwidth(device, 64 if args.smoke else 2048)  # the bandwidth every fraction is of
    figures: dict = {"device": name, "layers": args.layers, **environment(device),
                     "copy_bandwidth_tb_s": copy_bytes_s / 1e12}
    started = time.perf_counter()

    def engine(overrides: dict, dtype: str, max_tokens: int = 512, seqs: int = 64, kv: str = "auto") -> LLM:
        return LLM(model=slice_dir(overrides), dtype=dtype, device="cuda" if device.startswith("cuda") else "cpu",
                   scheduler=SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=max_tokens),
                   cache=CacheConfig(memory_budget_mb=4096 if not args.smoke else 64, kv_cache_dtype=kv),
                   warm_up=False)

    def section(title: str, run) -> None:
        """One part of the check, writing its figures into `figures` as it goes: a failure is printed
        and recorded, and the next part still runs."""
        if title not in args.sections:
            return
        print(f"== {title} ({time.perf_counter() - started:.0f}s)", flush=True)
        try:
            run(figures)
        except Exception as e:  # noqa: BLE001 - report it and go on: one run must bring back all it can
            traceback.print_exc()
            figures[f"{title}_error"] = f"{type(e).__name__}: {e}"
        if device.startswith("cuda"):
            figures[f"{title}_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))

    def bf16_against_fp32(found: dict) -> None:
        narrow = width | {"num_experts": min(64, width["num_experts"])}
        vocab = narrow.get("vocab_size", FLAGSHIP["vocab_size"])
        prompts = [[(i * 13 + j * 5) % vocab for j in range(n)] for i, n in enumerate((17, 120, 300))]
        logits = {}
        for run, dtype in (("fp32", "float32"), ("bf16", "bfloat16"), ("bf16 reference", "bfloat16")):
            llm = engine(narrow, dtype, seqs=4)
            with reference_kernels() if run == "bf16 reference" else contextlib.nullcontext():
                logits[run] = [t.float() for t in llm.score(prompts)]
            llm.shutdown()
            del llm

        def max_diff(run: str) -> float:
            return max((a - b).abs().max().item() for a, b in zip(logits["fp32"], logits[run]))

        diff, reference_diff = max_diff("bf16"), max_diff("bf16 reference")
        spread = torch.cat(logits["fp32"]).std().item()
        top1 = torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(logits["fp32"], logits["bf16"])])
        found |= {"bf16_max_abs_diff": diff, "bf16_reference_kernels_max_abs_diff": reference_diff,
                  "bf16_diff_over_std": diff / spread, "bf16_top1_agreement": top1.mean().item(),
                  "bf16_within_tolerance": diff <= 1.5 * reference_diff + 1e-3}

    def fp8_kv(found: dict) -> None:
        """bf16 model, K/V stored as fp8 (e4m3, e5m2) against bf16 K/V: logits, then batch-64 decode."""
        narrow = width | {"num_experts": min(64, width["num_experts"])}
        vocab = narrow.get("vocab_size", FLAGSHIP["vocab_size"])
        prompts = [[(i * 7 + j * 3) % vocab for j in range(n)] for i, n in enumerate((33, 200, 300))]
        logits = {}
        for kv in ("auto", "fp8_e4m3", "fp8_e5m2"):
            llm = engine(narrow, "bfloat16", seqs=4, kv=kv)
            logits[kv] = [t.float() for t in llm.score(prompts)]
            llm.shutdown()
            del llm
        for kv in ("fp8_e4m3", "fp8_e5m2"):
            pairs = list(zip(logits["auto"], logits[kv]))
            found |= {f"{kv}_kv_max_abs_diff": max((a - b).abs().max().item() for a, b in pairs),
                      f"{kv}_kv_mean_abs_diff": torch.cat([(a - b).abs().flatten() for a, b in pairs]).mean().item(),
                      f"{kv}_kv_top1_agreement": torch.cat([(a.argmax(-1) == b.argmax(-1)).float()
                                                            for a, b in pairs]).mean().item()}
        llm = engine(width, "bfloat16", kv="fp8_e4m3")
        try:
            found["fp8_e4m3_kv_decode_tok_s_batch64"] = decode_rate(llm, 64, 4 if args.smoke else args.steps, device,
                                                                    cfg.vocab_size)
        finally:
            llm.shutdown()
            del llm

    cfg = ModelConfig.from_dict({**FLAGSHIP, **width})

    def decode_and_prefill(found: dict) -> None:
        llm = engine(width, "bfloat16", max_tokens=8192)
        try:
            steps = 4 if args.smoke else args.steps
            runner = llm.engine.executor.runner
            start = time.perf_counter()  # what the engine's warm-up adds at start: every bucket, compiled
            found["warm_up_decode_graphs"] = runner.capture_decode_graphs(64)
            sync(device)
            found["warm_up_decode_graphs_s"] = time.perf_counter() - start
            graphs = runner.graphs  # None on a CPU
            ahead = llm.engine.async_scheduling  # the engine's default: on with a GPU
            for batch in (1, 64):
                found[f"decode_tok_s_batch{batch}"] = decode_rate(llm, batch, steps, device, cfg.vocab_size)
                llm.engine.async_scheduling = not ahead  # the same engine, scheduled the other way
                found[f"decode_tok_s_batch{batch}_async_{not ahead}"] = decode_rate(llm, batch, steps, device,
                                                                                   cfg.vocab_size)
                llm.engine.async_scheduling = ahead
                if graphs is not None:
                    runner.graphs = None
                    found[f"decode_tok_s_batch{batch}_eager"] = decode_rate(llm, batch, steps, device, cfg.vocab_size)
                    runner.graphs = graphs
            found |= step_split(llm, 1, steps, device, cfg.vocab_size)
            step_bytes = decode_bytes(cfg, 2, context=18)
            achieved = step_bytes * found["decode_tok_s_batch1"]
            found |= {"decode_bytes_per_token": step_bytes, "decode_bandwidth_tb_s": achieved / 1e12,
                      "fraction_of_copy_bandwidth": achieved / copy_bytes_s,
                      "fraction_of_spec_bandwidth": achieved / (spec_tbps * 1e12) if spec_tbps else None}
            found["prefill_tok_s"] = prefill_rate(llm, 64 if args.smoke else 2048, device, cfg.vocab_size)
            if args.profile:  # eagerly: each kernel launch shows
                runner.graphs = None
                for batch in (1, 64):
                    found |= profile_decode(llm, batch, device, cfg.vocab_size,
                                            args.profile.with_name(f"{args.profile.stem}_batch{batch}.txt"))
        finally:
            llm.shutdown()
            del llm

    def fp8_decode(found: dict) -> None:
        """Section 2's slice with random FP8 experts and dense layers held as stored (as an FP8
        checkpoint's are on this GPU): decode tok/s at batch 1 and 64 through the decode graphs,
        and batch 1's fraction of the copy bandwidth over the bytes it reads (on a CPU: the
        reference kernels, each FP8 weight dequantised as it is used)."""
        RandomWeightsExecutor.fp8_block = (128, 128)
        llm = engine(width, "bfloat16")
        try:
            steps = 4 if args.smoke else args.steps
            with reference_kernels() if not device.startswith("cuda") else contextlib.nullcontext():
                for batch in (1, 64):
                    found[f"fp8_decode_tok_s_batch{batch}"] = decode_rate(llm, batch, steps, device, cfg.vocab_size)
                prompt_len = 64 if args.smoke else 2048
                found["fp8_prefill_tok_s"] = prefill_rate(llm, prompt_len, device, cfg.vocab_size)
                # W8A8 is read as each kernel launches (prefill steps run eagerly)
                found["fp8_w8a8_prefill_tok_s"] = w8a8(functools.partial(prefill_rate, llm, prompt_len, device,
                                                                        cfg.vocab_size))()
            step_bytes = decode_bytes(cfg, 2, context=18, fp8=True)
            achieved = step_bytes * found["fp8_decode_tok_s_batch1"]
            found |= {"fp8_decode_bytes_per_token": step_bytes,
                      "fp8_fraction_of_copy_bandwidth": achieved / copy_bytes_s}
            if "decode_tok_s_batch1" in found:
                found["fp8_decode_speedup_batch1"] = found["fp8_decode_tok_s_batch1"] / found["decode_tok_s_batch1"]
        finally:
            RandomWeightsExecutor.fp8_block = None
            llm.shutdown()
            del llm

    def grouped(found: dict) -> None:
        dense = found["bf16_dense_tflops"] = dense_tflops(device, 512 if args.smoke else 8192)
        bandwidth = copy_bytes_s / 1e12
        for tokens in ((256, 512) if args.smoke else (4096, 16384)) if hasattr(torch, "_grouped_mm") else ():
            measured = grouped_gemm(cfg, tokens, torch.bfloat16, device)
            found |= {f"{name}_{tokens}": value for name, value in measured.items()}
            # the roofline: the GEMMs can go no faster than the matrix units or than their bytes can move
            bound = min(dense, measured["grouped_gemm_flop_per_byte"] * bandwidth)
            found[f"grouped_gemm_fraction_of_roofline_{tokens}"] = measured["grouped_gemm_tflops"] / bound
            found[f"grouped_gemm_fraction_of_measured_dense_{tokens}"] = measured["grouped_gemm_tflops"] / dense
            if peak_tflops:
                found |= {f"routed_experts_fraction_of_peak_{tokens}": measured["routed_experts_tflops"] / peak_tflops,
                          f"grouped_gemm_fraction_of_peak_{tokens}": measured["grouped_gemm_tflops"] / peak_tflops}

    def glue_compile(found: dict) -> None:
        """Decode graphs whose glue runs compiled (the engine's default; kernels.backend.glue) against
        the same graphs captured without it, and against eager steps: greedy tokens, logprobs, decode
        tok/s, the time of a first capture (with its compile)."""
        llm = engine(width, "bfloat16")
        try:
            runner, steps = llm.engine.executor.runner, 4 if args.smoke else args.steps
            graphs = runner.graphs
            prompts = [[(i * 5 + j * 3) % cfg.vocab_size for j in range(n)] for i, n in enumerate((20, 90, 7))]
            params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=1, ignore_eos=True)
            runner.graphs = None
            eager = llm.generate(prompts, params)
            for variant, compile_glue in (("glue_compiled", True), ("glue_plain", False)):
                if graphs is None:  # a CPU: no graphs to compare
                    break
                # captured afresh, in a pool of their own (capturing into the pool of deleted graphs
                # hit an allocator assert on an H200)
                runner.graphs = copy.copy(graphs)
                runner.graphs.compile_glue, runner.graphs.graphs = compile_glue, {}
                runner.graphs.pool = torch.cuda.graph_pool_handle() if graphs.capture else None
                start = time.perf_counter()
                llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
                found[f"{variant}_first_capture_s"] = time.perf_counter() - start
                replayed = llm.generate(prompts, params)
                found[f"{variant}_tokens_equal_eager"] = all(a.token_ids == b.token_ids
                                                             for a, b in zip(replayed, eager))
                found[f"{variant}_logprob_max_diff_from_eager"] = max(
                    abs(x.logprob - y.logprob) for a, b in zip(replayed, eager) for x, y in zip(a.logprobs, b.logprobs))
                for batch in (1, 64):
                    found[f"{variant}_decode_tok_s_batch{batch}"] = decode_rate(llm, batch, steps, device,
                                                                                cfg.vocab_size)
        finally:
            llm.shutdown()
            del llm

    def long_context(found: dict) -> None:
        """Batch-1 decode through the engine (bf16, its CUDA graphs) after a 16-token prompt and after
        a 32k-token one, in one engine: what reading the long context's K/V costs a step."""
        llm = engine(width, "bfloat16", max_tokens=8192, seqs=4)
        long_prompt, steps = (256, 4) if args.smoke else (32768, args.steps)
        try:
            short = found["long_context_decode_tok_s_after_16"] = decode_rate(llm, 1, steps, device, cfg.vocab_size)
            rate = decode_rate(llm, 1, steps, device, cfg.vocab_size, prompt_len=long_prompt)
            found[f"long_context_decode_tok_s_after_{long_prompt}"] = rate
            found["long_context_ratio"] = rate / short
        finally:
            llm.shutdown()
            del llm

    section("grouped_gemm", grouped)
    section("bf16_vs_fp32", bf16_against_fp32)
    section("decode_prefill", decode_and_prefill)
    section("fp8_kv", fp8_kv)
    if device.startswith("cuda"):
        section("fp8_block_gemm", lambda found: found.update(fp8_block_gemm(device)))
    section("glue_compile", glue_compile)
    if device.startswith("cuda"):
        section("paged_attention", lambda found: found.update(paged_attention(device, args.smoke)))
        section("delta_rule_decode", lambda found: found.update(delta_rule_decode(device, args.smoke)))
        section("routed_experts_few_rows",
                lambda found: found.update(routed_experts_few_rows(cfg, device, args.smoke)))
    section("routed_experts_fp8", lambda found: found.update(routed_experts_fp8(cfg, device, args.smoke)))
    section("dense_fp8", lambda found: found.update(dense_fp8(cfg, device, args.smoke)))
    section("fp8_decode", fp8_decode)
    section("long_context", long_context)
    figures["seconds"] = time.perf_counter() - started

    for key, value in figures.items():
        print(f"{key:<36} {value:.4g}" if isinstance(value, float) else f"{key:<36} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
