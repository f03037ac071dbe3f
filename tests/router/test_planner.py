"""The placement planner and the load window, on synthetic loads (no model)."""

from __future__ import annotations

import random

import pytest
import torch

from router.load import ExpertLoadWindow
from router.placement import ExpertPlacement
from router.planner import PlacementPlanner, placement_stats, plan_layer, worker_loads


def zipf_loads(num_experts: int, skew: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    loads = [1000.0 / (rank + 1) ** skew for rank in range(num_experts)]
    rng.shuffle(loads)
    return loads


@pytest.mark.parametrize("skew", [0.0, 0.8, 1.2, 2.0])
@pytest.mark.parametrize("workers, slots", [(2, 0), (4, 4), (4, 16), (8, 8)])
def test_plan_bounds_on_skewed_loads(skew, workers, slots):
    E = 64
    loads = {layer: zipf_loads(E, skew, seed=layer) for layer in range(3)}
    contiguous = ExpertPlacement.contiguous(E, workers, list(loads))
    plan = PlacementPlanner(workers, slots).plan(loads, E, current=contiguous)
    before, after = placement_stats(loads, contiguous), placement_stats(loads, plan)
    assert after.mean_load == pytest.approx(before.mean_load)  # nothing is lost or double counted
    assert after.max_load <= before.max_load + 1e-9
    for layer, layer_loads in loads.items():
        held = plan.held[layer]
        assert all(len(set(ids)) == len(ids) for ids in held)  # no worker holds an expert twice
        assert sum(len(ids) for ids in held) in (E, E + min(slots, E * (workers - 1)))  # kept or planned
        per_worker = worker_loads(layer_loads, held)
        largest_share = max(layer_loads[e] / sum(e in ids for ids in held) for e in range(E))
        # greedy LPT bound: the busiest worker exceeds the mean by at most one replica's load
        assert max(per_worker) <= sum(per_worker) / workers + largest_share + 1e-9


def test_replicas_go_to_the_hottest_experts_and_cut_the_peak():
    loads = [100.0, 1, 1, 1, 1, 1, 1, 1]
    held = plan_layer(loads, num_workers=4, redundant_slots=3)
    assert sum(0 in ids for ids in held) == 4  # expert 0 on every worker
    assert max(worker_loads(loads, held)) <= 27.0  # vs 101 without replicas


def test_load_window_counts_and_slides():
    window = ExpertLoadWindow(num_layers=2, num_experts=5, window_steps=3)
    window.record(0, torch.tensor([[0, 1], [0, 4]]))
    window.advance()
    window.record(1, torch.tensor([[2, 3]]))
    assert window.totals().tolist() == [[2, 1, 0, 0, 1], [0, 0, 1, 1, 0]]
    window.advance()
    window.advance()  # the first step falls out of the window
    assert window.totals().tolist() == [[0] * 5, [0, 0, 1, 1, 0]]
