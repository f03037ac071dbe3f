"""Gated DeltaNet: the linear-attention mixer of 3 in 4 Qwen3.5 layers.

in_proj_qkv -> depthwise causal conv1d + SiLU -> q | k | v; beta = sigmoid(b);
g = -exp(A_log) * softplus(a + dt_bias); gated delta rule; gated RMSNorm with z; out_proj.
One pass over the step's flat batch: one projection matmul (qkv, z, b, a fused), one conv over every
row and one delta-rule call for every decode row and prefill chunk, each reading the sequences'
state rows and writing their new states (in place, or to the other row of a double-buffered cache).
Shapes: T tokens, D hidden, C conv channels (2 * Hk * dk + H * dv), Hk key heads, H value heads.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from kernels import (
    causal_conv1d, delta_rule, deltanet_mixer, fuse_weights, gated_rms_norm, linear, one_call, weight_of,
)

from .cache import DeltaNetStateCache, ForwardBatch, SpeculativeRollback
from .norm import GatedRMSNorm


class GatedDeltaNet(nn.Module):
    def __init__(
        self,
        layer_idx: int,
        hidden_size: int,
        num_key_heads: int,
        num_value_heads: int,
        key_head_dim: int,
        value_head_dim: int,
        conv_kernel: int,
        eps: float,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_key_heads, self.num_value_heads = num_key_heads, num_value_heads
        self.key_head_dim, self.value_head_dim = key_head_dim, value_head_dim
        self.key_dim = num_key_heads * key_head_dim
        self.value_dim = num_value_heads * value_head_dim
        self.conv_channels = 2 * self.key_dim + self.value_dim
        self.conv_kernel = conv_kernel
        self.in_proj_qkv = nn.Linear(hidden_size, self.conv_channels, bias=False)
        self.in_proj_z = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden_size, num_value_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden_size, num_value_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_channels, self.conv_channels, conv_kernel, groups=self.conv_channels, bias=False
        )
        self.A_log = nn.Parameter(torch.zeros(num_value_heads))
        self.dt_bias = nn.Parameter(torch.ones(num_value_heads))
        self.norm = GatedRMSNorm(value_head_dim, eps)
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.in_proj: torch.Tensor | None = None  # [C + H * dv + 2H, D] once fused
        self.out_weight: torch.Tensor | None = None  # once fused: out_proj's weight as kernels.linear takes it
        self.one_call_weights: tuple | None = None  # once fused: deltanet_mixer's weight arguments

    def fuse(self) -> None:
        """After loading: one matmul for qkv, z, b and a; the weights as the one-call op takes them
        (a plain tuple: no module attribute lookups per step)."""
        self.in_proj = fuse_weights(self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a)
        self.out_weight = weight_of(self.out_proj)
        self.one_call_weights = (self.in_proj, self.conv1d.weight.view(self.conv_channels, -1), self.A_log,
                                 self.dt_bias, self.norm.weight, self.norm.eps, self.out_proj.weight)

    def forward(self, x_TD: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T, H, dv = x_TD.shape[0], self.num_value_heads, self.value_head_dim
        if one_call(x_TD):  # the ops below in one C++ call
            states, i = batch.states, self.layer_idx
            out, projected = deltanet_mixer(
                x_TD, *self.one_call_weights, states.conv[i], states.recurrent[i], batch.slots, batch.query_start,
                batch.slots if batch.out_slots is None else batch.out_slots,
                (self.num_key_heads, self.key_head_dim, H, dv))
            if batch.rollback is not None:
                batch.rollback.keep(self.layer_idx, projected)
            return out
        projected = linear(x_TD, self.in_proj)
        if batch.rollback is not None:
            batch.rollback.keep(self.layer_idx, projected)
        qkv, z, b, a = projected.split([self.conv_channels, self.value_dim, H, H], dim=-1)
        out = self._mix(qkv, a, b, batch.states, batch.slots, batch.out_slots, batch.query_start, batch.query_lens,
                        batch.num_decodes)
        normed = gated_rms_norm(out, z.view(T, H, dv), self.norm.weight, self.norm.eps)
        return linear(normed.view(T, self.value_dim), self.out_weight)

    def _mix(self, qkv, a, b, states, slots, out_slots, query_start, query_lens: list[int],
             num_decodes: int) -> torch.Tensor:
        """conv1d + delta rule over rows of sequences in turn (decodes first), states read at slots
        and written at out_slots: [T, H, dv]."""
        T, dk = qkv.shape[0], self.key_head_dim
        mixed = causal_conv1d(qkv, self.conv1d.weight.view(self.conv_channels, -1), states.conv[self.layer_idx],
                              slots, query_start, query_lens, out_slots)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q, k = q.view(T, self.num_key_heads, dk), k.view(T, self.num_key_heads, dk)
        return delta_rule(q, k, v.view(T, self.num_value_heads, self.value_head_dim), a, b, self.A_log,
                          self.dt_bias, states.recurrent[self.layer_idx], slots, query_start, query_lens,
                          num_decodes, out_slots)

    # called between steps, outside the model's forward: without this the states it rewrites join
    # autograd through torch's ops (GPUs' path) and the next roll-back's in-place copy into them fails
    @torch.inference_mode()
    def roll_back(self, record: SpeculativeRollback, keep: list[int], states: DeltaNetStateCache) -> None:
        """After a verify step: chunk i of the record keeps its first keep[i] rows. Chunks that keep
        fewer than all get their states from before the step advanced over the kept rows again."""
        short = sorted((i for i, n in enumerate(keep) if n < record.rows.shape[1]), key=lambda i: keep[i] > 1)
        if not short:
            return
        projected = record.projected[self.layer_idx]
        index = torch.tensor(short, device=projected.device)
        slots, out_slots = record.slots[index], record.out_slots[index]
        if record.saved is not None:  # single-buffered: the step overwrote them, put them back
            at = states.index[self.layer_idx]
            states.conv[self.layer_idx].index_copy_(0, slots, record.saved[0][at][index])
            states.recurrent[self.layer_idx].index_copy_(0, slots, record.saved[1][at][index])
        lens = [keep[i] for i in short]
        starts = torch.tensor([0, *itertools.accumulate(lens)], device=projected.device)
        rows = torch.cat([projected[i, :n] for i, n in zip(short, lens)])
        H = self.num_value_heads
        qkv, _, b, a = rows.split([self.conv_channels, self.value_dim, H, H], dim=-1)
        self._mix(qkv, a, b, states, slots, out_slots, starts, lens, sum(1 for n in lens if n == 1))
