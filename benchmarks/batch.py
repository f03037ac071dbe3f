"""Offline batch inference (`epserve batch`, Ray Data) against the in-process engine on the same
cores: 1,000 prompts, greedy, one job per row of the table.

    python benchmarks/batch.py [--model DIR] [--prompts 1000] [--max-tokens 64]

The in-process figure is LLM.generate over every prompt at once (one torch thread, as each batch
instance runs), with and without its model load; the job figures include everything but starting
Ray and Ray Data (a RayJob finds its cluster up): the actor pool's start (processes, imports, model
loads), the part files and the final Parquet write. Completions are checked equal to the in-process
ones.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cluster import LLM, SamplingParams, SchedulerConfig
from cluster.batch import BatchConfig, run_batch
from cluster.model.tiny import TinySpec, make_tiny
from scratch import scratch_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: a 512-expert tiny one, written once)")
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=64)  # epserve batch's default
    args = parser.parse_args()
    work = Path(scratch_dir(prefix="epserve-batch-"))
    model = args.model or str(make_tiny(work / "model", TinySpec()))
    rng = random.Random(0)
    words = ["expert", "layer", "token", "route", "cache", "state", "delta", "attention", "shard", "batch"]
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 40))) for _ in range(args.prompts)]
    source = work / "prompts.parquet"
    pq.write_table(pa.table({"prompt": prompts}), source)
    print(f"{args.prompts} prompts of 4-40 words x {args.max_tokens} greedy tokens; model {model}")
    print("| run | seconds | rows/s | output tok/s | vs in-process |")
    print("|---|---|---|---|---|")

    torch.set_num_threads(1)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    start = time.perf_counter()
    with LLM(model, scheduler=SchedulerConfig(max_num_seqs=32, max_waiting=args.prompts)) as llm:
        loaded = time.perf_counter()
        reference = llm.generate(prompts, params)
        end = time.perf_counter()
    tokens = sum(len(c.token_ids) for c in reference)
    base = tokens / (end - loaded)

    def row(label: str, seconds: float) -> None:
        rate = tokens / seconds
        print(f"| {label} | {seconds:.1f} | {len(prompts) / seconds:.1f} | {rate:.0f} | {rate / base:.2f}x |", flush=True)

    row("in-process LLM.generate, model loaded", end - loaded)
    row("in-process, with its model load and warm-up", end - start)
    import ray

    import ray.data

    start = time.perf_counter()
    ray.init(num_cpus=2, logging_level="ERROR", log_to_driver=False)
    ray.data.range(4).map_batches(lambda batch: batch).take_all()  # Ray Data's own actors, once per cluster
    ray_start = time.perf_counter() - start
    for instances in (1, 2):
        out = work / f"out-{instances}.parquet"
        config = BatchConfig(model=model, max_tokens=args.max_tokens, instances=instances, batch_size=125,
                             cpus_per_instance=1.0)
        start = time.perf_counter()
        summary = run_batch(source, out, config, progress=False)
        seconds = time.perf_counter() - start
        got = pq.read_table(out).column("completion_token_ids").to_pylist()
        assert got == [c.token_ids for c in reference], "the job's completions differ from LLM.generate's"
        assert summary["output_tokens"] == tokens
        row(f"epserve batch, {instances} instance(s): Ray up, the job end to end (pool start, model loads)", seconds)
    print(f"(starting the embedded Ray cluster and Ray Data took {ray_start:.1f}s more, once)")


if __name__ == "__main__":
    main()
