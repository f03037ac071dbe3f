"""Expert parallelism against the single-process engine: the decode step split, the bytes each MoE
layer moves, and the throughput of concurrent generations, for E expert workers and one attention
worker on this machine's cores.

    python benchmarks/expert_parallel.py [--model DIR] [--experts 1 2 4] [--batch 32] [--steps 32]
                                         [--generations 32] [--overlap on|off]
                                         [--rounds 3] [--async-scheduling off|on|both]

Runs in one process and one Ray cluster, on one checkpoint (default: the tiny flagship-shaped one).
Step split, per decode step of --batch sequences (ms):
  step       wall time seen by the engine, per step
  attention  attention-worker time outside the MoE exchange (dense layers, gate, shared expert, LM head)
  dispatch   attention-worker time sending the rows to the expert workers
  combine    attention-worker time waiting for and adding the partial sums
  experts    expert compute, slowest expert worker
  comm       dispatch + combine - experts: communication and waiting, on the attention side
  engine     step - attention-worker step: scheduling, the step command and its reply (with async
             scheduling the engine's work overlaps the workers', so it can be ~0 or negative)
Bytes per MoE layer at that batch: what the exchange moves now (measured on the expert workers,
plus the partial sums back), and what the earlier exchange moved (per (row, expert) pair both ways,
and a count matrix).
Throughput: --generations prompts of 16 tokens x 32 greedy tokens, against the single-process
engine with one torch thread and with two (the same cores as the workers together).
Each layout is measured in --rounds rounds that alternate with the single-process engine (its
workers idle meanwhile), and every figure is the median over the rounds: this machine's speed
drifts by a third between minutes, so a ratio compares runs of the same minute.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

from cluster import LLM, ClusterConfig, SamplingParams
from cluster.model.tiny import TinySpec, make_tiny
from cluster.worker.timing import split_step
from scratch import scratch_dir


def run_decode(llm: LLM, prompts: list[list[int]], steps: int) -> tuple[float, list[dict]]:
    """Prefills the prompts, then times `steps` decode steps of the engine (one token each);
    returns seconds per step and the executor's timings of those steps."""
    engine = llm.engine
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}", prompt, params)
    engine.step()  # prefill
    engine.step()  # warm-up decode step
    llm.executor.timings(reset=True)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - start) / steps
    timings = llm.executor.timings(reset=True)
    while engine.has_unfinished():
        engine.step()
    engine.flush()
    return wall, timings


def summarize(wall: float, timings: list[dict]) -> dict[str, float]:
    split = split_step(timings)
    remote_experts = any(t["role"] == "expert" for t in timings)
    comm = max(split["dispatch"] + split["combine"] - (split["experts"] if remote_experts else 0.0), 0.0)
    return {**split, "step": wall, "comm": comm, "engine": wall - split["step"]}


def generation_rate(llm: LLM, prompts: list[list[int]]) -> float:
    """Output tok/s of the prompts generated together (one pass, ~0.3 s here)."""
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    tokens = sum(len(c.token_ids) for c in llm.generate(prompts, params))
    return tokens / (time.perf_counter() - start)


