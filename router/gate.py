"""The router gate: logits -> softmax (fp32, all experts) -> top-k -> renormalise to sum 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import topk_softmax


class TopKGate(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def select(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """topk_idx [T, K] (int64 expert ids, most likely first) and topk_weights [T, K] (logits' dtype)."""
        return topk_softmax(logits_TE, self.top_k)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.select(F.linear(x_TD, self.weight))
