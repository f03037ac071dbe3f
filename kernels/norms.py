"""RMSNorms of Qwen3.5: zero-centred `rms(x) * (1 + w)` (layers, q/k, final), its fused
residual-add form, and Gated DeltaNet's `w * rms(x) * silu(z)`. Shapes: [..., D] rows of D."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import native


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (1.0 + weight.float())).type_as(x)


def gated_rms_norm_reference(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * x32.to(dtype)
    return (out * F.silu(z.float())).to(dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., G, D] as 2-D rows for the kernels, without a copy where the strides allow: [T, G * D]
    when each row's G groups are contiguous (heads sliced from a projection), else [T * G, D]."""
    if x.dim() == 3 and x.stride(1) == x.shape[2] and x.stride(2) == 1:
        return x.view(x.shape[0], x.shape[1] * x.shape[2])
    return x.reshape(-1, x.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Over the last dim (D = weight's size) of x [..., D]."""
    if native(x):
        return torch.ops.epserve.rms_norm(_rows(x), weight, eps).view(x.shape)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + delta, rms_norm(x + delta)): the residual stream and the next sublayer's input."""
    if native(x):
        total, normed = torch.ops.epserve.add_rms_norm(_rows(x), _rows(delta), weight, eps)
        return total.view(x.shape), normed.view(x.shape)
    total = x + delta
    return total, rms_norm_reference(total, weight, eps)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if native(x):
        return torch.ops.epserve.gated_rms_norm(_rows(x), _rows(z), weight, eps).view(x.shape)
    return gated_rms_norm_reference(x, z, weight, eps)
