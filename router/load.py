"""ExpertLoadWindow: per-layer, per-expert token counts over a sliding window of steps.

One scatter-add per MoE layer per step (or a count inside kernels.moe_block), on the model's
device (no host transfer on the hot path), into a ring of W step slots: cheap enough to stay on in
production. Counts are (token, expert) pairs routed, i.e. each token counts once for each of its
top-k experts. Shapes: W window slots, L MoE layers, E experts.
"""

from __future__ import annotations

import torch


class ExpertLoadWindow:
    def __init__(self, num_layers: int, num_experts: int, window_steps: int = 64,
                 device: torch.device | str = "cpu") -> None:
        self.num_experts = num_experts
        self.counts = torch.zeros(window_steps, num_layers, num_experts, dtype=torch.long, device=device)
        self.slot = 0
        self._ones = torch.ones(0, dtype=torch.long, device=device)

    def record(self, layer: int, topk_idx_TK: torch.Tensor) -> None:
        flat = topk_idx_TK.reshape(-1)
        if self._ones.numel() < flat.numel():
            self._ones = torch.ones(2 * flat.numel(), dtype=torch.long, device=flat.device)
        self.counts[self.slot, layer].index_add_(0, flat, self._ones[: flat.numel()])

    def row(self, layer: int) -> torch.Tensor:
        """This step's counts of a layer, [E] (a view: a kernel that routes adds to it in place)."""
        return self.counts[self.slot, layer]

    def step_rows(self) -> torch.Tensor:
        """This step's counts of every layer, [L, E] (a view, as row's)."""
        return self.counts[self.slot]

    def advance(self) -> None:
        """Starts the next step's slot, dropping the oldest."""
        self.slot = (self.slot + 1) % self.counts.shape[0]
        self.counts[self.slot].zero_()

    def reset(self) -> None:
        self.counts.zero_()
        self.slot = 0

    def totals(self) -> torch.Tensor:
        """[L, E] pairs routed to each expert over the window (on the host)."""
        return self.counts.sum(0).cpu()
