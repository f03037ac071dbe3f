"""The shared expert: one dense SwiGLU MLP every token goes through, beside the routed experts.

The MoE layer scales its output by `sigmoid(shared_expert_gate(x))` (see router.moe_layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SharedExpert(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_TD)) * self.up_proj(x_TD))
