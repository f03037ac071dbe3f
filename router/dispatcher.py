"""Dispatch and combine: the pair that moves routed tokens to the experts and back (after DeepEP).

    batch, handle = dispatcher.dispatch(layer, hidden_TD, topk_idx_TK, topk_weights_TK)
    expert_out = shard.forward(layer, batch.hidden, batch.counts)   # on whoever holds the experts
    out_TD = dispatcher.combine(expert_out, handle)

Every worker of a model instance makes the same calls in the same order (SPMD): a worker with no
tokens dispatches T = 0 rows, a worker with no experts receives R = 0 rows. `combine` weights each
(token, k) result by its router weight and sums over k in k order, so the sum does not depend on
how experts are spread over workers.
Shapes: T tokens, K top-k, D hidden, R rows received by this worker (sorted by local expert).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class ExpertBatch:
    """Rows received by this worker: hidden [R, D] sorted by local expert; counts[i] rows for
    local expert i of the layer's bank."""

    hidden: torch.Tensor
    counts: list[int]


class Dispatcher(Protocol):
    def dispatch(
        self,
        layer: int,
        hidden_TD: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
    ) -> tuple[ExpertBatch, Any]: ...

    def combine(self, expert_out_RD: torch.Tensor, handle: Any) -> torch.Tensor: ...


@dataclass
class LocalHandle:
    order: torch.Tensor  # [T * K]: row r of the expert batch is (token, k) pair order[r]
    weights_TK: torch.Tensor


def weighted_sum(pair_out_PD: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """[T * K, D] results of (token, k) pairs in pair order -> [T, D], summed in k order."""
    T, K = weights_TK.shape
    weighted = pair_out_PD.view(T, K, pair_out_PD.shape[-1]) * weights_TK[..., None]
    out = weighted[:, 0].clone()
    for k in range(1, K):
        out += weighted[:, k]
    return out


class LocalDispatcher:
    """One process holds every routed expert: dispatch is a sort by expert, combine its inverse."""

    def __init__(self, local_index: dict[int, torch.Tensor], num_local: dict[int, int]) -> None:
        self.local_index = local_index  # layer -> [E] global expert -> local index
        self.num_local = num_local  # layer -> experts in the local bank

    def dispatch(self, layer, hidden_TD, topk_idx_TK, topk_weights_TK):
        K = topk_idx_TK.shape[1]
        local = self.local_index[layer][topk_idx_TK.reshape(-1)]  # [T * K]
        if bool((local < 0).any()):
            raise RuntimeError(f"layer {layer}: routed to an expert that is not held locally")
        local_sorted, order = torch.sort(local, stable=True)
        counts = torch.bincount(local_sorted, minlength=self.num_local[layer]).tolist()
        batch = ExpertBatch(hidden=hidden_TD[order // K], counts=counts)
        return batch, LocalHandle(order=order, weights_TK=topk_weights_TK)

    def combine(self, expert_out_RD, handle: LocalHandle):
        pair_out = torch.empty_like(expert_out_RD)
        pair_out[handle.order] = expert_out_RD
        return weighted_sum(pair_out, handle.weights_TK)
