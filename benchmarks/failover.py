"""Failover under load: concurrent streams through AsyncLLM (the engine the Serve replicas run) on
one attention worker and two expert workers; once every stream has tokens, one worker is killed
(SIGKILL) or hung (SIGSTOP). Prints, per scenario, against an undisturbed run of the same layout
and the single-process engine's tokens:

  lost       requests that ended in an error (target 0)
  changed    streams whose tokens differ from the single-process engine's (target 0)
  recovery   seconds the engine spent recovering (detect, restart or re-place, re-connect)
  pause      longest gap between two deltas of any stream (target < 5 s for a killed worker)
  p50 gap    median gap between deltas, for scale
  fold-in    seconds from the fault until the replacement expert worker served again
  tok/s      generated tokens / wall time of the whole run

    python benchmarks/failover.py [--model DIR] [--streams 16] [--tokens 96] [--step-timeout 10]
                                  [--scenarios none kill-expert kill-attention hang-expert]
                                  [--async-scheduling on|off]

A hung worker is found by the step timeout (--step-timeout, ClusterConfig.step_timeout_s), so its
pause is about that long by design.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time

import ray

from cluster import LLM, AsyncLLM, ClusterConfig, SamplingParams
from cluster.model.tiny import TinySpec, make_tiny
from scratch import scratch_dir


def prompts_for(n: int) -> list[list[int]]:
    return [[(i * 37 + j * 11) % 400 + 3 for j in range(4 + (i * 7) % 60)] for i in range(n)]


async def run_streams(llm: AsyncLLM, prompts, params, fault: str | None) -> dict:
    executor = llm.engine.executor
    victim = None
    if fault:  # the last worker of the role
        [*_, victim] = [info["pid"] for info in await llm.worker_info() if fault.endswith(info["role"])]
    started = [asyncio.Event() for _ in prompts]
    gaps: list[float] = []
    lost = 0
    fault_at = None

    async def stream(i: int) -> list[int]:
        nonlocal lost
        tokens, last = [], None
        try:
            async for out in llm.generate(prompts[i], params):
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                tokens += out.new_token_ids
                last = now
                if len(tokens) >= 8:
                    started[i].set()
        except Exception:  # noqa: BLE001 - counted: a lost request
            lost += 1
            started[i].set()
        return tokens

    async def inject() -> None:
        nonlocal fault_at
        for event in started:
            await event.wait()
        if victim is not None:
            fault_at = time.monotonic()
            os.kill(victim, signal.SIGSTOP if fault.startswith("hang") else signal.SIGKILL)

    start = time.monotonic()
    *tokens, _ = await asyncio.gather(*(stream(i) for i in range(len(prompts))), inject())
    wall = time.monotonic() - start
    folded = None
    if fault == "hang-expert":
        os.kill(victim, signal.SIGKILL)  # the stopped process is killed by recovery; make sure
    if fault and fault.endswith("expert"):
        deadline = time.monotonic() + 120
        while executor.starting and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the idle engine loop folds the replacement in
        folded = time.monotonic() - fault_at if not executor.starting else float("nan")
    return {"tokens": tokens, "lost": lost, "gaps": gaps, "wall": wall, "folded": folded,
            "recoveries": list(llm.engine.recoveries)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir (default: a tiny flagship-shaped one)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--step-timeout", type=float, default=10.0)
    parser.add_argument("--scenarios", nargs="+", default=["none", "kill-expert", "kill-attention", "hang-expert"],
                        choices=["none", "kill-expert", "kill-attention", "hang-expert"])
    parser.add_argument("--async-scheduling", choices=["on", "off"], default="on",
                        help="the engine sends step N + 1 before reading step N's replies (the default for Ray)")
    args = parser.parse_args()
    model = args.model or scratch_dir(prefix="epserve-failover-")
    if not args.model:
        make_tiny(model, TinySpec(seed=1))
    prompts = prompts_for(args.streams)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    reference = [c.token_ids for c in LLM(model=model).generate(prompts, params)]

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    print(f"{args.streams} streams x {args.tokens} greedy tokens, 1 attention + 2 expert workers, "
          f"step timeout {args.step_timeout:g} s")
    print(f"{'scenario':<15}{'lost':>6}{'changed':>9}{'recovery s':>12}{'pause s':>9}{'p50 gap ms':>12}"
          f"{'fold-in s':>11}{'tok/s':>8}")
    try:
        for scenario in args.scenarios:
            cluster = ClusterConfig(expert_workers=2, use_ray=True, step_timeout_s=args.step_timeout,
                                    async_scheduling=args.async_scheduling == "on")
            llm = AsyncLLM(model, cluster=cluster)
            try:
                asyncio.run(run_streams(llm, prompts[:2], params, None))  # warm: the first steps
                llm.engine.recoveries.clear()
                result = asyncio.run(run_streams(llm, prompts, params, None if scenario == "none" else scenario))
            finally:
                llm.shutdown()
            changed = sum(t != r for t, r in zip(result["tokens"], reference))
            recovery = sum(r["seconds"] for r in result["recoveries"])
            tokens = sum(len(t) for t in result["tokens"])
            folded = "-" if result["folded"] is None else f"{result['folded']:.2f}"
            print(f"{scenario:<15}{result['lost']:>6}{changed:>9}{recovery:>12.2f}{max(result['gaps']):>9.2f}"
                  f"{1e3 * statistics.median(result['gaps']):>12.1f}{folded:>11}{tokens / result['wall']:>8.0f}")
            for r in result["recoveries"]:
                print(f"  {r}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
