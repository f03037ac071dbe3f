"""The shared expert: one dense SwiGLU MLP every token goes through, beside the routed experts,
scaled by `sigmoid(shared_expert_gate(x))` (the gate's logit comes from router.moe_layer)."""

from __future__ import annotations

import torch
from torch import nn

from kernels import add_shared_expert, fuse_weights, weight_of


class SharedExpert(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up: torch.Tensor | None = None  # [2I, D] once fused
        self.down: torch.Tensor | None = None  # once fused: down_proj's weight as kernels.linear takes it

    def fuse(self) -> None:
        """After loading: one matmul for gate and up."""
        self.gate_up = fuse_weights(self.gate_proj, self.up_proj)
        self.down = weight_of(self.down_proj)

    def forward(self, x_TD: torch.Tensor, gate_logit_T1: torch.Tensor, routed_TD: torch.Tensor) -> torch.Tensor:
        """routed + sigmoid(gate_logit) * SwiGLU(x)."""
        return add_shared_expert(x_TD, self.gate_up, self.down, gate_logit_T1, routed_TD)
