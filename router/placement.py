"""Expert placement: which worker holds which experts of each MoE layer, and the lookup tables
dispatch uses to send a (token, expert) pair to a worker.

An expert may be held by several workers (replicas); dispatch then spreads its pairs over the
replicas by pair index, deterministically. Plain Python lists in, int64 tables out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """held[layer][worker] = sorted global expert ids that worker holds in that layer."""

    num_experts: int
    held: dict[int, tuple[tuple[int, ...], ...]]

    def __post_init__(self) -> None:
        for layer, workers in self.held.items():
            covered = {e for ids in workers for e in ids}
            missing = set(range(self.num_experts)) - covered
            if missing:
                raise ValueError(f"layer {layer}: experts {sorted(missing)[:8]} are held by no worker")
            for w, ids in enumerate(workers):
                if list(ids) != sorted(set(ids)) or (ids and not 0 <= ids[0] <= ids[-1] < self.num_experts):
                    raise ValueError(f"layer {layer}, worker {w}: expert ids must be sorted, unique, in range")

    @property
    def num_workers(self) -> int:
        return len(next(iter(self.held.values())))

    @classmethod
    def contiguous(cls, num_experts: int, num_workers: int, layers: list[int]) -> ExpertPlacement:
        """Worker w holds experts [w * E / W, (w + 1) * E / W): blocks as even as they can be."""
        if not 1 <= num_workers <= num_experts:
            raise ValueError(f"expert workers must be in 1..{num_experts}, got {num_workers}")
        bounds = [round(w * num_experts / num_workers) for w in range(num_workers + 1)]
        blocks = tuple(tuple(range(bounds[w], bounds[w + 1])) for w in range(num_workers))
        return cls(num_experts, {layer: blocks for layer in layers})

    def without_workers(self, lost: list[int]) -> ExpertPlacement:
        """The placement over the other workers (in order) after `lost` are gone: an expert they
        alone held goes to the survivor holding fewest experts of that layer (replicas elsewhere
        simply serve it)."""
        kept = [w for w in range(self.num_workers) if w not in set(lost)]
        if not kept:
            raise ValueError("no worker would be left")
        held = {}
        for layer, workers in self.held.items():
            survivors = [list(workers[w]) for w in kept]
            covered = {e for ids in survivors for e in ids}
            for e in sorted(set(range(self.num_experts)) - covered):
                min(survivors, key=len).append(e)  # the first of the least loaded
            held[layer] = tuple(tuple(sorted(ids)) for ids in survivors)
        return ExpertPlacement(self.num_experts, held)

    def max_local(self, layer: int) -> int:
        return max(len(ids) for ids in self.held[layer])

    def tables(self, layer: int) -> RoutingTables:
        replicas: list[list[tuple[int, int]]] = [[] for _ in range(self.num_experts)]
        for w, ids in enumerate(self.held[layer]):
            for local, e in enumerate(ids):
                replicas[e].append((w, local))
        width = max(len(r) for r in replicas)
        bank = torch.full((len(self.held[layer]), self.num_experts, width), -1, dtype=torch.int32)
        for e, r in enumerate(replicas):
            for i, (w, local) in enumerate(r):
                bank[w, e, i] = local
        count = torch.tensor([len(r) for r in replicas])
        return RoutingTables(bank, count)


@dataclass(frozen=True)
class RoutingTables:
    """bank[w, e, i]: replica i of expert e, as its index in worker w's bank where w holds that
    replica, else -1; count[e] replicas (i < count[e])."""

    bank: torch.Tensor  # [workers, experts, width] int32
    count: torch.Tensor  # [experts]

    def to(self, device) -> RoutingTables:
        return RoutingTables(self.bank.to(device), self.count.to(device))

    def route(self, expert_TK: torch.Tensor) -> torch.Tensor:
        """[workers, T, K] bank index of each (token, k) pair on each worker, -1 on the workers that
        do not serve it: pair p of expert e goes to replica p mod count[e] (one gather when every
        expert has one copy)."""
        if self.bank.shape[2] == 1:
            return self.bank[:, expert_TK, 0]
        pair = torch.arange(expert_TK.numel(), device=expert_TK.device).view_as(expert_TK)
        return self.bank[:, expert_TK, pair % self.count[expert_TK]]
