"""y = x W^T. Decode batches (a few rows) go through a C++ kernel that streams the weight once,
split across threads by output rows; larger batches through torch's BLAS (MKL / oneDNN).
Shapes: x [M, K] (last dim contiguous), weight [N, K] -> [M, N]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import native

SMALL_ROWS = 8  # up to here the C++ kernel beats the BLAS call on small CPUs (benchmarks/peer.py)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if x.shape[0] <= SMALL_ROWS and native(x):
        return torch.ops.epserve.linear_rows(x, weight)
    return F.linear(x, weight)
