"""Partial rotary position embedding (NeoX rotate-half on the first `rotary_dim` dims of a head).

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
        exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponent), persistent=False)

    def cos_sin(self, positions_T: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        freqs = positions_T[:, None].float() * self.inv_freq  # [T, rotary_dim / 2]
        angles = torch.cat([freqs, freqs], dim=-1)  # [T, rotary_dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def cos_sin_for(self, batch, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos/sin of a ForwardBatch's positions, computed once per step for every attention layer."""
        key = ("rotary", dtype)
        if key not in batch.memo:
            batch.memo[key] = self.cos_sin(batch.positions, dtype)
        return batch.memo[key]

    def forward(self, x_THd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; cos, sin: [T, rotary_dim]."""
        rot, rest = x_THd[..., : self.rotary_dim], x_THd[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        rot = rot * cos[:, None] + rotated_half * sin[:, None]
        return torch.cat([rot, rest], dim=-1)
