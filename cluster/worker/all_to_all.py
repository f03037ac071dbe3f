"""AllToAllDispatcher: dispatch and combine across a torch.distributed group (gloo on CPU, NCCL on GPU).

Ranks 0..A-1 are attention workers (tokens, no experts), ranks A..A+E-1 expert workers (experts,
no tokens). Per MoE layer every rank calls dispatch then combine, in layer order:

  dispatch: sort this rank's (token, k) pairs by (destination rank, local expert); exchange a
            [world, M] count matrix (int64 all-to-all); send the hidden rows (uneven all-to-all);
            each arrived row is one pair for one local expert (weight 1: the bank groups them).
  combine:  send results back along the reverse splits, put each result in its (token, k) slot
            and sum with the router weights in k order (router.weighted_sum), so the output does
            not depend on E, A or the placement.

Shapes: T tokens, K top-k, P = T * K pairs, D hidden, W world size, M max experts per worker,
R rows received.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from router import ExpertBatch, weighted_sum
from router.placement import ExpertPlacement


@dataclass
class AllToAllHandle:
    order: torch.Tensor  # [P]: send row i is pair order[i]
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    weights_TK: torch.Tensor


class AllToAllDispatcher:
    def __init__(
        self, placement: ExpertPlacement, num_attention_ranks: int, group=None, device="cpu"
    ) -> None:
        self.tables = {layer: placement.tables(layer).to(device) for layer in placement.held}
        self.max_local = {layer: placement.max_local(layer) for layer in placement.held}
        self.expert_rank_offset = num_attention_ranks
        self.group = group
        self.world_size = dist.get_world_size(group)

    def dispatch(self, layer, hidden_TD, topk_idx_TK, topk_weights_TK):
        W, M, D = self.world_size, self.max_local[layer], hidden_TD.shape[-1]
        K = topk_idx_TK.shape[1]
        worker_P, local_P = self.tables[layer].route(topk_idx_TK.reshape(-1))
        key_P = (worker_P + self.expert_rank_offset) * M + local_P
        key_sorted, order = torch.sort(key_P, stable=True)
        send_counts = torch.bincount(key_sorted, minlength=W * M)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        recv_WM = recv_counts.view(W, M)
        send_splits = send_counts.view(W, M).sum(1).tolist()
        recv_splits = recv_WM.sum(1).tolist()

        received = hidden_TD.new_empty(sum(recv_splits), D)
        dist.all_to_all_single(
            received, hidden_TD[order // K].contiguous(), recv_splits, send_splits, group=self.group
        )
        # rows arrive grouped by source rank, then local expert
        local_R = torch.arange(M, device=recv_counts.device).repeat(W).repeat_interleave(recv_WM.reshape(-1))
        batch = ExpertBatch(received, local_R[:, None], torch.ones_like(local_R[:, None], dtype=received.dtype))
        return batch, AllToAllHandle(order, send_splits, recv_splits, topk_weights_TK)

    def combine(self, expert_out_RD, handle: AllToAllHandle):
        results = expert_out_RD.new_empty(sum(handle.send_splits), expert_out_RD.shape[-1])
        dist.all_to_all_single(
            results, expert_out_RD.contiguous(), handle.send_splits, handle.recv_splits, group=self.group
        )
        pair_out = torch.empty_like(results)
        pair_out[handle.order] = results
        return weighted_sum(pair_out, handle.weights_TK)
