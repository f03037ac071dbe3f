"""ExpertLoadWindow: per-layer, per-expert token counts over a sliding window of steps.

One bincount per MoE layer per step and a ring of W step slots: cheap enough to stay on in
production. Counts are (token, expert) pairs routed, i.e. each token counts once for each of its
top-k experts. Shapes: W window slots, L MoE layers, E experts.
"""

from __future__ import annotations

import torch


class ExpertLoadWindow:
    def __init__(self, num_layers: int, num_experts: int, window_steps: int = 64) -> None:
        self.num_experts = num_experts
        self.counts = torch.zeros(window_steps, num_layers, num_experts, dtype=torch.long)  # [W, L, E]
        self.slot = 0

    def record(self, layer: int, topk_idx_TK: torch.Tensor) -> None:
        if topk_idx_TK.numel():
            counts = torch.bincount(topk_idx_TK.reshape(-1).cpu(), minlength=self.num_experts)
            self.counts[self.slot, layer] += counts

    def advance(self) -> None:
        """Starts the next step's slot, dropping the oldest."""
        self.slot = (self.slot + 1) % self.counts.shape[0]
        self.counts[self.slot].zero_()

    def totals(self) -> torch.Tensor:
        """[L, E] pairs routed to each expert over the window."""
        return self.counts.sum(0)
