"""Sibling projections fused into one matmul: 16-bit weights, FP8 ones kept as stored (their block
scales fused too), and mixes of the two, which fuse into runs of one kind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cluster.model.quantization import keep_fp8_as_stored, quantize
from kernels import Fp8Weight, fuse_weights, linear, weight_of
from kernels.moe import dequantize_blocks

BLOCK = (16, 40)


def layers(rows: list[int], fp8: list[bool], K: int = 100) -> list[nn.Linear]:
    out = []
    for n, keep in zip(rows, fp8):
        layer = nn.Linear(K, n, bias=False)
        if keep:
            weight, scale = quantize(layer.weight.detach(), BLOCK)
            keep_fp8_as_stored(layer, BLOCK)
            layer.weight.data.copy_(weight)
            layer.weight_scale_inv.copy_(scale)
        out.append(layer)
    return out


def dequantised(layer: nn.Linear) -> torch.Tensor:
    w = weight_of(layer)
    return dequantize_blocks(w.weight, w.scale, w.block) if isinstance(w, Fp8Weight) else w.detach()


@pytest.mark.parametrize("rows, fp8, runs", [
    ([32, 16, 20], [True] * 3, [3]),  # parts ending on block rows: one FP8 weight (the last may be ragged)
    ([20, 16], [True, True], [1, 1]),  # a part ending mid-block: its scales' last row is its own
    ([48, 32, 8, 8], [True, True, False, False], [2, 2]),  # DeltaNet's FP8 qkv, z beside 16-bit b, a
    ([24, 8], [False, False], [2]),
])
def test_fused_weights_compute_what_the_parts_do_without_a_second_copy(rows, fp8, runs):
    parts = layers(rows, fp8)
    want = [dequantised(layer) for layer in parts]
    x = torch.randn(5, 100)
    fused = fuse_weights(*parts)
    got = list(fused) if isinstance(fused, tuple) else [fused]
    assert [w.shape[0] for w in got] == [sum(rows[sum(runs[:i]):sum(runs[:i + 1])]) for i in range(len(runs))]
    torch.testing.assert_close(linear(x, fused), torch.cat([x @ w.T for w in want], dim=-1), rtol=0, atol=1e-5)
    assert all(torch.equal(dequantised(layer), w) for layer, w in zip(parts, want))  # rebound to views
    def storages(tensors) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in tensors}

    assert storages(layer.weight for layer in parts) == storages(w.weight if isinstance(w, Fp8Weight) else w
                                                                 for w in got)
    assert storages(layer.weight_scale_inv for layer in parts if hasattr(layer, "weight_scale_inv")) == storages(
        w.scale for w in got if isinstance(w, Fp8Weight))
