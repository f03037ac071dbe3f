"""The MoE exchange between attention and expert workers: one message each way per layer.

Dispatch (on an attention worker with T rows): every expert worker gets one message holding the
T hidden rows and, per row, the K (bank index, weight) pairs of that worker's experts (index -1
where another worker holds the expert: kernels.moe_experts counts such a pair for nothing, so the
weights go out as the gate gave them, the same to every worker). The step command already told
every worker how many rows each attention worker has, so no count exchange comes first and
nothing waits on a size. Combine: each expert worker computes, per row, the weighted sum over its
own experts (kernels.moe_experts, fp64) and sends back one partial sum per row; the attention
worker adds them and rounds once, which gives the bits of a single process holding every expert.

A row travels once to each expert worker (with top-10 routing over a handful of workers nearly
every row has an expert on each: 1 - (1 - 1/E)^10 is 99.9% for E = 2, 94% for E = 4).
Message layout: hidden [T, D] in the model dtype | idx [T, K] int32 | weights [T, K] fp32, as
contiguous blocks, so the receiver views them in place.
Shapes: T rows of an attention worker, K top-k, D hidden, E expert workers, R rows at an expert.
"""

from __future__ import annotations

import torch

from router import ExpertBatch
from router.placement import ExpertPlacement

from .links import Link, LinkError


def message_bytes(rows: int, hidden: int, top_k: int, dtype: torch.dtype) -> int:
    """Bytes of one dispatch message of `rows` rows."""
    return rows * (hidden * dtype.itemsize + 8 * top_k)


class LinkDispatcher:
    """The attention worker's side: sends each layer's rows to every expert worker, then adds the
    partial sums that come back (router.Dispatcher)."""

    remote = True

    def __init__(self, placement: ExpertPlacement, expert_links: list[Link], device="cpu") -> None:
        self.tables = {layer: placement.tables(layer).to(device) for layer in placement.held}
        self.links = expert_links
        self.device = device
        self._nothing_local: dict[torch.dtype, ExpertBatch] = {}  # the empty batch of local experts

    def dispatch(self, layer, hidden_TD, topk_idx_TK, topk_weights_TK):
        idx = self.tables[layer].route(topk_idx_TK)  # [E, T, K]
        weights = topk_weights_TK.float()
        nothing = self._nothing_local.get(hidden_TD.dtype)
        if nothing is None:
            nothing = ExpertBatch(hidden_TD[:0].clone(), idx[0, :0].clone(), weights[:0].clone())
            self._nothing_local[hidden_TD.dtype] = nothing
        if hidden_TD.device.type != "cpu":  # to the host once, not once a link
            hidden_TD, idx, weights = hidden_TD.cpu(), idx.cpu(), weights.cpu()
        for e, link in enumerate(self.links):
            link.send(hidden_TD, idx[e], weights)
        return nothing, hidden_TD.shape

    def combine(self, expert_out_RD, shape):
        """Adds the fp64 partial sums of every expert worker and rounds once: [T, D] in the model
        dtype, the same bits as one worker holding every expert (kernels.moe_experts)."""
        parts = [link.recv().view(torch.float64).view(shape).to(self.device) for link in self.links]
        # a new tensor before the links' buffers are reused by their next messages
        total = parts[0].clone() if len(parts) == 1 else torch.add(parts[0], parts[1])
        for part in parts[2:]:
            total += part
        return total.float().to(expert_out_RD.dtype)


class ExpertServer:
    """The expert worker's side of a layer: receives every attention worker's rows, computes the
    weighted sum over its experts per row, and answers each with its partial sums."""

    def __init__(self, attention_links: list[Link], hidden_size: int, top_k: int, dtype: torch.dtype,
                 device="cpu", timer=None) -> None:
        self.links = attention_links
        self.hidden_size, self.top_k, self.dtype, self.device = hidden_size, top_k, dtype, device
        self.timer = timer  # anything with .phase(name): "experts" is the compute alone
        self.bytes_in = 0  # dispatch bytes received, for the benchmark

    def _unpack(self, message: torch.Tensor, rows: int) -> ExpertBatch:
        D, K = self.hidden_size, self.top_k
        if message.numel() != message_bytes(rows, D, K, self.dtype):
            raise LinkError(f"dispatch of {message.numel()} bytes, expected {rows} rows")
        split = rows * D * self.dtype.itemsize
        hidden = message[:split].view(self.dtype).view(rows, D)
        idx = message[split : split + 4 * rows * K].view(torch.int32).view(rows, K)
        weights = message[split + 4 * rows * K :].view(torch.float32).view(rows, K)
        return ExpertBatch(hidden.to(self.device), idx.to(self.device), weights.to(self.device))

    def serve(self, layer: int, rows: list[int], shard) -> None:
        """rows[a]: rows attention worker a sends this step (0: it sends nothing)."""
        batches = []
        for link, n in zip(self.links, rows):
            if n:
                message = link.recv()
                self.bytes_in += message.numel()
                batches.append(self._unpack(message, n))  # a view of this link's own buffer
        if not batches:
            return
        if len(batches) == 1:
            batch = batches[0]
        else:
            batch = ExpertBatch(*(torch.cat(parts) for parts in zip(
                *((b.hidden, b.expert_idx, b.weights) for b in batches))))
        with self.timer.phase("experts"):
            out = shard.forward(layer, batch, partial=True)  # fp64: the attention worker adds them exactly
        start = 0
        for link, n in zip(self.links, rows):
            if n:
                link.send(out[start : start + n])
                start += n
