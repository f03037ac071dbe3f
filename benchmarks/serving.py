"""Serving throughput and latency of the engine against transformers' generate, in one process.

    python benchmarks/serving.py [--model DIR] [--concurrency 1 8 32] [--prompt-len 32] [--output-len 32]

For each concurrency C: 2*C requests (at least 8) with the same prompts go through
  epserve       AsyncLLM, C requests in flight at a time (continuous batching, streaming)
  transformers  AutoModelForCausalLM.generate on batches of C prompts (static batching, greedy)
Both generate exactly --output-len tokens per request (end-of-sequence ignored), fp32, one torch
thread each (AsyncLLM sets the process to one intra-op thread; see cluster/async_llm.py).
Prints output tokens/s, the ratio, and epserve's TTFT and TPOT p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from cluster import AsyncLLM, SamplingParams
from cluster.model.tiny import TinySpec, make_tiny
from deploy.bench import percentile
from scratch import scratch_dir


async def run_epserve(engine: AsyncLLM, prompts: list[list[int]], concurrency: int, output_len: int):
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    gate = asyncio.Semaphore(concurrency)
    ttfts, tpots = [], []

    async def one(prompt):
        async with gate:
            start = time.perf_counter()
            first = last = None
            count = 0
            async for out in engine.generate(prompt, params):
                now = time.perf_counter()
                if out.new_token_ids and first is None:
                    first = now
                count += len(out.new_token_ids)
                last = now
            ttfts.append(first - start)
            if count > 1:
                tpots.append((last - first) / (count - 1))
            return count

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts))
    return sum(counts) / (time.perf_counter() - start), ttfts, tpots


def run_transformers(model, prompts: list[list[int]], concurrency: int, output_len: int) -> float:
    start = time.perf_counter()
    total = 0
    for i in range(0, len(prompts), concurrency):
        batch = torch.tensor(prompts[i : i + concurrency])
        with torch.no_grad():
            out = model.generate(batch, max_new_tokens=output_len, min_new_tokens=output_len,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        total += (out.shape[1] - batch.shape[1]) * batch.shape[0]
    return total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="checkpoint dir (default: a fresh default tiny one)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = args.model or make_tiny(scratch_dir(), TinySpec())
    engine = AsyncLLM(model_dir)
    reference = None
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = engine.config.vocab_size
    print(f"model {model_dir}: {engine.config.num_experts} experts top-{engine.config.num_experts_per_tok}; "
          f"prompt {args.prompt_len} tokens, output {args.output_len} tokens, greedy, fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"{'C':>3} {'reqs':>5} {'epserve tok/s':>14} {'hf tok/s':>9} {'ratio':>6} "
          f"{'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}  (ms)")
    for C in args.concurrency:
        n = max(8, 2 * C)
        prompts = [[(17 * r + 31 * j) % (vocab - 3) + 3 for j in range(args.prompt_len)] for r in range(n)]
        asyncio.run(run_epserve(engine, prompts[:2], 2, 4))  # warm-up
        tps, ttfts, tpots = asyncio.run(run_epserve(engine, prompts, C, args.output_len))
        hf = run_transformers(reference, prompts, C, args.output_len) if reference is not None else float("nan")
        print(f"{C:>3} {n:>5} {tps:14.1f} {hf:9.1f} {tps / hf:5.2f}x "
              f"{percentile(ttfts, 50) * 1e3:9.1f} {percentile(ttfts, 99) * 1e3:9.1f} "
              f"{percentile(tpots, 50) * 1e3:9.1f} {percentile(tpots, 99) * 1e3:9.1f}")
    engine.shutdown()


if __name__ == "__main__":
    main()
