"""Dispatch and combine: the pair that moves routed tokens to the experts and back (after DeepEP).

    batch, handle = dispatcher.dispatch(layer, hidden_TD, topk_idx_TK, topk_weights_TK)
    expert_out = shard.forward(layer, batch)   # on whoever holds the experts
    out_TD = dispatcher.combine(expert_out, handle)

An ExpertBatch is what a worker's expert bank computes: rows, and for each row up to K' (bank index,
weight) pairs; the bank returns, per row, the weighted sum of those experts' outputs in pair order
(kernels.moe_experts). In one process the batch is the tokens themselves with their top-k (K' = K),
and combine has nothing left to do. Every worker of a model instance makes the same calls in the
same order (SPMD): a worker with no tokens dispatches T = 0 rows, a worker with no experts receives
R = 0 rows.
Shapes: T tokens, K top-k, D hidden, R rows received by this worker, K' pairs per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class ExpertBatch:
    hidden: torch.Tensor  # [R, D]
    expert_idx: torch.Tensor  # [R, K'] int64 index in this worker's bank; -1: no expert
    weights: torch.Tensor  # [R, K'] weight of each pair in the row's sum


class Dispatcher(Protocol):
    remote: bool  # the routed experts compute in other processes between dispatch and combine

    def dispatch(
        self,
        layer: int,
        hidden_TD: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
    ) -> tuple[ExpertBatch, Any]: ...

    def combine(self, expert_out_RD: torch.Tensor, handle: Any) -> torch.Tensor: ...


def weighted_sum(pair_out_PD: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """[T * K, D] results of (token, k) pairs in pair order -> [T, D], summed in k order."""
    T, K = weights_TK.shape
    weighted = pair_out_PD.view(T, K, pair_out_PD.shape[-1]) * weights_TK[..., None]
    out = weighted[:, 0].clone()
    for k in range(1, K):
        out += weighted[:, k]
    return out


class LocalDispatcher:
    """One process holds every routed expert: the tokens go to the bank as they are."""

    remote = False

    def __init__(self, local_index: dict[int, torch.Tensor]) -> None:
        # layer -> [E] global expert -> bank index; None where the bank is every expert in order
        identity = {layer: bool((t == torch.arange(t.numel(), device=t.device)).all()) for layer, t in local_index.items()}
        self.local_index = {layer: None if identity[layer] else t for layer, t in local_index.items()}

    def dispatch(self, layer, hidden_TD, topk_idx_TK, topk_weights_TK):
        table = self.local_index[layer]
        idx = topk_idx_TK if table is None else table[topk_idx_TK]
        return ExpertBatch(hidden_TD, idx, topk_weights_TK), None

    def combine(self, expert_out_RD, handle):
        return expert_out_RD
