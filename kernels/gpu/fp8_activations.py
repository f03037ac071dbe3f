"""W8A8 for FP8 checkpoints kept as stored (ClusterConfig.fp8_activations): the routed experts'
grouped kernels and dense FP8 layers past their few-rows kernels (kernels.gpu.moe) quantize each
[rows, BLOCK_K] tile of their activations to e4m3 in registers, a scale a row (its largest |value|
/ 448), and multiply FP8 by FP8 on the tensor cores (sm_89+; Hopper's wgmma in 64-pair tiles) with
fp32 accumulation, both scales applied to each tile's product, as vLLM and SGLang run block-FP8
checkpoints; the activations' rounding is the price. Off (the default), those kernels dequantise each
weight tile to the compute dtype (W8A16: the values of the weights dequantised at load). The few-rows
kernels (small decode batches) are W8A16 either way. A process-wide switch: the executor or worker
sets it as it starts, before any kernel runs (or a decode graph captures one).
"""

from __future__ import annotations

import torch

from .triton_guard import KernelUnavailable, TritonOp, triton

if triton is not None:
    import triton.language as tl

    from .rounding import round_to_e4m3

GROUPED_A8 = TritonOp("FP8 weights' grouped GEMMs with FP8 activations", (torch.bfloat16, torch.float16))

_on = False


def use_fp8_activations(on: bool) -> None:
    """W8A8 (module docstring) for this process's kernels from now on."""
    global _on
    _on = on


def fp8_activations_on() -> bool:
    """Whether this process runs W8A8."""
    return _on


def with_fp8_activations(x: torch.Tensor, block: tuple[int, int] | None, block_k: int) -> bool:
    """This launch quantizes its activations: asked for, FP8 weights whose block columns hold whole
    reduction tiles (one weight scale a row a tile), a tile the FP8 MMA takes, the kernels built."""
    return _on and block is not None and block[1] % block_k == 0 and block_k >= 32 and GROUPED_A8.usable(x)


def launch_grouped(op: TritonOp, run, a8: bool) -> None:
    """run(a8) under op; a W8A8 build that fails leaves the W8A16 kernels running (logged once)."""
    if a8:
        try:
            GROUPED_A8.launch(run, True)
            return
        except KernelUnavailable:
            pass
    op.launch(run, False)


if triton is not None:

    @triton.jit
    def quantize_rows(a, WIDEN: tl.constexpr):
        """A [M, BLOCK_K] activation tile in e4m3 with a scale a row (its largest |value| / 448): the
        tile as float8 for the FP8 MMA, or (WIDEN: Triton's interpreter) its float8 values in fp32;
        and the scales [M]."""
        a = a.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(a), 1), 1e-30) / 448.0
        q = tl.minimum(tl.maximum(a / scale[:, None], -448.0), 448.0)
        if WIDEN:
            return round_to_e4m3(q), scale
        return q.to(tl.float8e4nv), scale

    @triton.jit
    def dot_fp8(a_q, a_scale, w_ptrs, w_scale, mask, WIDEN: tl.constexpr):
        """(a_q [M, K] @ w [N, K]^T) * a_scale [M] * w_scale [N] in fp32: FP8 x FP8 on the tensor
        cores (or, WIDEN, their values multiplied exactly in fp32), the FP8 weights as stored."""
        w = tl.load(w_ptrs, mask=mask, other=0.0)
        if WIDEN:
            out = tl.dot(a_q, tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            out = tl.dot(a_q, tl.trans(w))
        return out * a_scale[:, None] * w_scale[None, :]
