"""PlacementPlanner: which experts get replicas and where every replica goes (plain Python).

Given each layer's per-expert load, the number of expert workers W and a budget of R redundant
slots per layer:
  1. replicas: R times, give one more replica to the expert with the highest load per replica
     (at most one replica per worker);
  2. placement: longest-processing-time first — replicas in decreasing load order, each to the
     worker with the least load so far that has a free slot (E + R slots split evenly) and does
     not hold that expert yet.
Dispatch splits a replicated expert's tokens evenly over its replicas, so a replica carries
load / replicas. The objective is the largest worker load; its ratio to the mean is the imbalance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .placement import ExpertPlacement


@dataclass(frozen=True)
class PlanStats:
    """Every MoE layer waits for its busiest worker, so a step costs the sum over layers of each
    layer's largest worker load: max_load is that sum, mean_load the sum of the layers' means."""

    max_load: float
    mean_load: float

    @property
    def imbalance(self) -> float:
        return self.max_load / self.mean_load if self.mean_load else 1.0


def worker_loads(loads: list[float], held: tuple[tuple[int, ...], ...]) -> list[float]:
    """Expected load of each worker when every expert's tokens are split evenly over its replicas."""
    replicas = [0] * len(loads)
    for ids in held:
        for e in ids:
            replicas[e] += 1
    return [sum(loads[e] / replicas[e] for e in ids) for ids in held]


def placement_stats(loads: dict[int, list[float]], placement: ExpertPlacement) -> PlanStats:
    max_load = mean_load = 0.0
    for layer, layer_loads in loads.items():
        per_worker = worker_loads(layer_loads, placement.held[layer])
        max_load += max(per_worker)
        mean_load += sum(per_worker) / len(per_worker)
    return PlanStats(max_load, mean_load)


def plan_layer(loads: list[float], num_workers: int, redundant_slots: int) -> tuple[tuple[int, ...], ...]:
    E = len(loads)
    replicas = [1] * E
    for _ in range(redundant_slots):
        candidates = [e for e in range(E) if replicas[e] < num_workers]
        if not candidates:
            break
        hottest = max(candidates, key=lambda e: (loads[e] / replicas[e], -e))
        replicas[hottest] += 1
    capacity = math.ceil(sum(replicas) / num_workers)
    items = sorted(((loads[e] / replicas[e], e) for e in range(E) for _ in range(replicas[e])),
                   key=lambda item: (-item[0], item[1]))
    load = [0.0] * num_workers
    held: list[set[int]] = [set() for _ in range(num_workers)]
    for share, e in items:
        eligible = [w for w in range(num_workers) if e not in held[w] and len(held[w]) < capacity]
        if not eligible:  # capacity and distinctness can clash at the very end: relax capacity
            eligible = [w for w in range(num_workers) if e not in held[w]]
        w = min(eligible, key=lambda w: (load[w], len(held[w]), w))
        held[w].add(e)
        load[w] += share
    return tuple(tuple(sorted(ids)) for ids in held)


class PlacementPlanner:
    def __init__(self, num_workers: int, redundant_slots: int) -> None:
        if num_workers < 1 or redundant_slots < 0:
            raise ValueError(f"need num_workers >= 1 and redundant_slots >= 0, got {num_workers}, {redundant_slots}")
        self.num_workers, self.redundant_slots = num_workers, redundant_slots

    def plan(self, loads: dict[int, list[float]], num_experts: int,
             current: ExpertPlacement | None = None) -> ExpertPlacement:
        """A layer keeps its current placement unless the plan lowers its busiest worker's load
        (LPT under equal slot counts is not always better, and moving weights costs)."""
        held = {}
        for layer, layer_loads in loads.items():
            new = plan_layer(layer_loads, self.num_workers, self.redundant_slots)
            if current is not None and current.num_workers == self.num_workers:
                old = current.held[layer]
                if max(worker_loads(layer_loads, old)) <= max(worker_loads(layer_loads, new)):
                    new = old
            held[layer] = new
        return ExpertPlacement(num_experts, held)
