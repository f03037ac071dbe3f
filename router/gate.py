"""The router gate: logits -> softmax (fp32, all experts) -> top-k -> renormalise to sum 1."""

from __future__ import annotations

import torch
from torch import nn


class TopKGate(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns topk_idx [T, K] (int64 expert ids) and topk_weights [T, K] (x's dtype)."""
        logits = x_TD @ self.weight.T
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return idx, weights.to(logits.dtype)
