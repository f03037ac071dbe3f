"""The Gated DeltaNet decode step on GPUs as one Triton kernel that reads each sequence's state at its
slot and writes it at its out slot: the pool is read and written once (flash-linear-attention's
recurrent kernel takes its states as a batch, so they are gathered before it and scattered after it,
twice the bytes; the batched torch version builds several state-sized temporaries).

Same math and contract as kernels.delta_rule.delta_rule_decode_reference, in fp32 throughout (no
dots: the rule is elementwise products and sums, so fp32 is exact in every dtype): per value head,
q and k L2-normalised (eps 1e-6), q scaled by dk^-0.5, q/k heads shared by groups of value heads,
g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b) rounded to b's dtype (as the reference's),
    S <- exp(g) S;  delta = beta (v - S^T k);  S <- S + k (x) delta;  o = S^T q.
Shapes: q, k [B, Hk, dk]; v [B, H, dv]; a, b [B, H]; state [M, H, dk, dv] fp32; slots, out_slots [B].
Grid: (sequence, value head, dv block): each program holds a [dk, BLOCK_V] block of the state.
"""

from __future__ import annotations

import torch

from .triton_guard import TritonOp, triton

if triton is not None:
    import triton.language as tl

    from .rounding import round_to

OP = TritonOp("delta rule decode", (torch.float32, torch.bfloat16, torch.float16))
usable = OP.usable  # CUDA tensors, Triton present, the kernel not failed to build here before

if triton is not None:

    @triton.jit
    def _decode_step(Q, K, V, A, Bt, A_log, dt_bias, State, slots, out_slots, Out,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_at, stride_ah, stride_bt, stride_bh, stride_sm, stride_sh, stride_ot, stride_oh, scale,
                     REPEAT: tl.constexpr, DK: tl.constexpr, DK_P2: tl.constexpr, DV: tl.constexpr,
                     BLOCK_V: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1)
        dv = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
        dv_ok = dv < DV
        dk = tl.arange(0, DK_P2)
        dk_ok = dk < DK
        hk = h // REPEAT
        q = tl.load(Q + t * stride_qt + hk * stride_qh + dk, mask=dk_ok, other=0.0).to(tl.float32)
        k = tl.load(K + t * stride_kt + hk * stride_kh + dk, mask=dk_ok, other=0.0).to(tl.float32)
        q = q * (1.0 / tl.sqrt(tl.sum(q * q, 0) + 1e-6)) * scale
        k = k * (1.0 / tl.sqrt(tl.sum(k * k, 0) + 1e-6))
        v = tl.load(V + t * stride_vt + h * stride_vh + dv, mask=dv_ok, other=0.0).to(tl.float32)
        x = tl.load(A + t * stride_at + h * stride_ah).to(tl.float32) + tl.load(dt_bias + h).to(tl.float32)
        softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))  # torch's threshold
        decay = tl.exp(-tl.exp(tl.load(A_log + h).to(tl.float32)) * softplus)
        b = tl.load(Bt + t * stride_bt + h * stride_bh)
        beta = round_to(1.0 / (1.0 + tl.exp(-b.to(tl.float32))), b.dtype)

        block = dk[:, None] * DV + dv[None, :]  # [DK_P2, BLOCK_V] within a head's [dk, dv] state
        ok = dk_ok[:, None] & dv_ok[None, :]
        S = tl.load(State + tl.load(slots + t) * stride_sm + h * stride_sh + block, mask=ok, other=0.0) * decay
        delta = (v - tl.sum(S * k[:, None], 0)) * beta
        S = S + k[:, None] * delta[None, :]
        tl.store(State + tl.load(out_slots + t) * stride_sm + h * stride_sh + block, S, mask=ok)
        o = tl.sum(S * q[:, None], 0)
        tl.store(Out + t * stride_ot + h * stride_oh + dv, o.to(Out.dtype.element_ty), mask=dv_ok)


def decode(q, k, v, a, b, A_log, dt_bias, state, slots, out_slots) -> torch.Tensor:
    """One row per sequence (module docstring); the state rows at out_slots written, nothing else."""
    B, H, DV = v.shape
    Hk, DK = q.shape[1], q.shape[2]
    out = torch.empty(B, H, DV, device=v.device, dtype=v.dtype)
    if B == 0:
        return out
    if state.dtype != torch.float32 or not state[0].is_contiguous():
        raise ValueError("delta rule decode: the state pool must be fp32 with contiguous slots")
    for x in (q, k, v):
        if x.stride(-1) != 1:
            raise ValueError("delta rule decode: q, k and v need contiguous head dims")
    DK_P2 = max(16, triton.next_power_of_2(DK))
    BLOCK_V = 32 if DK_P2 <= 128 else 16  # the program's [dk, BLOCK_V] state block stays in registers
    OP.launch(lambda: _decode_step[(B, H, triton.cdiv(DV, BLOCK_V))](
        q, k, v, a, b, A_log, dt_bias, state, slots, out_slots, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), *a.stride(), *b.stride(),
        state.stride(0), state.stride(1), out.stride(0), out.stride(1), DK**-0.5,
        REPEAT=H // Hk, DK=DK, DK_P2=DK_P2, DV=DV, BLOCK_V=BLOCK_V))
    return out
