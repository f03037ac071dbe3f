"""The shared expert: one dense SwiGLU MLP every token goes through, beside the routed experts.

The MoE layer scales its output by `sigmoid(shared_expert_gate(x))` (see router.moe_layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import fuse_weights, linear


class SharedExpert(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up: torch.Tensor | None = None  # [2I, D] once fused

    def fuse(self) -> None:
        """After loading: one matmul for gate and up."""
        self.gate_up = fuse_weights(self.gate_proj, self.up_proj)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x_TD, self.gate_up).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.down_proj.weight)
