"""Fusing sibling projections into one matmul: the checkpoint keeps them apart (and the model keeps
their names for loading), the forward runs one linear over the concatenated weight.

A layer kept FP8 as stored (its `weight` float8_e4m3fn, its `weight_scale_inv` buffer and
`fp8_block` set at load) fuses with FP8 siblings, scales concatenated too, as long as each part but
the last ends on a block row; FP8 and 16-bit siblings (Qwen keeps DeltaNet's in_proj_b / in_proj_a
unquantized beside FP8 in_proj_qkv / in_proj_z) fuse into runs of one kind, a tuple that
kernels.linear runs one matmul a run of."""

from __future__ import annotations

import torch
from torch import nn

from .linear import Fp8Weight


def weight_of(layer: nn.Module) -> torch.Tensor | Fp8Weight:
    """The layer's weight as kernels.linear takes it."""
    scale = getattr(layer, "weight_scale_inv", None)
    return layer.weight if scale is None else Fp8Weight(layer.weight, scale, layer.fp8_block)


def fuse_weights(*layers: nn.Module) -> torch.Tensor | Fp8Weight | tuple:
    """Concatenates the layers' weights [out_i, in] along the output dim and rebinds each layer's
    weight (and FP8 scales) to its view of the result, so the memory is not doubled. Returns the
    fused weight, or a tuple of fused runs where the layers do not all fuse into one."""
    runs: list[list[nn.Module]] = []
    for layer in layers:
        previous = runs[-1][-1] if runs else None
        if previous is not None and _joins(previous, layer):
            runs[-1].append(layer)
        else:
            runs.append([layer])
    fused = [_fuse_run(run) for run in runs]
    return fused[0] if len(fused) == 1 else tuple(fused)


def _joins(previous: nn.Module, layer: nn.Module) -> bool:
    """Whether layer's rows may follow previous's in one weight: both unquantized, or both FP8 in the
    same blocks with previous ending on a block row (its scales' rows then follow each other)."""
    fp8 = [isinstance(weight_of(m), Fp8Weight) for m in (previous, layer)]
    if not any(fp8):
        return True
    return all(fp8) and previous.fp8_block == layer.fp8_block and previous.weight.shape[0] % layer.fp8_block[0] == 0


def _fuse_run(run: list[nn.Module]) -> torch.Tensor | Fp8Weight:
    fused = torch.cat([layer.weight.detach() for layer in run])
    scaled = isinstance(weight_of(run[0]), Fp8Weight)
    scales = torch.cat([layer.weight_scale_inv for layer in run]) if scaled else None
    start = scale_start = 0
    for layer in run:
        rows = layer.weight.shape[0]
        layer.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
        if scaled:
            scale_rows = layer.weight_scale_inv.shape[0]
            layer.weight_scale_inv = scales[scale_start : scale_start + scale_rows]
            scale_start += scale_rows
    return Fp8Weight(fused, scales, run[0].fp8_block) if scaled else fused
