"""The routed experts on GPUs, as Triton kernels around (or instead of) their grouped GEMMs.

Around the grouped GEMMs (any batch): SwiGLU of the first GEMM's output in one pass, and each row's
router-weighted sum of its K pair outputs read in place from the second GEMM's expert-ordered output,
in one pass. The torch versions (kernels.moe's _swiglu, _weighted_sum) take two and six passes over
[pairs, ...] in eager steps: the SwiGLU's activation written then multiplied; the pair outputs copied
back to (row, k) order, weighted, masked, summed in fp64 and rounded in steps.

Instead of them, for decode-sized batches (up to FEW_ROWS_MAX_PAIRS pairs): each (row, k) pair's
expert MLP as two matrix-vector kernels over its expert's weights (gate_up with SwiGLU, then down),
the pairs in (row, k) order, then the weighted sum: three launches where the sorted path takes about
ten (sort, inverse, group ends, gather, two GEMMs, SwiGLU, sum), and the weights streamed by many
small programs rather than by a GEMM's few wide tiles (on an H200 a batch-1 step's grouped GEMMs
took 2 x ~60 us a layer for ~60 us of bytes). Each pair's output depends on its row and expert
only, so these results do not change with the batch around them.

FP8 banks (Qwen's block-wise e4m3 checkpoints, kept as stored on GPUs: half the bytes of bf16) are
read as stored by the few-rows kernels, each weight times its block's scale rounded to the compute
dtype as it is loaded (the bits of a bank dequantised at load). Larger batches take the grouped
kernels (fused-MoE style: the pairs in expert order cut into tiles of one expert's pairs, a table
built on the device without a host sync; x's rows gathered in place; each weight tile dequantised
the same way in registers before tl.dot; SwiGLU fused into the first GEMM): an FP8 weight's byte
read once a tile of pairs, where dequantising the bank first (`dequantize`, their fallback) writes
and rereads two. fp16 banks, which torch's grouped GEMMs do not take on CUDA, take them too.
A dense FP8 weight (an FP8 checkpoint's linear layers kept as stored: kernels.linear's Fp8Weight)
is read by the same down kernels as a bank of one expert (linear_fp8): the few-rows kernel up to
DENSE_FEW_ROWS_MAX rows, the grouped kernel's tiles of rows past them. With W8A8 on
(kernels.gpu.fp8_activations) the grouped kernels instead quantize each tile of their activations
to e4m3 and multiply FP8 by FP8.

Same rounding as the torch versions: a GEMM's output rounded to the dtype, silu(gate) rounded, then
its product with up; each pair's weighted output rounded to the dtype, the K of a row summed in fp64
(exact for a row's few terms, so the order does not matter and any split of the experts over
workers adds up to the same bits), then rounded fp64 -> fp32 -> dtype, or returned in fp64
(partial). silu's exp is Triton's, which may differ from torch's in the last fp32 bit (rarely a bf16
ulp); the few-rows and grouped kernels' dot products sum in another order than torch's GEMMs (fp32
accumulation all).

Shapes: R rows, K top-k, P = R*K (row, expert) pairs, N experts in the bank, D hidden, I expert
intermediate; gate_up [N, 2I, D] (gate rows, then up), down [N, D, I].
"""

from __future__ import annotations

import os

import torch

from .fp8_activations import launch_grouped, with_fp8_activations
from .triton_guard import TritonOp, triton

if triton is not None:
    import triton.language as tl

    from .fp8_activations import dot_fp8, quantize_rows
    from .rounding import round_to

OP = TritonOp("routed experts' SwiGLU and weighted sum", (torch.bfloat16, torch.float16, torch.float32))
FEW_ROWS = TritonOp("routed experts for few rows", (torch.bfloat16, torch.float16))  # fp32: the parity path
DEQUANTIZE = TritonOp("FP8 expert banks' dequantisation", (torch.bfloat16, torch.float16, torch.float32))
GROUPED = TritonOp("routed experts' grouped GEMMs over banks as stored", (torch.bfloat16, torch.float16))
DENSE_FP8 = TritonOp("FP8 dense weights read as stored", (torch.bfloat16, torch.float16))
# Up to 8 rows at top-10 each pair streams its own expert's weights; with more, rows share experts
# (batch 64 top-10 over 512 experts: 640 pairs hit ~365) and the grouped GEMMs' one read of each wins.
FEW_ROWS_MAX_PAIRS = 80
DENSE_FEW_ROWS_MAX = 8  # a dense FP8 weight: rows up to which each streams it (matrix-vector programs)
BLOCK_N, BLOCK_K = 8, 256  # a few-rows program's weight tile: 72 / 40 registers a thread on sm_90
DEQUANTIZE_TILE = (32, 128)  # an FP8 bank's [rows, columns] a program dequantises
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read by Triton as it is imported, as here
GROUPED_BLOCK_N = 64  # a grouped program's output columns; its pairs: 16-64 (grouped_block_m)


