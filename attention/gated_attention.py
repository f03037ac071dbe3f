"""Gated full attention: GQA with q/k RMSNorm, partial RoPE and a sigmoid output gate.

`q_proj` yields, per head, head_dim query values then head_dim gate values. Works on a flat batch of
several sequences ([T, D]); each sequence attends to its own KV cache.
Shapes: T tokens in the batch, D hidden, H query heads, KV kv heads, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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

    def forward(self, x_TD: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T, hd = x_TD.shape[0], self.head_dim
        query, gate = self.q_proj(x_TD).view(T, self.num_heads, 2 * hd).split(hd, dim=-1)
        query = self.q_norm(query)
        key = self.k_norm(self.k_proj(x_TD).view(T, self.num_kv_heads, hd))
        value = self.v_proj(x_TD).view(T, self.num_kv_heads, hd)
        cos, sin = self.rotary.cos_sin(batch.positions, x_TD.dtype)
        query, key = self.rotary(query, cos, sin), self.rotary(key, cos, sin)

        out_THd = torch.empty_like(query)
        groups = self.num_heads // self.num_kv_heads
        for s in batch.slices:
            batch.kv.write(self.layer_idx, s, key[s.rows], value[s.rows])
            k_all, v_all = batch.kv.read(self.layer_idx, s)  # [past + n, KV, hd]
            # query i (absolute position past + i) sees keys 0 .. past + i
            q_pos = torch.arange(s.length, device=x_TD.device)[:, None] + s.past
            mask = torch.arange(s.past + s.length, device=x_TD.device)[None, :] <= q_pos
            out = F.scaled_dot_product_attention(
                query[s.rows].transpose(0, 1),  # [H, n, hd]
                k_all.transpose(0, 1).repeat_interleave(groups, dim=0),
                v_all.transpose(0, 1).repeat_interleave(groups, dim=0),
                attn_mask=mask,
                scale=hd**-0.5,
            )
            out_THd[s.rows] = out.transpose(0, 1)
        width = self.num_heads * hd
        out_TE = out_THd.reshape(T, width) * torch.sigmoid(gate.reshape(T, width))
        return self.o_proj(out_TE)
