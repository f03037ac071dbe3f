"""The two RMSNorms of Qwen3.5: zero-centred `(1 + w)` for layers/q/k/final, and DeltaNet's gated norm."""

from __future__ import annotations

import torch
from torch import nn

from kernels import add_rms_norm, gated_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """rmsnorm(x in fp32) * (1 + w); w starts at 0 (zero-centred, as the checkpoint stores it)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)): adds a sublayer's output to the residual stream and norms it."""
        return add_rms_norm(x, delta, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """w * rmsnorm(x) * silu(z), the norm on Gated DeltaNet's output; w starts at 1 (no `1 +`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps)
