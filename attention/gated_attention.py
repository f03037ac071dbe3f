"""Gated full attention: GQA with q/k RMSNorm, partial RoPE and a sigmoid output gate.

`q_proj` yields, per head, head_dim query values then head_dim gate values. Works on a flat batch of
several sequences ([T, D]): the new K/V are written into the paged cache, then one attention call
covers every sequence of the step (kernels.paged_attention).
Shapes: T tokens in the batch, D hidden, H query heads, KV kv heads, hd head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import (
    attention_mixer, fuse_weights, linear, one_call, paged_attention, qk_norm_rope, weight_of, write_kv,
)

from .cache import ForwardBatch
from .norm import RMSNorm
from .rotary import PartialRotary


class GatedAttention(nn.Module):
    def __init__(
        self,
        layer_idx: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: PartialRotary,
        eps: float,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim * 2, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)
        self.rotary = rotary  # shared by all attention layers; holds no weights
        self.qkv: torch.Tensor | None = None  # [2 H hd + 2 KV hd, D] once fused
        self.o_weight: torch.Tensor | None = None  # once fused: o_proj's weight as kernels.linear takes it
        self.one_call_weights: tuple | None = None  # once fused: attention_mixer's weight arguments

    def fuse(self) -> None:
        """After loading: one matmul for q (with its gate), k and v; the weights as the one-call op
        takes them (a plain tuple: no module attribute lookups per step)."""
        self.qkv = fuse_weights(self.q_proj, self.k_proj, self.v_proj)
        self.o_weight = weight_of(self.o_proj)
        self.one_call_weights = (self.qkv, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)

    def forward(self, x_TD: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T, H, KV, hd = x_TD.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if one_call(x_TD):  # the ops below in one C++ call
            return attention_mixer(
                x_TD, *self.one_call_weights, batch.positions, self.rotary.inv_freq, batch.kv.key[self.layer_idx],
                batch.kv.value[self.layer_idx], batch.slot_mapping, batch.block_tables, batch.query_start,
                batch.context_lens, hd**-0.5, self.o_proj.weight, (H, KV, hd))
        q_and_gate, key, value = linear(x_TD, self.qkv).split([2 * H * hd, KV * hd, KV * hd], dim=-1)
        query, gate = q_and_gate.view(T, H, 2 * hd).split(hd, dim=-1)
        query, key = qk_norm_rope(query, key.view(T, KV, hd), self.q_norm.weight, self.k_norm.weight,
                                  self.q_norm.eps, batch.positions, self.rotary.inv_freq)
        key_cache, value_cache = batch.kv.key[self.layer_idx], batch.kv.value[self.layer_idx]
        write_kv(key_cache, value_cache, key, value.view(T, KV, hd), batch.slot_mapping)
        out = paged_attention(query, key_cache, value_cache, batch.block_tables, batch.query_start,
                              batch.context_lens, hd**-0.5, batch.query_lens)
        width = H * hd
        return linear(out.reshape(T, width) * torch.sigmoid(gate.reshape(T, width)), self.o_weight)
