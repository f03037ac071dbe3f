"""Expert load balance and decode speed before and after a live rebalance, on a skewed router.

    python benchmarks/rebalance.py [--skew 8] [--experts 4] [--slots 32] [--batch 16] [--steps 32]
                                   [--heatmap /tmp/epserve-load.png]

Makes a default-shaped tiny checkpoint whose router favours a few experts per layer
(`epserve make-tiny --router-skew`), runs it on Ray with E expert workers (contiguous placement),
fills the load window with a decode workload, then measures: worker load (max / mean, summed over
layers; see router.planner.PlanStats), decode tokens/s and the slowest expert worker's compute per
step — before and after `rebalance()` (which adds `--slots` replicas per layer), in one process.
"""

from __future__ import annotations

import argparse

import ray
import torch

from expert_parallel import run_decode  # benchmarks/ is on the path when run as a script

from cluster import LLM
from cluster.worker.timing import split_step
from cluster.model.tiny import TinySpec, make_tiny
from router import placement_stats
from scratch import scratch_dir


def decode_run(llm: LLM, batch: int, steps: int) -> tuple[float, float]:
    """tokens/s over `steps` decode steps of `batch` sequences; slowest expert worker ms/step."""
    prompts = [[(17 * i + 31 * j) % 400 + 3 for j in range(32)] for i in range(batch)]
    wall, timings = run_decode(llm, prompts, steps)
    return batch / wall, split_step(timings)["experts"] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skew", type=float, default=8.0)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--heatmap", default=None, help="write a PNG of the load before and after (deploy.heatmap)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = make_tiny(scratch_dir(), TinySpec(router_skew=args.skew))
    ray.init(include_dashboard=False, logging_level="ERROR")
    with LLM(model=model_dir, expert_workers=args.experts, use_ray=True) as llm:
        decode_run(llm, args.batch, args.steps)  # fills the load window
        load = llm.expert_load()
        loads = {layer: [float(x) for x in row] for layer, row in enumerate(load.tolist())}
        before_placement = llm.executor.placement
        tps_before, experts_before = decode_run(llm, args.batch, args.steps)
        result = llm.rebalance(redundant_slots=args.slots)
        tps_after, experts_after = decode_run(llm, args.batch, args.steps)
        after_placement = llm.executor.placement
    ray.shutdown()
    before, after = placement_stats(loads, before_placement), placement_stats(loads, after_placement)
    share = (load.float() / load.sum(1, keepdim=True)).topk(8).values.sum(1)
    print(f"router skew {args.skew}: the 8 hottest experts take {share.min():.0%}-{share.max():.0%} of a layer's "
          f"pairs; E={args.experts} expert workers, decode batch {args.batch}, {args.steps} steps, 1 thread/worker")
    print(f"{'':<22}{'max load':>10}{'mean load':>11}{'max/mean':>10}{'decode tok/s':>14}{'experts ms/step':>17}")
    print(f"{'contiguous':<22}{before.max_load:10.0f}{before.mean_load:11.0f}{before.imbalance:10.2f}"
          f"{tps_before:14.1f}{experts_before:17.2f}")
    print(f"{'rebalanced (+%d/layer)' % args.slots:<22}{after.max_load:10.0f}{after.mean_load:11.0f}"
          f"{after.imbalance:10.2f}{tps_after:14.1f}{experts_after:17.2f}")
    print(f"rebalance loaded {result['bytes_loaded'] / 2**20:.1f} MiB of expert weights")
    if args.heatmap:
        from deploy.heatmap import write_heatmap

        snapshots = [(tag, load.tolist(), [[list(ids) for ids in placement.held[layer]] for layer in sorted(placement.held)])
                     for tag, placement in (("before", before_placement), ("after", after_placement))]
        print(f"picture: {write_heatmap(args.heatmap, snapshots)}")


if __name__ == "__main__":
    main()
