"""Decode step time split into attention, dispatch, expert compute and combine, for E expert workers.

    python benchmarks/expert_parallel.py [--model DIR] [--experts 1 2 4] [--batch 8] [--steps 32]

Runs the single-process engine (baseline) and the Ray executor with E = 1, 2, 4 expert workers and
one attention worker, in one process and one Ray cluster, on the same checkpoint (default: the
tiny flagship-shaped one). Per decode step (one token for each of --batch sequences):
  step       wall time seen by the engine (driver), per step
  attention  attention-worker time outside the MoE exchange (dense layers, gate, shared expert, LM head)
  dispatch   attention-worker time in dispatch (count + token all-to-all)
  combine    attention-worker time in combine: waits for the experts, then the result all-to-all
  experts    expert compute, slowest expert worker
  comm       dispatch + combine - experts: time in communication and waiting, on the attention side
  ray        step - attention-worker step: the Ray call and message encoding overhead
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from cluster import LLM, SamplingParams
from cluster.worker.timing import split_step
from cluster.model.tiny import TinySpec, make_tiny


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
    return {**split, "step": wall, "comm": comm, "ray": wall - split["step"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    import ray

    torch.set_num_threads(1)  # like each worker: compare per-worker compute on equal terms
    model_dir = args.model or make_tiny(tempfile.mkdtemp(), TinySpec())
    ray.init(include_dashboard=False, logging_level="ERROR")
    rows = []
    prompts = [list(range(3 + i, 3 + i + args.prompt_len)) for i in range(args.batch)]
    baseline = LLM(model=model_dir)
    wall, timings = run_decode(baseline, prompts, args.steps)
    rows.append(("single process", summarize(wall, timings)))
    baseline.shutdown()
    for E in args.experts:
        with LLM(model=model_dir, expert_workers=E, attention_workers=1, use_ray=True) as llm:
            wall, timings = run_decode(llm, prompts, args.steps)
            rows.append((f"Ray E={E} A=1", summarize(wall, timings)))
    ray.shutdown()

    cfg = baseline.config
    print(f"model {model_dir}: {cfg.num_experts} experts top-{cfg.num_experts_per_tok}, {cfg.num_hidden_layers} layers, "
          f"hidden {cfg.hidden_size}; decode batch {args.batch}, {args.steps} steps, 1 torch thread per worker")
    cols = ["step", "attention", "dispatch", "combine", "experts", "comm", "ray"]
    print(f"{'layout':<16}" + "".join(f"{c + ' ms':>13}" for c in cols) + f"{'tok/s':>9}{'vs single':>11}{'comm %':>8}")
    base_tps = args.batch / rows[0][1]["step"]
    for name, r in rows:
        tps = args.batch / r["step"]
        comm_pct = 100 * (r["comm"] + r["ray"]) / r["step"] if name != "single process" else 0.0
        print(f"{name:<16}" + "".join(f"{r[c] * 1e3:13.2f}" for c in cols) + f"{tps:9.1f}{tps / base_tps:10.2f}x{comm_pct:7.0f}%")


if __name__ == "__main__":
    main()
