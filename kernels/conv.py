"""Gated DeltaNet's depthwise causal conv1d + SiLU over a flat batch, continuing each sequence's
conv state (its last K - 1 inputs, read at `slots`) and writing the new one at `out_slots` (None:
in place; other rows keep the state from before the step).
Shapes: T rows (B sequences in turn), C channels, K kernel, M slots; x [T, C], weight [C, K],
state [M, K - 1, C] (oldest input first), slots and out_slots [B], query_start [B + 1] (row
offsets), query_lens [B] (host)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import batched, glue, native
from .varlen import padded_rows, unpad


def causal_conv1d_reference(x, weight, state, slots, query_start, query_lens: list[int],
                            out_slots=None) -> torch.Tensor:
    K = weight.shape[1]
    out_slots = slots if out_slots is None else out_slots
    out = torch.empty_like(x)
    start = 0
    for i, n in enumerate(query_lens):
        padded = torch.cat([state[slots[i : i + 1]][0], x[start : start + n]])  # [K - 1 + n, C]
        state[out_slots[i : i + 1]] = padded[None, -(K - 1):]
        mixed = F.conv1d(padded.T[None], weight[:, None], groups=weight.shape[0])
        out[start : start + n] = F.silu(mixed[0].T)
        start += n
    return out


@glue
def causal_conv1d_batched(x, weight, state, slots, query_start, query_lens: list[int],
                          out_slots=None) -> torch.Tensor:
    """Every sequence at once (any device): each sequence's rows padded to the longest, behind its
    state, [B, K - 1 + N, C]; each tap's product in x's dtype, the K of them summed in fp32 in a
    fixed order and rounded once, each rounding written out (so that inductor, compiling it in
    CUDA graphs, rounds where eager does); no host sync (the row map is built on the host)."""
    K, C, T = weight.shape[1], x.shape[1], x.shape[0]
    B, N = len(query_lens), (max(query_lens) if query_lens else 0)
    if T == 0:
        return x.new_empty(0, C)
    rows, lens = padded_rows(query_start, N, T)  # [B, N], [B]
    steps = torch.arange(N, device=x.device)
    xs = x[rows] * (steps < lens[:, None])[..., None].to(x.dtype)  # cells past a sequence's end: zeros
    padded = torch.cat([state[slots].to(x.dtype), xs], dim=1)  # [B, K - 1 + N, C]
    taps = weight.T  # [K, C]
    mixed = (padded[:, 0:N] * taps[0]).float()
    for k in range(1, K):
        mixed = mixed + (padded[:, k : k + N] * taps[k]).float()
    mixed = mixed.to(x.dtype)  # [B, N, C]
    keep = (lens[:, None] + torch.arange(K - 1, device=x.device))[..., None].expand(B, K - 1, C)
    state[slots if out_slots is None else out_slots] = padded.gather(1, keep).to(state.dtype)
    return F.silu(unpad(mixed, query_lens))


def causal_conv1d(x, weight, state, slots, query_start, query_lens: list[int], out_slots=None) -> torch.Tensor:
    if native(x):
        return torch.ops.epserve.causal_conv1d(x, weight, state, slots, query_start,
                                               slots if out_slots is None else out_slots)
    if batched(x):
        return causal_conv1d_batched(x, weight, state, slots, query_start, query_lens, out_slots)
    return causal_conv1d_reference(x, weight, state, slots, query_start, query_lens, out_slots)
