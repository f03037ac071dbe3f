"""Fusing sibling projections into one matmul: the checkpoint keeps them apart (and the model keeps
their names for loading), the forward runs one linear over the concatenated weight."""

from __future__ import annotations

import torch
from torch import nn


def fuse_weights(*layers: nn.Module) -> torch.Tensor:
    """Concatenates the layers' weights [out_i, in] along the output dim and rebinds each layer's
    weight to its view of the result, so the memory is not doubled. Returns the fused weight."""
    fused = torch.cat([layer.weight.detach() for layer in layers])
    start = 0
    for layer in layers:
        rows = layer.weight.shape[0]
        layer.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused
