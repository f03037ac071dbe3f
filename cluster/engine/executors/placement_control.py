"""EngineCore's control of the expert placement, between steps: the load window, rebalancing
(experts load beside serving, the switch happens between two steps), scaling the expert workers,
and folding replacement workers back in after a failure. A mixin: EngineCore supplies the executor,
the configs and `_controlled` (a control operation that recovers from a worker failure)."""

from __future__ import annotations

import logging
import threading
import time

import torch

from router import ExpertPlacement, PlacementPlanner, PlanStats, placement_stats
from router.planner import worker_loads

log = logging.getLogger(__name__)


class PlacementChange:
    """A rebalance under way (EngineCore.start_rebalance): `done` is set once the workers have
    switched, or the change failed and the last placement stays."""

    def __init__(self, result: dict) -> None:
        self.result, self.error = result, None
        self.done = threading.Event()

    @classmethod
    def finished(cls, result: dict) -> PlacementChange:
        change = cls(result)
        change.done.set()
        return change

    def fail(self, error: Exception) -> None:
        self.error = error
        self.done.set()

    def wait(self, timeout: float | None = None) -> dict:
        """The placement and the load statistics before and after; raises what made it fail."""
        if not self.done.wait(timeout):
            raise TimeoutError("the rebalance has not finished")
        if self.error is not None:
            raise self.error
        return self.result


class PlacementControl:
    """EngineCore's expert-placement methods (self._change: the rebalance loading, or None)."""

    def expert_load(self) -> torch.Tensor:
        """[layers, experts] (token, expert) pairs routed over the load window."""
        return self._controlled("reading the expert load", self.executor.expert_load)

    def _loads(self) -> dict[int, list[int]]:
        totals = self.expert_load().tolist()
        return {layer: totals[layer] for layer in self.config.moe_layer_ids}

    def expert_status(self) -> dict:
        """The load window {layer: pairs per expert}, the placement (None in one process) and, with a
        placement, {layer: load per worker} and the PlanStats."""
        loads, placement = self._loads(), self.executor.placement
        if placement is None:
            return {"load": loads, "placement": None, "worker_loads": None, "stats": None}
        return {"load": loads, "placement": placement,
                "worker_loads": {layer: worker_loads(row, placement.held[layer]) for layer, row in loads.items()},
                "stats": placement_stats(loads, placement)}

    def start_rebalance(self, redundant_slots: int | None = None) -> PlacementChange:
        """Plans a placement for the current load window; the expert workers load what it needs
        beside serving and the switch happens between two steps (maintain()). The returned change
        completes with the placement and the max / mean worker load before and after (PlanStats)."""
        current: ExpertPlacement | None = self.executor.placement
        loads = self._loads()
        if current is None:  # one process: every expert is local
            stats = PlanStats(max_load=sum(sum(v) for v in loads.values()),
                              mean_load=sum(sum(v) for v in loads.values()))
            return PlacementChange.finished({"placement": None, "before": stats, "after": stats, "bytes_loaded": 0})
        if self._change is not None:
            raise RuntimeError("a rebalance is already under way")
        slots = redundant_slots if redundant_slots is not None else self.rebalance_config.redundant_slots
        if slots is None:
            slots = self.config.num_experts // 16
        new = PlacementPlanner(current.num_workers, slots).plan(loads, self.config.num_experts, current)
        result = {"placement": new, "before": placement_stats(loads, current),
                  "after": placement_stats(loads, new), "bytes_loaded": 0}
        if new == current:
            return PlacementChange.finished(result)
        self._controlled("rebalancing", lambda: self.executor.begin_placement(new))
        self._change = PlacementChange(result)
        return self._change

    def rebalance(self, redundant_slots: int | None = None) -> dict:
        """start_rebalance, then wait for the switch (maintaining here: for callers that own the loop)."""
        change = self.start_rebalance(redundant_slots)
        deadline = time.monotonic() + self.cluster.timeout_s
        while not change.done.is_set() and time.monotonic() < deadline:
            self.maintain()
            change.done.wait(0.01)
        return change.wait(0)

    def maintain(self) -> None:
        """Work between steps that never waits: folds replacement expert workers back in once they
        have started, switches to a prepared placement."""
        if getattr(self.executor, "starting", None):
            try:
                folded = self._controlled("folding in replacement workers", self.executor.fold_in)
            except RuntimeError as e:
                log.warning("%s", e)
            else:
                if folded:
                    log.warning("folded in %s", folded)
        change = self._change
        if change is not None and (self.executor.preparing is None or self.executor.placement_prepared()):
            self._change = None
            try:
                if self.executor.preparing is None:  # dropped by a recovery
                    raise RuntimeError("a worker failure interrupted the rebalance; the placement is unchanged")
                change.result["bytes_loaded"] = self._controlled("rebalancing", self.executor.commit_placement)
            except RuntimeError as e:
                change.fail(e)
            else:
                change.done.set()

    @property
    def busy_in_background(self) -> bool:
        """Replacements starting or a placement loading: maintain() has work to finish."""
        return bool(getattr(self.executor, "starting", None)) or self._change is not None

    def scale_experts(self, num_workers: int) -> dict:
        """Adds or removes expert workers between steps (new links, contiguous placement);
        requests in flight keep their caches on the attention workers."""
        if self.executor.placement is None:
            raise ValueError("scale_experts needs the Ray executor (use_ray=True)")
        if not 1 <= num_workers <= self.config.num_experts:
            raise ValueError(f"expert workers must be in 1..{self.config.num_experts}, got {num_workers}")
        placement = ExpertPlacement.contiguous(self.config.num_experts, num_workers, list(self.config.moe_layer_ids))
        self._controlled("scaling the expert workers", lambda: self.executor.scale_experts(num_workers, placement))
        return {"expert_workers": num_workers, "placement": placement}

    def _maybe_rebalance(self) -> None:
        policy = self.rebalance_config
        self._steps += 1
        if not policy.enabled or self._steps % policy.interval_steps or self.executor.placement is None:
            return
        try:
            if self._change is None and not self.busy_in_background and (
                    placement_stats(self._loads(), self.executor.placement).imbalance > policy.imbalance_threshold):
                self.start_rebalance()
        except RuntimeError as e:  # recovered at the placement that worked; serving goes on
            log.warning("%s", e)
