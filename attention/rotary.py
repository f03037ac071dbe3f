"""Partial rotary position embedding (NeoX rotate-half on the first `rotary_dim` dims of a head):
the frequencies; the rotation itself is kernels.qk_norm_rope.

Qwen3.5's multimodal RoPE interleaves three position grids; for text all three are the token
position, which makes it ordinary RoPE.
"""

from __future__ import annotations

import torch
from torch import nn


class PartialRotary(nn.Module):
    def __init__(self, head_dim: int, rotary_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._frequencies(), persistent=False)

    def _frequencies(self) -> torch.Tensor:
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim
        return 1.0 / (self.theta**exponent)

    def reset_buffers(self) -> None:
        """Recomputes inv_freq in place (a model built on the meta device has none yet)."""
        with torch.no_grad():
            self.inv_freq.copy_(self._frequencies())
