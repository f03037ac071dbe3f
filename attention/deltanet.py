"""Gated DeltaNet: the linear-attention mixer of 3 in 4 Qwen3.5 layers.

in_proj_qkv -> depthwise causal conv1d + SiLU -> q | k | v; beta = sigmoid(b);
g = -exp(A_log) * softplus(a + dt_bias); gated delta rule; gated RMSNorm with z; out_proj.
Works on a flat batch; prefill slices use the chunked rule, decode slices are batched together
through the recurrent rule.
Shapes: T tokens, D hidden, C conv channels (2 * Hk * dk + H * dv), H value heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import DeltaNetStateCache, ForwardBatch
from .delta_rule import chunked_gated_delta_rule, recurrent_gated_delta_rule
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

    def _mix(self, qkv_BLC, g_BLH, beta_BLH, slots: torch.Tensor, fresh: torch.Tensor,
             states: DeltaNetStateCache, recurrent: bool) -> torch.Tensor:
        """Conv + delta rule for B sequences of L new tokens each, continuing their slots' states
        (zeros where fresh); writes the new states back. Returns [B, L, H, dv]."""
        B, L, _ = qkv_BLC.shape
        conv_pool, rec_pool = states.conv[self.layer_idx], states.recurrent[self.layer_idx]
        history = conv_pool[slots].masked_fill(fresh[:, None, None], 0)  # [B, C, kernel - 1]
        padded = torch.cat([history, qkv_BLC.transpose(1, 2)], dim=-1)
        conv_pool[slots] = padded[:, :, -(self.conv_kernel - 1) :]
        mixed = F.silu(F.conv1d(padded, self.conv1d.weight, groups=self.conv_channels)).transpose(1, 2)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(B, L, self.num_key_heads, self.key_head_dim)
        k = k.reshape(B, L, self.num_key_heads, self.key_head_dim)
        v = v.reshape(B, L, self.num_value_heads, self.value_head_dim)
        initial = rec_pool[slots].masked_fill(fresh[:, None, None, None], 0)
        rule = recurrent_gated_delta_rule if recurrent else chunked_gated_delta_rule
        out, final = rule(q, k, v, g_BLH, beta_BLH, initial)
        rec_pool[slots] = final
        return out

    def forward(self, x_TD: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T, device = x_TD.shape[0], x_TD.device
        qkv = self.in_proj_qkv(x_TD)
        beta = torch.sigmoid(self.in_proj_b(x_TD))
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x_TD).float() + self.dt_bias)
        out = x_TD.new_empty(T, self.num_value_heads, self.value_head_dim)

        # Single-token slices (decode) go through one batched recurrent step; longer ones chunked.
        singles = [s for s in batch.slices if s.length == 1]
        if singles:
            rows = torch.tensor([s.start for s in singles], device=device)
            slots = torch.tensor([s.slot for s in singles], device=device)
            fresh = torch.tensor([s.past == 0 for s in singles], device=device)
            out[rows] = self._mix(qkv[rows, None], g[rows, None], beta[rows, None], slots, fresh,
                                  batch.states, recurrent=True)[:, 0]
        for s in batch.slices:
            if s.length == 1:
                continue
            slot = torch.tensor([s.slot], device=device)
            fresh = torch.tensor([s.past == 0], device=device)
            out[s.rows] = self._mix(qkv[None, s.rows], g[None, s.rows], beta[None, s.rows], slot, fresh,
                                    batch.states, recurrent=False)[0]

        z = self.in_proj_z(x_TD).view(-1, self.value_head_dim)
        normed = self.norm(out.view(-1, self.value_head_dim), z)
        return self.out_proj(normed.view(T, self.value_dim))