def usable(*tensors: torch.Tensor) -> bool:
    """CUDA tensors, Triton present and built here, and no autograd (the kernels have no backward)."""
    return all(OP.usable(t) and not t.requires_grad for t in tensors)


def few_rows_usable(x_RD: torch.Tensor, idx_RK: torch.Tensor) -> bool:
    """A decode-sized batch of 16-bit CUDA rows, no autograd, the kernels built here."""
    return (0 < idx_RK.numel() <= FEW_ROWS_MAX_PAIRS and FEW_ROWS.usable(x_RD) and OP.usable(x_RD)
            and not x_RD.requires_grad)


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

    @triton.jit
    def _weights(w_ptrs, scale_ptrs, mask, SCALED: tl.constexpr, dtype: tl.constexpr):
        """A weight tile in fp32: as stored, or (SCALED) FP8 times its block's scale rounded to the
        compute dtype, as a bank dequantised at load holds it."""
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        if SCALED:
            w = round_to(w * tl.load(scale_ptrs, mask=mask, other=0.0).to(tl.float32), dtype)
        return w

    @triton.jit
    def _experts_up(X, Idx, GateUp, Scale, Act, D, I, stride_x, stride_ge, stride_gn, stride_se, stride_sn,
                    stride_a, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SCALED: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr):
        """One pair's [BLOCK_N] slice of silu(gate) * up, gate | up = its expert's gate_up rows @ x
        (SCALED: FP8 rows with [B0, B1] block scales)."""
        p = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        expert = tl.load(Idx + p)
        n_read = n < tl.where(expert >= 0, I, 0)  # a pair outside the bank reads nothing
        w = GateUp + tl.maximum(expert, 0) * stride_ge + n[:, None] * stride_gn
        s = Scale + tl.maximum(expert, 0) * stride_se
        s_gate, s_up = s + (n // B0)[:, None] * stride_sn, s + ((I + n) // B0)[:, None] * stride_sn
        x = X + (p // K) * stride_x
        dtype = Act.dtype.element_ty
        gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for start in range(0, D, BLOCK_K):
            col = start + tl.arange(0, BLOCK_K)
            ok = n_read[:, None] & (col[None, :] < D)
            xs = tl.load(x + col, mask=col < D, other=0.0).to(tl.float32)[None, :]
            gate += _weights(w + col[None, :], s_gate + (col // B1)[None, :], ok, SCALED, dtype) * xs
            up += _weights(w + I * stride_gn + col[None, :], s_up + (col // B1)[None, :], ok, SCALED, dtype) * xs
        g = round_to(tl.sum(gate, 1), dtype)
        act = round_to(g / (1.0 + tl.exp(-g)), dtype)
        out = round_to(act * round_to(tl.sum(up, 1), dtype), dtype)
        tl.store(Act + p * stride_a + n, out.to(dtype), mask=n < I)

    @triton.jit
    def _experts_down(Act, Idx, Down, Scale, Out, D, I, stride_a, stride_de, stride_dn, stride_se, stride_sn,
                      stride_o, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SCALED: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr):
        """One pair's [BLOCK_N] slice of its expert's down rows @ its activation."""
        p = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        expert = tl.load(Idx + p)
        n_read = n < tl.where(expert >= 0, D, 0)
        w = Down + tl.maximum(expert, 0) * stride_de + n[:, None] * stride_dn
        s = Scale + tl.maximum(expert, 0) * stride_se + (n // B0)[:, None] * stride_sn
        dtype = Out.dtype.element_ty
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for start in range(0, I, BLOCK_K):
            col = start + tl.arange(0, BLOCK_K)
            ok = n_read[:, None] & (col[None, :] < I)
            a = tl.load(Act + p * stride_a + col, mask=col < I, other=0.0).to(tl.float32)[None, :]
            acc += _weights(w + col[None, :], s + (col // B1)[None, :], ok, SCALED, dtype) * a
        tl.store(Out + p * stride_o + n, round_to(tl.sum(acc, 1), dtype).to(dtype), mask=n < D)

    @triton.jit
    def _bank_tile(w_ptrs, row_scales, start, col, mask, n_ok, SCALED: tl.constexpr, dtype: tl.constexpr,
                   B1: tl.constexpr, BLOCK_K: tl.constexpr):
        """A [BLOCK_N, BLOCK_K] weight tile (columns col from start) in the compute dtype for tl.dot:
        as stored, or (SCALED) FP8 times its blocks' scales (row_scales: each row's first block
        scale), rounded to dtype as a bank dequantised at load holds it. A tile within one block
        column (Qwen's 128-wide blocks) reads one scale a row."""
        if SCALED and B1 % BLOCK_K == 0:
            w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
            w = round_to(w * tl.load(row_scales + start // B1, mask=n_ok, other=0.0).to(tl.float32)[:, None], dtype)
        else:  # as stored, or a scale an element as the few-rows kernels read them
            w = _weights(w_ptrs, row_scales[:, None] + (col // B1)[None, :], mask, SCALED, dtype)
        return w.to(dtype)

    @triton.jit
    def _dot(a, w, acc, WIDEN: tl.constexpr):
        """acc + a [M, K] @ w [N, K]^T in fp32. WIDEN (Triton's interpreter, which multiplies bf16
        operands as their uint16 bits): both widened to fp32 first, exactly, and multiplied exactly
        (ieee), as a GPU's 16-bit MMA multiplies them."""
        if WIDEN:
            return tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        return tl.dot(a, tl.trans(w), acc)

    @triton.jit
    def _grouped_up(X, Order, TileExpert, TileStart, Ends, GateUp, Scale, Act, D, I, stride_x, stride_ge,
                    stride_gn, stride_se, stride_sn, stride_a, K: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr, B0: tl.constexpr,
                    B1: tl.constexpr, WIDEN: tl.constexpr, A8: tl.constexpr):
        """One tile of one expert's pairs (in expert order) x [BLOCK_N] columns of silu(gate) * up:
        the pairs' rows of x gathered in place, the expert's gate and up rows read as stored (A8:
        FP8 ones multiplied as FP8 by x's tile quantized a row at a time, B1 % BLOCK_K == 0)."""
        expert = tl.load(TileExpert + tl.program_id(0))
        if expert >= 0:  # -1: a tile past the last expert's pairs
            m = tl.load(TileStart + tl.program_id(0)) + tl.arange(0, BLOCK_M)
            m_ok = m < tl.load(Ends + expert)
            rows = tl.load(Order + m, mask=m_ok, other=0) // K
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < I
            w = GateUp + expert.to(tl.int64) * stride_ge + n[:, None] * stride_gn
            s = Scale + expert.to(tl.int64) * stride_se
            s_gate, s_up = s + (n // B0) * stride_sn, s + ((I + n) // B0) * stride_sn
            dtype = Act.dtype.element_ty
            gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for start in range(0, D, BLOCK_K):
                col = start + tl.arange(0, BLOCK_K)
                c_ok = col < D
                x = tl.load(X + rows[:, None] * stride_x + col[None, :], mask=m_ok[:, None] & c_ok[None, :],
                            other=0.0)
                ok = n_ok[:, None] & c_ok[None, :]
                if A8:
                    x_q, x_scale = quantize_rows(x, WIDEN)
                    gate += dot_fp8(x_q, x_scale, w + col[None, :], tl.load(s_gate + start // B1, mask=n_ok,
                                     other=0.0), ok, WIDEN)
                    up += dot_fp8(x_q, x_scale, w + I * stride_gn + col[None, :],
                                   tl.load(s_up + start // B1, mask=n_ok, other=0.0), ok, WIDEN)
                else:
                    w_gate = _bank_tile(w + col[None, :], s_gate, start, col, ok, n_ok, SCALED, dtype, B1, BLOCK_K)
                    w_up = _bank_tile(w + I * stride_gn + col[None, :], s_up, start, col, ok, n_ok, SCALED, dtype,
                                      B1, BLOCK_K)
                    gate = _dot(x, w_gate, gate, WIDEN)
                    up = _dot(x, w_up, up, WIDEN)
            g = round_to(gate, dtype)
            act = round_to(round_to(g / (1.0 + tl.exp(-g)), dtype) * round_to(up, dtype), dtype)
            tl.store(Act + m[:, None] * stride_a + n[None, :], act.to(dtype), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _grouped_down(Act, TileExpert, TileStart, Ends, Down, Scale, Out, D, I, stride_a, stride_de, stride_dn,
                      stride_se, stride_sn, stride_o, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, SCALED: tl.constexpr, B0: tl.constexpr, B1: tl.constexpr,
                      WIDEN: tl.constexpr, A8: tl.constexpr):
        """One tile of one expert's pairs x [BLOCK_N] columns of its down rows @ their activations
        (A8: as _grouped_up)."""
        expert = tl.load(TileExpert + tl.program_id(0))
        if expert >= 0:
            m = tl.load(TileStart + tl.program_id(0)) + tl.arange(0, BLOCK_M)
            m_ok = m < tl.load(Ends + expert)
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < D
            w = Down + expert.to(tl.int64) * stride_de + n[:, None] * stride_dn
            s = Scale + expert.to(tl.int64) * stride_se + (n // B0) * stride_sn
            dtype = Out.dtype.element_ty
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for start in range(0, I, BLOCK_K):
                col = start + tl.arange(0, BLOCK_K)
                c_ok = col < I
                a = tl.load(Act + m[:, None] * stride_a + col[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
                ok = n_ok[:, None] & c_ok[None, :]
                if A8:
                    a_q, a_scale = quantize_rows(a, WIDEN)
                    acc += dot_fp8(a_q, a_scale, w + col[None, :], tl.load(s + start // B1, mask=n_ok, other=0.0),
                                    ok, WIDEN)
                else:
                    tile = _bank_tile(w + col[None, :], s, start, col, ok, n_ok, SCALED, dtype, B1, BLOCK_K)
                    acc = _dot(a, tile, acc, WIDEN)
            tl.store(Out + m[:, None] * stride_o + n[None, :], round_to(acc, dtype).to(dtype),
                     mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _dequantize(W, Scale, Wanted, Out, R, C, stride_we, stride_wr, stride_se, stride_sr, stride_oe,
                    stride_or, B0: tl.constexpr, B1: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """One [BLOCK_R, BLOCK_C] tile of one expert's FP8 matrix times its block scales, rounded;
        nothing read or written for an expert not wanted."""
        e = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        rows = tl.where(tl.load(Wanted + e) != 0, R, 0)
        ok = (r < rows)[:, None] & (c < C)[None, :]
        scales = Scale + e * stride_se + (r // B0)[:, None] * stride_sr + (c // B1)[None, :]
        w = _weights(W + e * stride_we + r[:, None] * stride_wr + c[None, :], scales, ok, True, Out.dtype.element_ty)
        tl.store(Out + e * stride_oe + r[:, None] * stride_or + c[None, :], w.to(Out.dtype.element_ty), mask=ok)


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


def experts_few_rows(x_RD, idx_RK, weights_RK, gate_up, down, partial: bool, scales=None) -> torch.Tensor:
    """kernels.moe.moe_experts for a decode-sized batch (module docstring): [R, D] in x's dtype, or
    fp64 (partial); idx -1 where the expert is not in this bank; scales: an FP8 bank's
    (kernels.moe.Fp8Scales), None for a bank in x's dtype."""
    (R, K), (I, D) = idx_RK.shape, (down.shape[2], down.shape[1])
    P = R * K
    if x_RD.stride(1) != 1 or gate_up.stride(2) != 1 or down.stride(2) != 1:
        raise ValueError("routed experts for few rows: x and the banks need contiguous rows")
    experts = idx_RK.reshape(-1).long().contiguous()  # int64: bank offsets pass 2^31 elements
    act, pair_out = x_RD.new_empty(P, I), x_RD.new_empty(P, D)
    # without scales the kernels take the weights as stand-ins they never read
    up_scale, down_scale = (scales.gate_up, scales.down) if scales is not None else (gate_up, down)
    (B0, B1) = scales.block if scales is not None else (1, 1)
    tiles = dict(BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SCALED=scales is not None, B0=B0, B1=B1)

    def run():
        _experts_up[(P, triton.cdiv(I, BLOCK_N))](
            x_RD, experts, gate_up, up_scale, act, D, I, x_RD.stride(0), gate_up.stride(0), gate_up.stride(1),
            up_scale.stride(0), up_scale.stride(1), act.stride(0), K=K, **tiles)
        _experts_down[(P, triton.cdiv(D, BLOCK_N))](
            act, experts, down, down_scale, pair_out, D, I, act.stride(0), down.stride(0), down.stride(1),
            down_scale.stride(0), down_scale.stride(1), pair_out.stride(0), **tiles)

    FEW_ROWS.launch(run)
    return weighted_sum(pair_out, torch.arange(P, device=x_RD.device), idx_RK, weights_RK, partial)


def dequantize(weight_NRC: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype,
               wanted_N: torch.Tensor | None = None) -> torch.Tensor:
    """An FP8 bank [N, R, C] times its block scales [N, ceil(R/b0), ceil(C/b1)] -> [N, R, C] in dtype,
    each element rounded once (the bits of kernels.moe.dequantize_blocks(...).to(dtype)); wanted_N
    (int32 0 / 1 or bool, on the device: no sync): only those experts, the others' rows unwritten."""
    N, R, C = weight_NRC.shape
    out = torch.empty(N, R, C, dtype=dtype, device=weight_NRC.device)
    if out.numel() == 0:
        return out
    if weight_NRC.stride(2) != 1 or scale.stride(2) != 1:
        raise ValueError("FP8 bank dequantisation: the weights and scales need contiguous rows")
    wanted_N = (torch.ones(N, dtype=torch.int32, device=weight_NRC.device) if wanted_N is None
                else wanted_N.to(torch.int32))  # Triton's interpreter takes no bool masks from memory
    (BR, BC) = DEQUANTIZE_TILE
    DEQUANTIZE.launch(lambda: _dequantize[(N, triton.cdiv(R, BR), triton.cdiv(C, BC))](
        weight_NRC, scale, wanted_N, out, R, C, weight_NRC.stride(0), weight_NRC.stride(1), scale.stride(0),
        scale.stride(1), out.stride(0), out.stride(1), B0=block[0], B1=block[1], BLOCK_R=BR, BLOCK_C=BC))
    return out


def dense_fp8_usable(x_TK: torch.Tensor) -> bool:
    """linear_fp8 may run: 16-bit CUDA rows, no autograd, built here."""
    return DENSE_FP8.usable(x_TK) and not x_TK.requires_grad


def linear_fp8(x_TK, weight_NK, scale, block: tuple[int, int]) -> torch.Tensor:
    """x W^T [T, N] in x's dtype for a dense FP8 weight kept as stored (scale [ceil(N/b0),
    ceil(K/b1)]), read as a bank of one expert by the down kernels, each weight times its block's
    scale rounded to x's dtype as it is loaded: up to DENSE_FEW_ROWS_MAX rows the few-rows kernel
    (a program per row and 8 outputs), else the grouped one's tiles of rows. Within the compute
    dtype's tolerance of x @ (the weight dequantised)^T (another summation order than torch's GEMMs)."""
    (T, K), N = x_TK.shape, weight_NK.shape[0]
    if x_TK.stride(1) != 1 or weight_NK.stride(1) != 1:
        raise ValueError("FP8 dense weights: x and the weight need contiguous rows")
    out = x_TK.new_empty(T, N)
    if T == 0:
        return out
    bank, scales, (B0, B1) = weight_NK[None], scale[None], block
    strides = (x_TK.stride(0), bank.stride(0), bank.stride(1), scales.stride(0), scales.stride(1), out.stride(0))
    if T <= DENSE_FEW_ROWS_MAX:
        expert = torch.zeros(T, dtype=torch.int64, device=x_TK.device)
        DENSE_FP8.launch(lambda: _experts_down[(T, triton.cdiv(N, BLOCK_N))](
            x_TK, expert, bank, scales, out, N, K, *strides, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SCALED=True, B0=B0,
            B1=B1))
        return out
    block_m, block_k = grouped_block_m(T, 1), grouped_block_k(B1)
    tile_start = torch.arange(0, T, block_m, dtype=torch.int32, device=x_TK.device)
    tile_expert, ends = torch.zeros_like(tile_start), torch.full((1,), T, dtype=torch.int32, device=x_TK.device)

    def run(a8: bool):
        _grouped_down[(tile_start.numel(), triton.cdiv(N, GROUPED_BLOCK_N))](
            x_TK, tile_expert, tile_start, ends, bank, scales, out, N, K, *strides, BLOCK_M=block_m,
            BLOCK_N=GROUPED_BLOCK_N, BLOCK_K=block_k, SCALED=True, B0=B0, B1=B1, WIDEN=INTERPRETED, A8=a8)

    launch_grouped(DENSE_FP8, run, with_fp8_activations(x_TK, block, block_k))
    return out


def grouped_usable(x_RD: torch.Tensor) -> bool:
    """The grouped kernels may run: 16-bit CUDA rows, no autograd, built here."""
    return GROUPED.usable(x_RD) and OP.usable(x_RD) and not x_RD.requires_grad


def grouped_block_m(P: int, N: int) -> int:
    """Pairs a grouped program takes: about a hit expert's share of the P pairs (every row comes to
    every expert worker, so P / N is a guess from above), 16 to 64; from shapes only (no sync)."""
    return min(64, max(16, triton.next_power_of_2(max(1, P // N))))


def grouped_block_k(B1: int) -> int:
    """The grouped kernels' reduction tile: within one block column of B1 where it can (one scale a row)."""
    return next((b for b in (128, 64, 32, 16) if B1 % b == 0), 32)


def tiles_by_expert(ends_N: torch.Tensor, P: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs in expert order (expert n's end at ends_N[n], int32) cut into tiles of block_m that
    never span two experts: (expert int32, first pair int32) per tile, expert -1 past the last.
    There are cdiv(P, block_m) + min(N, P) of them, the most there can be: no sync sizes the grid."""
    N = ends_N.numel()
    ends = ends_N.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tiles = (ends - starts + block_m - 1) // block_m
    tile_ends = tiles.cumsum(0)
    t = torch.arange(triton.cdiv(P, block_m) + min(N, P), device=ends.device)
    expert = torch.searchsorted(tile_ends, t, right=True)
    e = expert.clamp(max=N - 1)
    first = starts[e] + (t - (tile_ends - tiles)[e]) * block_m
    return torch.where(expert < N, expert, -1).to(torch.int32), first.to(torch.int32)


def experts_grouped(x_RD, order_P, ends_N, K: int, gate_up, down, scales=None) -> torch.Tensor:
    """Both GEMMs of the routed experts over the pairs in expert order (order_P: the (row, k) pair at
    each place; ends_N: each expert's group end), the banks read as stored (scales: an FP8 bank's,
    each weight times its block's scale rounded to x's dtype as it is loaded), x's rows gathered in
    place and SwiGLU fused in the first: -> the pair outputs [P, D] in expert order."""
    (P, N), (I, D) = (order_P.numel(), gate_up.shape[0]), (down.shape[2], down.shape[1])
    if x_RD.stride(1) != 1 or gate_up.stride(2) != 1 or down.stride(2) != 1:
        raise ValueError("routed experts' grouped GEMMs: x and the banks need contiguous rows")
    act, sorted_out = x_RD.new_empty(P, I), x_RD.new_empty(P, D)
    if P == 0:
        return sorted_out
    block_m = grouped_block_m(P, N)
    tile_expert, tile_start = tiles_by_expert(ends_N, P, block_m)
    up_scale, down_scale = (scales.gate_up, scales.down) if scales is not None else (gate_up, down)
    (B0, B1) = scales.block if scales is not None else (1, 128)
    block_k = grouped_block_k(B1)
    tiles = dict(BLOCK_M=block_m, BLOCK_N=GROUPED_BLOCK_N, BLOCK_K=block_k, SCALED=scales is not None,
                 B0=B0, B1=B1, WIDEN=INTERPRETED)
    grid = tile_expert.numel()

    def run(a8: bool):
        _grouped_up[(grid, triton.cdiv(I, GROUPED_BLOCK_N))](
            x_RD, order_P, tile_expert, tile_start, ends_N, gate_up, up_scale, act, D, I, x_RD.stride(0),
            gate_up.stride(0), gate_up.stride(1), up_scale.stride(0), up_scale.stride(1), act.stride(0), K=K,
            A8=a8, **tiles)
        _grouped_down[(grid, triton.cdiv(D, GROUPED_BLOCK_N))](
            act, tile_expert, tile_start, ends_N, down, down_scale, sorted_out, D, I, act.stride(0), down.stride(0),
            down.stride(1), down_scale.stride(0), down_scale.stride(1), sorted_out.stride(0), A8=a8, **tiles)

    launch_grouped(GROUPED, run, with_fp8_activations(x_RD, scales.block if scales is not None else None, block_k))
    return sorted_out
