"""Causal attention of a flat batch of sequences against the paged KV cache.

Shapes: T query rows (B sequences in turn), Hq query heads, Hkv kv heads, hd head dim, N blocks of
S tokens. query [T, Hq, hd]; key_cache / value_cache [N, Hkv, S, hd] (a kv head's keys of a block
together, read as one stream; the query's dtype, or a narrower one: bf16, fp8 e5m2 or e4m3fn);
block_tables [B, max_blocks];
query_start [B + 1] row offsets; context_lens [B] keys cached per sequence (this step's included);
slot_mapping [T] flat cache position (block * S + offset) of each new row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import batched, glue, native
from .gpu import attention as gpu_attention
from .gpu.triton_guard import KernelUnavailable
from .norms import rms_norm_reference
from .varlen import padded_rows, unpad

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def rope_reference(x_THd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half on the first rotary dims of each head: x [T, heads, hd]; cos, sin [T, R]."""
    R = cos.shape[-1]
    rot, rest = x_THd[..., :R], x_THd[..., R:]
    rotated_half = torch.cat([-rot[..., R // 2 :], rot[..., : R // 2]], dim=-1)
    return torch.cat([rot * cos[:, None] + rotated_half * sin[:, None], rest], dim=-1)


@glue
def qk_norm_rope_reference(query, key, q_weight, k_weight, eps: float, positions, inv_freq):
    per_freq = positions if positions.dim() == 2 else positions[:, None]  # [T, R / 2] or [T, 1]
    freqs = per_freq.float() * inv_freq  # [T, R / 2]
    angles = torch.cat([freqs, freqs], dim=-1)
    cos, sin = angles.cos().to(query.dtype), angles.sin().to(query.dtype)
    return (rope_reference(rms_norm_reference(query, q_weight, eps), cos, sin),
            rope_reference(rms_norm_reference(key, k_weight, eps), cos, sin))


def qk_norm_rope(query, key, q_weight, k_weight, eps: float, positions, inv_freq):
    """Per head: zero-centred RMSNorm, then rotary embedding (NeoX, first 2 * len(inv_freq) dims) at
    the rows' positions: [T], or [T, R / 2] a position per frequency (multimodal rotary, vision.positions).
    query [T, H, hd], key [T, KV, hd] (heads may be strided) -> new tensors."""
    if native(query):
        return torch.ops.epserve.qk_norm_rope(query, key, q_weight, k_weight, eps, positions, inv_freq)
    return qk_norm_rope_reference(query, key, q_weight, k_weight, eps, positions, inv_freq)


def write_kv(key_cache, value_cache, key, value, slot_mapping) -> None:
    """Stores the new rows' K and V [T, Hkv, hd] at their cache positions, rounded to the cache's
    dtype (CacheConfig.kv_cache_dtype; the model's by default)."""
    if native(key) and key_cache.is_cpu:
        torch.ops.epserve.write_kv(key_cache, value_cache, key, value, slot_mapping)
        return
    write_kv_reference(key_cache, value_cache, key, value, slot_mapping)


@glue
def write_kv_reference(key_cache, value_cache, key, value, slot_mapping) -> None:
    S = key_cache.shape[2]
    blocks, offsets = slot_mapping // S, slot_mapping % S
    key_cache[blocks, :, offsets] = _stored(key, key_cache.dtype)
    value_cache[blocks, :, offsets] = _stored(value, value_cache.dtype)


def _stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float8_e4m3fn:  # saturate (e4m3fn has no inf) whatever a device's cast does
        x = x.clamp(-E4M3_MAX, E4M3_MAX)
    return x.to(dtype)


def paged_attention_reference(query, key_cache, value_cache, block_tables, query_start, context_lens,
                              scale: float, query_lens: list[int]) -> torch.Tensor:
    """Sequence by sequence: gathers its K/V, repeats kv heads, one SDPA with a causal offset mask."""
    S, groups = key_cache.shape[2], query.shape[1] // key_cache.shape[1]
    out = torch.empty_like(query)
    start = 0
    for i, n in enumerate(query_lens):
        L = int(context_lens[i])
        positions = torch.arange(L, device=query.device)
        blocks, offsets = block_tables[i][positions // S], positions % S
        k = key_cache[blocks, :, offsets].to(query.dtype).transpose(0, 1).repeat_interleave(groups, 0)  # [Hq, L, hd]
        v = value_cache[blocks, :, offsets].to(query.dtype).transpose(0, 1).repeat_interleave(groups, 0)
        mask = positions[None, :] <= torch.arange(L - n, L, device=query.device)[:, None]
        o = F.scaled_dot_product_attention(query[start : start + n].transpose(0, 1), k, v,
                                           attn_mask=mask, scale=scale)
        out[start : start + n] = o.transpose(0, 1)
        start += n
    return out


@glue
def paged_attention_batched(query, key_cache, value_cache, block_tables, query_start, context_lens,
                            scale: float, query_lens: list[int]) -> torch.Tensor:
    """Every sequence in one SDPA (any device; a device's own paged kernel is faster): the blocks of
    each table gathered to [B, Hkv, W * S, hd] (W the table's width), queries padded to the longest
    chunk N, a query head group folded into the row axis ([B, Hkv, G * N, hd]: no GQA repeat of K/V),
    and a causal mask from the context lengths. No host sync: N comes from the host lengths."""
    T, Hq, hd = query.shape
    B, W = block_tables.shape
    Hkv, S = key_cache.shape[1], key_cache.shape[2]
    G, N = Hq // Hkv, (max(query_lens) if query_lens else 0)
    if T == 0:
        return torch.empty_like(query)
    k = key_cache[block_tables].to(query.dtype).transpose(1, 2).reshape(B, Hkv, W * S, hd)
    v = value_cache[block_tables].to(query.dtype).transpose(1, 2).reshape(B, Hkv, W * S, hd)
    rows, lens = padded_rows(query_start, N, T)  # [B, N], [B]
    q = query[rows].view(B, N, Hkv, G, hd).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * N, hd)
    # row i of sequence b is position context - len + i: it sees keys up to there
    last = (context_lens - lens)[:, None] + torch.arange(N, device=query.device)  # [B, N]
    mask = torch.arange(W * S, device=query.device) <= last[..., None]  # [B, N, W * S]
    mask = mask[:, None, None].expand(B, 1, G, N, W * S).reshape(B, 1, G * N, W * S)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B, Hkv, G * N, hd]
    return unpad(out.view(B, Hkv, G, N, hd).permute(0, 3, 1, 2, 4).reshape(B, N, Hq, hd), query_lens)


def paged_attention(query, key_cache, value_cache, block_tables, query_start, context_lens,
                    scale: float, query_lens: list[int]) -> torch.Tensor:
    """One call for every sequence of the step (the C++ kernel on CPUs and the Triton kernels on
    GPUs read K/V in place: no gathered copy, no GQA repeat)."""
    if native(query):
        return torch.ops.epserve.paged_attention(query, key_cache, value_cache, block_tables, query_start,
                                                 context_lens, scale)
    if batched(query) and gpu_attention.usable(query):
        try:
            return gpu_attention.paged_attention(query, key_cache, value_cache, block_tables, query_start,
                                                 context_lens, scale, query_lens)
        except KernelUnavailable:  # logged once; from now on the batched version
            pass
    if batched(query):
        return paged_attention_batched(query, key_cache, value_cache, block_tables, query_start, context_lens,
                                       scale, query_lens)
    return paged_attention_reference(query, key_cache, value_cache, block_tables, query_start, context_lens,
                                     scale, query_lens)
