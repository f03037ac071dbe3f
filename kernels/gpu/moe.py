"""The routed experts' passes around their two grouped GEMMs, as Triton kernels on GPUs: SwiGLU of
the first GEMM's output in one pass, and each row's router-weighted sum of its K pair outputs read in
place from the second GEMM's expert-ordered output, in one pass. The torch versions (kernels.moe's
_swiglu, _weighted_sum) take two and six passes over [pairs, ...] in eager steps: the SwiGLU's
activation written then multiplied; the pair outputs copied back to (row, k) order, weighted, masked,
summed in fp64 and rounded in steps.

Same rounding as the torch versions: silu(gate) rounded to the dtype, then its product with up; each
pair's weighted output rounded to the dtype, the K of a row summed in fp64 (exact for a row's few
terms, so the order does not matter and any split of the experts over workers adds up to the same
bits), then rounded fp64 -> fp32 -> dtype, or returned in fp64 (partial). The one difference: silu's
exp is Triton's, which may differ from torch's in the last fp32 bit (rarely a bf16 ulp).

Shapes: P = R*K (row, expert) pairs in expert order, I expert intermediate, D hidden.
"""

from __future__ import annotations

import torch

from .triton_guard import TritonOp, triton

if triton is not None:
    import triton.language as tl

    from .rounding import round_to

OP = TritonOp("routed experts' SwiGLU and weighted sum", (torch.bfloat16, torch.float16, torch.float32))


def usable(*tensors: torch.Tensor) -> bool:
    """CUDA tensors, Triton present and built here, and no autograd (the kernels have no backward)."""
    return all(OP.usable(t) and not t.requires_grad for t in tensors)


if triton is not None:

    @triton.jit
    def _swiglu(Hidden, Out, I, stride_h, stride_o, BLOCK: tl.constexpr):
        """One pair's [BLOCK] slice: out = silu(gate) * up, gate | up = hidden's halves."""
        p = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = col < I
        gate = tl.load(Hidden + p * stride_h + col, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(Hidden + p * stride_h + I + col, mask=ok, other=0.0).to(tl.float32)
        act = round_to(gate / (1.0 + tl.exp(-gate)), Out.dtype.element_ty)
        out = round_to(act * up, Out.dtype.element_ty)
        tl.store(Out + p * stride_o + col, out.to(Out.dtype.element_ty), mask=ok)

    @triton.jit
    def _weighted_sum(Sorted, Position, Idx, Weights, Out, D, stride_s, stride_o,
                      K: tl.constexpr, BLOCK: tl.constexpr, PARTIAL: tl.constexpr):
        """One row's [BLOCK] slice: the sum over its K pairs of weight * output, each pair's output
        at its position in expert order; pairs outside the bank (idx -1) skipped (never computed)."""
        r = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = col < D
        total = tl.zeros([BLOCK], dtype=tl.float64)
        for k in tl.static_range(K):
            width = tl.where(tl.load(Idx + r * K + k) >= 0, D, 0)  # 0: a pair outside the bank
            at = tl.load(Position + r * K + k)
            weight = tl.load(Weights + r * K + k).to(tl.float32)
            out = tl.load(Sorted + at * stride_s + col, mask=col < width, other=0.0).to(tl.float32)
            total += round_to(out * weight, Sorted.dtype.element_ty).to(tl.float64)
        if PARTIAL:
            tl.store(Out + r * stride_o + col, total, mask=ok)
        else:
            rounded = round_to(total.to(tl.float32), Out.dtype.element_ty)
            tl.store(Out + r * stride_o + col, rounded.to(Out.dtype.element_ty), mask=ok)


def _block(width: int) -> int:
    return min(1024, max(16, triton.next_power_of_2(width)))


def swiglu(hidden_P2I: torch.Tensor) -> torch.Tensor:
    """[P, 2I] (gate | up) -> silu(gate) * up [P, I], contiguous."""
    P, I = hidden_P2I.shape[0], hidden_P2I.shape[1] // 2
    out = hidden_P2I.new_empty(P, I)
    if P and hidden_P2I.stride(1) != 1:
        raise ValueError("routed experts' SwiGLU: the hidden rows must be contiguous")
    if P:
        OP.launch(lambda: _swiglu[(P, triton.cdiv(I, _block(I)))](
            hidden_P2I, out, I, hidden_P2I.stride(0), out.stride(0), BLOCK=_block(I)))
    return out


def weighted_sum(sorted_out_PD, position_P, idx_RK, weights_RK, partial: bool) -> torch.Tensor:
    """Pair outputs [P, D] in expert order (position_P[r*K + k]: where pair (r, k) is in it) -> [R, D]:
    each row's weighted sum over its K pairs, fp64 (partial) or rounded once to the pairs' dtype."""
    (R, K), D = idx_RK.shape, sorted_out_PD.shape[1]
    out = sorted_out_PD.new_empty(R, D, dtype=torch.float64 if partial else sorted_out_PD.dtype)
    if R == 0:
        return out
    if sorted_out_PD.stride(1) != 1:
        raise ValueError("routed experts' weighted sum: the pair outputs must be contiguous rows")
    weights = weights_RK.to(sorted_out_PD.dtype).contiguous()
    OP.launch(lambda: _weighted_sum[(R, triton.cdiv(D, _block(D)))](
        sorted_out_PD, position_P, idx_RK.contiguous(), weights, out, D, sorted_out_PD.stride(0), out.stride(0),
        K=K, BLOCK=_block(D), PARTIAL=partial))
    return out
