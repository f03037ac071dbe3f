"""y = x W^T, row by row: on CPU a C++ kernel sums every output in one fixed order whatever the
batch (a row's result does not depend on the rows beside it, so a sequence decodes the same alone,
in any batch, in any micro-batch split), streaming the weight once per call; elsewhere torch.
A weight may also be an FP8 one kept as stored (Fp8Weight: GPUs, Qwen's block-wise FP8
checkpoints), read as stored by kernels.gpu.moe.linear_fp8, or a tuple of weights whose outputs
concatenate (sibling projections fused where some are FP8 and some not: kernels.fuse).
Shapes: x [M, K] (last dim contiguous), weight [N, K] -> [M, N]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backend import batched, native
from .gpu import moe as gpu_moe
from .gpu.triton_guard import KernelUnavailable


@dataclass(frozen=True)
class Fp8Weight:
    """A block-wise FP8 (e4m3) weight kept as stored: weight [N, K] float8_e4m3fn and its scales
    [ceil(N/b0), ceil(K/b1)] fp32 (Qwen's weight_scale_inv); each weight is its fp8 value times its
    block's scale, rounded to the compute dtype."""

    weight: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def dequantised(self, dtype: torch.dtype) -> torch.Tensor:
        from .moe import dequantize_bank  # kernels.moe imports this module

        return dequantize_bank(self.weight[None], self.scale[None], self.block, dtype)[0]


def linear(x: torch.Tensor, weight: torch.Tensor | Fp8Weight | tuple) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        if native(x):
            return torch.ops.epserve.linear_rows(x, weight)
        return F.linear(x, weight)
    if isinstance(weight, Fp8Weight):
        return linear_fp8(x, weight)
    return torch.cat([linear(x, part) for part in weight], dim=-1)


def linear_fp8(x: torch.Tensor, weight: Fp8Weight) -> torch.Tensor:
    """GPUs: the FP8 weight read as stored (a byte a weight) by the routed experts' down kernels,
    as a bank of one expert (past 8 rows FP8 x FP8 with use_fp8_activations); where those do not
    build (or references are forced), the weight dequantised for this call: the bits of the weight
    dequantised at load."""
    if batched(x) and gpu_moe.dense_fp8_usable(x):
        try:
            return gpu_moe.linear_fp8(x, weight.weight, weight.scale, weight.block)
        except KernelUnavailable:  # logged once
            pass
    return F.linear(x, weight.dequantised(x.dtype))
