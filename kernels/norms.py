"""RMSNorms of Qwen3.5: zero-centred `rms(x) * (1 + w)` (layers, q/k, final), its fused
residual-add form, and Gated DeltaNet's `w * rms(x) * silu(z)`. Shapes: rows of D."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import glue, native


@glue
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (1.0 + weight.float())).type_as(x)


@glue
def gated_rms_norm_reference(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * x32.to(dtype)
    return (out * F.silu(z.float())).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Over the last dim (D = weight's size) of x [R, D] or [R, G, D] (strided rows and heads)."""
    if native(x):
        return torch.ops.epserve.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + delta, rms_norm(x + delta)) for [T, D]: the residual stream and the next sublayer's input."""
    if native(x):
        return torch.ops.epserve.add_rms_norm(x, delta, weight, eps)
    return add_rms_norm_reference(x, delta, weight, eps)


@glue
def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    total = x + delta
    return total, rms_norm_reference(total, weight, eps)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * rms(x) * silu(z) over the last dim of x, z [R, D] or [R, G, D]."""
    if native(x):
        return torch.ops.epserve.gated_rms_norm(x, z, weight, eps)
    return gated_rms_norm_reference(x, z, weight, eps)
