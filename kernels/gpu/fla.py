"""Gated DeltaNet on CUDA through flash-linear-attention's Triton kernels (`pip install
flash-linear-attention`; imported only when present, never a dependency). Same math as the
references: l2-normalised q/k (eps 1e-6), q scaled by dk^-0.5, value heads sharing key heads in
groups, fp32 states [B, H, dk, dv]. FLA's kernels take the states as a batch, so the slots' rows are
gathered before and written back after (one read and one write of each state).
Shapes as kernels.delta_rule: q, k [T, Hk, dk]; v [T, H, dv]; a, b [T, H]; state [M, H, dk, dv]."""

from __future__ import annotations

import functools

import torch

from ..backend import batched


@functools.cache
def _ops():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception:  # not installed, or no working Triton: the batched torch versions run
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


def usable(q: torch.Tensor) -> bool:
    """CUDA, 16-bit: in fp32 FLA's Triton dots run in tf32 (~1e-3 off), so fp32 (the parity runs)
    takes the batched torch versions, which keep the references' precision."""
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and batched(q) and _ops() is not None


def decode(q, k, v, g, beta, state, slots, out_slots) -> torch.Tensor:
    """One row per sequence (T = B); g, beta from kernels.delta_rule.gating."""
    _, recurrent = _ops()
    q, k, v = (x.contiguous() for x in (q, k, v))  # views of the conv output; the kernels want dense rows
    # by keyword: the positional order of FLA's signature is q, k, v, g, gk, gv, beta
    out, final = recurrent(q[:, None], k[:, None], v[:, None], g=g[:, None], beta=beta[:, None],
                           initial_state=state[slots], output_final_state=True, use_qk_l2norm_in_kernel=True)
    state[out_slots] = final.to(state.dtype)
    return out[:, 0]


def prefill(q, k, v, g, beta, state, slots, out_slots, cu_seqlens_cpu: torch.Tensor) -> torch.Tensor:
    """Prefill chunks of B sequences in turn, in one varlen call; cu_seqlens_cpu [B + 1] row
    offsets on the host (FLA plans its chunks from them without a sync)."""
    chunked, _ = _ops()
    q, k, v = (x.contiguous() for x in (q, k, v))
    out, final = chunked(q[None], k[None], v[None], g=g[None], beta=beta[None], initial_state=state[slots],
                         output_final_state=True, use_qk_l2norm_in_kernel=True,
                         cu_seqlens=cu_seqlens_cpu.to(q.device), cu_seqlens_cpu=cu_seqlens_cpu)
    state[out_slots] = final.to(state.dtype)
    return out[0]
