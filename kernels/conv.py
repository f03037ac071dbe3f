"""Gated DeltaNet's depthwise causal conv1d + SiLU over a flat batch, continuing each sequence's
conv state (its last K - 1 inputs, read at `slots`) and writing the new one at `out_slots` (None:
in place; other rows keep the state from before the step).
Shapes: T rows (B sequences in turn), C channels, K kernel, M slots; x [T, C], weight [C, K],
state [M, K - 1, C] (oldest input first), slots and out_slots [B], query_start [B + 1] (row
offsets), query_lens [B] (host)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import native


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


def causal_conv1d(x, weight, state, slots, query_start, query_lens: list[int], out_slots=None) -> torch.Tensor:
    if native(x):
        return torch.ops.epserve.causal_conv1d(x, weight, state, slots, query_start,
                                               slots if out_slots is None else out_slots)
    return causal_conv1d_reference(x, weight, state, slots, query_start, query_lens, out_slots)