def median_run(summaries: list[dict[str, float]]) -> dict[str, float]:
    """Of several step splits (summarize), the one whose step time is the median."""
    return sorted(summaries, key=lambda r: r["step"])[len(summaries) // 2]


def bytes_per_layer(llm: LLM, batch: int, before_steps: int) -> tuple[float, float]:
    """(now, earlier) bytes one MoE layer moves in a decode step of `batch` rows."""
    cfg, E = llm.config, llm.engine.cluster.expert_workers
    infos = [i for i in llm.worker_info() if i["role"] == "expert"]
    layers_served = before_steps * cfg.num_hidden_layers
    dispatched = sum(i["bytes_in"] for i in infos) / layers_served
    combined = E * batch * cfg.hidden_size * 8  # one fp64 partial sum per row from every expert worker
    es = 4  # fp32
    pairs = batch * cfg.num_experts_per_tok * cfg.hidden_size * es
    world, max_local = 1 + E, -(-cfg.num_experts // E)
    counts = world * world * max_local * 8  # every rank sent every rank a [world, max_local] int64 count
    return dispatched + combined, 2 * pairs + counts


def workers_gone(timeout_s: float = 30.0) -> None:
    """Waits until no worker actor process is left (shutdown kills them; they take a moment to exit)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        if not any(role in line for line in ps.splitlines() for role in ("AttentionWorker", "ExpertWorker")):
            return
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--generations", type=int, default=32)
    parser.add_argument("--overlap", choices=["on", "off"], default="on", help="two-batch overlap")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per layout, each beside the single process")
    parser.add_argument("--async-scheduling", choices=["off", "on", "both"], default="off",
                        help="the engine sends step N + 1 before reading step N's replies (both: each layout twice)")
    args = parser.parse_args()
    import ray

    torch.set_num_threads(1)  # like each worker: compare per-worker compute on equal terms
    model_dir = args.model or make_tiny(scratch_dir(), TinySpec())
    ray.init(include_dashboard=False, logging_level="ERROR")
    prompts = [list(range(3 + i, 3 + i + args.prompt_len)) for i in range(args.batch)]
    generations = [[(7 * i + 13 * j) % 400 + 3 for j in range(16)] for i in range(args.generations)]
    overlap = args.overlap == "on"
    results, moved = [], {}  # per layout: its figures and the single process's of the same rounds

    baseline = LLM(model=model_dir)
    generation_rate(baseline, generations[:2])  # warm-up
    schedulings = {"off": [False], "on": [True], "both": [False, True]}[args.async_scheduling]
    for E in args.experts:
        for ahead in schedulings:
            cluster = ClusterConfig(expert_workers=E, attention_workers=1, use_ray=True, two_batch_overlap=overlap,
                                    async_scheduling=ahead)
            with LLM(model=model_dir, cluster=cluster) as llm:
                name = f"Ray E={E} A=1" + (" (overlap)" if llm.executor.overlap else "") + (" async" if ahead else "")
                runs = {"single": [], "one": [], "two": [], "layout": [], "rate": []}
                for r in range(args.rounds):  # the single process and the layout in turn
                    runs["single"].append(summarize(*run_decode(baseline, prompts, args.steps)))
                    runs["one"].append(generation_rate(baseline, generations))
                    torch.set_num_threads(2)
                    runs["two"].append(generation_rate(baseline, generations))
                    torch.set_num_threads(1)
                    runs["layout"].append(summarize(*run_decode(llm, prompts, args.steps)))
                    if r == 0:
                        moved[name] = bytes_per_layer(llm, args.batch, args.steps + 1)
                    runs["rate"].append(generation_rate(llm, generations))
                results.append((E, name, median_run(runs["single"]), median_run(runs["layout"]),
                                *(statistics.median(runs[k]) for k in ("one", "two", "rate"))))
            workers_gone()  # the next layout must not share the cores with this one's exiting workers
    baseline.shutdown()
    ray.shutdown()

    cfg = baseline.config
    print(f"model {model_dir}: {cfg.num_experts} experts top-{cfg.num_experts_per_tok}, {cfg.num_hidden_layers} "
          f"layers, hidden {cfg.hidden_size}; decode batch {args.batch}, {args.steps} steps, 1 torch thread per "
          f"worker; medians of {args.rounds} rounds, each layout in turn with the single process")
    cols = ["step", "attention", "dispatch", "combine", "experts", "comm", "engine"]
    print(f"{'layout':<30}" + "".join(f"{c + ' ms':>13}" for c in cols) + f"{'tok/s':>9}{'vs single':>11}"
          f"{'comm %':>8}{'KB/layer':>10}{'before':>8}")
    for E, name, single, layout, _, _, _ in results:
        base_tps = args.batch / single["step"]
        for label, r in ((f"single (beside E={E})", single), (name, layout)):
            tps = args.batch / r["step"]
            comm_pct = 100 * (r["comm"] + r["engine"]) / r["step"] if r is layout else 0.0
            now, before = moved[name] if r is layout else (0.0, 0.0)
            print(f"{label:<30}" + "".join(f"{r[c] * 1e3:13.2f}" for c in cols) + f"{tps:9.1f}"
                  f"{tps / base_tps:10.2f}x{comm_pct:7.0f}%{now / 1024:10.1f}{before / 1024:8.1f}")
    print(f"\n{args.generations} concurrent generations (16 prompt + 32 output tokens), tok/s:")
    for _, name, _, _, one, two, rate in results:
        print(f"  {name:<22} {rate:8.1f}   single process beside it: 1 thread {one:8.1f} ({rate / one:4.2f}x), "
              f"2 threads {two:8.1f} ({rate / two:4.2f}x)")


if __name__ == "__main__":
    main()
