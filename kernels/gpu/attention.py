"""Paged attention on GPUs as Triton kernels: K/V read in place from the paged cache (no gathered
copy of a sequence's blocks, no GQA repeat), the query heads of a kv head folded into one tile's rows,
decode steps split along the keys (flash-decoding) so that a few long sequences still fill the GPU.

Triton comes with torch's CUDA builds (torch.compile needs it); imported only when present. Same
contract as kernels.attention.paged_attention — query [T, Hq, hd]; key_cache / value_cache
[N, Hkv, S, hd] in the query's dtype or a narrower one (bf16, fp8 e5m2 / e4m3fn: widened to the
query's dtype as the references do); block_tables [B, W]; query_start [B + 1]; context_lens [B]
(this step's rows included); query_lens the host's rows per sequence. Scores and the softmax in fp32;
in fp32 the dots are IEEE (no tf32: fp32 is the parity mode), in 16-bit the probabilities round to the
query's dtype before the value dot, as in FlashAttention.

Grid: (sequence, kv head, row tile x key split). A tile is BLOCK_M rows of (query row, head of the
group); keys go BLOCK_N at a time, within one cache block where S is a power of two >= 16, else each
key's block looked up in the table. With one row per sequence (decode) the keys of a sequence are cut
into `splits` ranges, each program keeps
its running max, sum and unnormalised output, and a second kernel merges them; the split count is a
function of the shapes only (batch, table width: static in a CUDA graph), never of the lengths.
Tests run the kernels on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1). A kernel
that does not build on a device raises KernelUnavailable once (kernels.gpu.triton_guard).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .triton_guard import TritonOp, triton

if triton is not None:
    import triton.language as tl

_LOG2E = 1.4426950408889634
MAX_SPLITS = 64  # key ranges per decode row: past this the merge costs more than the programs gain
OP = TritonOp("paged attention", (torch.float32, torch.bfloat16, torch.float16))
usable = OP.usable  # CUDA tensors, Triton present, the kernels not failed to build here before

if triton is not None:

    @triton.jit
    def _dot(a, b, EXACT: tl.constexpr):
        """a @ b with fp32 accumulation; EXACT: IEEE fp32 products (fp32 inputs: no tf32; 16-bit
        inputs widened first, exact, for the interpreter, whose 16-bit dots are wrong)."""
        if EXACT:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _attend(Q, K, V, Out, Part_M, Part_L, Part_O, block_tables, query_start, context_lens,
                scale_log2, num_tiles, keys_per_split,
                stride_qt, stride_qh, stride_kn, stride_kh, stride_ks, stride_vn, stride_vh, stride_vs,
                stride_bt, stride_ot, stride_oh, stride_ps, stride_pt, stride_ph,
                G: tl.constexpr, HD: tl.constexpr, HD_P2: tl.constexpr, S: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, EXACT: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        tile = tl.program_id(2) % num_tiles
        split = tl.program_id(2) // num_tiles
        first_row = tl.load(query_start + b)
        n_rows = tl.load(query_start + b + 1) - first_row
        context = tl.load(context_lens + b)

        m_idx = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # a tile row = (query row i, head g of the group)
        i = m_idx // G
        head = h * G + m_idx % G
        row_ok = i < n_rows
        d = tl.arange(0, HD_P2)
        d_ok = d < HD
        q = tl.load(Q + (first_row + i)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        last_key = context - n_rows + i  # row i sees keys 0 .. last_key (causal, after the cached ones)
        key_end = tl.minimum(context - n_rows + tl.minimum((tile + 1) * BLOCK_M - 1, G * n_rows - 1) // G + 1,
                             (split + 1) * keys_per_split)
        key_start = split * keys_per_split

        m_run = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a row with no key here stays at 0
        l_run = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HD_P2], tl.float32)
        for start in range(key_start, key_end, BLOCK_N):
            p = start + tl.arange(0, BLOCK_N)
            p_ok = p < key_end
            kv_ok = p_ok[:, None] & d_ok[None, :]
            if S % BLOCK_N == 0:  # the tile lies in one block: one base address, 32-bit offsets (fewer registers)
                block = tl.load(block_tables + b * stride_bt + start // S)
                row = start % S + tl.arange(0, BLOCK_N)
                k_at = K + block * stride_kn + h * stride_kh
                v_at = V + block * stride_vn + h * stride_vh
                k = tl.load(k_at + (row * stride_ks)[:, None] + d[None, :], mask=kv_ok, other=0.0)
                v = tl.load(v_at + (row * stride_vs)[:, None] + d[None, :], mask=kv_ok, other=0.0)
            else:  # each key's block looked up
                block = tl.load(block_tables + b * stride_bt + p // S, mask=p_ok, other=0)
                k = tl.load(K + (block * stride_kn + h * stride_kh + (p % S) * stride_ks)[:, None] + d[None, :],
                            mask=kv_ok, other=0.0)
                v = tl.load(V + (block * stride_vn + h * stride_vh + (p % S) * stride_vs)[:, None] + d[None, :],
                            mask=kv_ok, other=0.0)
            k = k.to(q.dtype)
            scores = _dot(q, tl.trans(k), EXACT) * scale_log2
            visible = (p[None, :] <= last_key[:, None]) & p_ok[None, :]
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(scores, 1))
            probs = tl.exp2(scores - m_new[:, None])
            rescale = tl.exp2(m_run - m_new)
            l_run = l_run * rescale + tl.sum(probs, 1)
            v = v.to(q.dtype)
            acc = acc * rescale[:, None] + _dot(probs.to(q.dtype), v, EXACT)  # 16-bit: rounded probabilities
            m_run = m_new

        keep = row_ok[:, None] & d_ok[None, :]
        if SPLIT:
            at = split * stride_ps + (first_row + i) * stride_pt + head * stride_ph
            tl.store(Part_M + at, m_run, mask=row_ok)
            tl.store(Part_L + at, l_run, mask=row_ok)
            tl.store(Part_O + at[:, None] * HD_P2 + d[None, :], acc, mask=row_ok[:, None])  # padded dims: 0
        else:
            out = acc / l_run[:, None]
            tl.store(Out + (first_row + i)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     out.to(Out.dtype.element_ty), mask=keep)

    @triton.jit
    def _merge(Out, Part_M, Part_L, Part_O, num_splits, stride_ot, stride_oh, stride_ps, stride_pt, stride_ph,
               HD: tl.constexpr, HD_P2: tl.constexpr):
        """Out[t, head] from the splits' running max, sum and unnormalised output, one split at a time
        (rescaled as the online softmax does; the split count is not a compile-time constant)."""
        t = tl.program_id(0)
        head = tl.program_id(1)
        row = t * stride_pt + head * stride_ph
        d = tl.arange(0, HD_P2)
        m_run = tl.full([1], -1.0e30, tl.float32)
        l_run = tl.zeros([1], tl.float32)
        acc = tl.zeros([HD_P2], tl.float32)
        for split in range(num_splits):
            at = split * stride_ps + row
            m = tl.load(Part_M + at + tl.zeros([1], tl.int32))
            m_new = tl.maximum(m_run, m)
            old, new = tl.exp2(m_run - m_new), tl.exp2(m - m_new)
            l_run = l_run * old + tl.load(Part_L + at + tl.zeros([1], tl.int32)) * new
            acc = acc * old + tl.load(Part_O + at * HD_P2 + d) * new
            m_run = m_new
        tl.store(Out + t * stride_ot + head * stride_oh + d, (acc / l_run).to(Out.dtype.element_ty), mask=d < HD)


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """Enough programs for every SM a few times over (on a CPU, the interpreter in tests: enough
    that decode batches split their keys)."""
    if device.type != "cuda":
        return 64
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _pow2(n: int) -> int:
    """A tile dim: a power of two, at least tl.dot's 16."""
    return max(16, triton.next_power_of_2(n))


@dataclass(frozen=True)
class LaunchPlan:
    block_m: int  # tile rows: (query row, head of the group) pairs
    block_n: int  # keys a loop iteration reads
    num_warps: int
    num_tiles: int  # row tiles per (sequence, kv head)
    splits: int  # key ranges per tile (decode steps), merged after
    keys_per_split: int


def launch_plan(B: int, W: int, S: int, Hkv: int, G: int, max_rows: int, hd: int, device: torch.device) -> LaunchPlan:
    """Shapes only (B sequences, tables W blocks of S keys, the longest chunk's rows): the same plan
    for every replay of a CUDA graph."""
    # tiles sized so that no configuration spills registers on sm_90 (ptxas -v on the flagship's and
    # a toy's heads): a decode tile has the 16 query heads of a kv head; keys within one cache block
    wide = _pow2(hd) > 128
    block_m, num_warps = (16, 4) if max_rows == 1 else (64, 8)
    power_of_two = S & (S - 1) == 0
    block_n = min(S, 16 if wide else 32) if S >= 16 and power_of_two else 32 if wide else 64
    num_tiles = triton.cdiv(max_rows * G, block_m)
    key_tiles = triton.cdiv(W * S, block_n)
    wanted = triton.cdiv(_programs_wanted(device), B * Hkv * num_tiles)
    splits = min(key_tiles, wanted, MAX_SPLITS) if max_rows == 1 else 1
    keys_per_split = triton.cdiv(key_tiles, splits) * block_n
    return LaunchPlan(block_m, block_n, num_warps, num_tiles, triton.cdiv(W * S, keys_per_split), keys_per_split)


def paged_attention(query, key_cache, value_cache, block_tables, query_start, context_lens,
                    scale: float, query_lens: list[int]) -> torch.Tensor:
    """kernels.attention.paged_attention's contract (module docstring); no host sync (the tiles come
    from the host's query_lens, the key splits from the table's width)."""
    T, Hq, hd = query.shape
    B, W = block_tables.shape
    _, Hkv, S, _ = key_cache.shape
    out = torch.empty_like(query)
    if T == 0:
        return out
    plan = launch_plan(B, W, S, Hkv, Hq // Hkv, max(query_lens), hd, query.device)
    if query.stride(2) != 1:
        query = query.contiguous()
    for cache in (key_cache, value_cache):
        if cache.stride(3) != 1:
            raise ValueError("paged attention: the caches' head dim must be contiguous")
    exact = query.dtype == torch.float32 or not query.is_cuda  # fp32, or the interpreter
    OP.launch(_launch, query, key_cache, value_cache, out, block_tables, query_start, context_lens, scale, plan, exact)
    return out


def _launch(query, key_cache, value_cache, out, block_tables, query_start, context_lens, scale: float,
            plan: LaunchPlan, exact: bool) -> None:
    T, Hq, hd = query.shape
    B, Hkv, splits, HD_P2 = block_tables.shape[0], key_cache.shape[1], plan.splits, _pow2(query.shape[2])
    if splits > 1:
        part_m = torch.empty(splits, T, Hq, device=query.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        part_o = torch.empty(splits, T, Hq, HD_P2, device=query.device, dtype=torch.float32)
    else:
        part_m = part_l = part_o = out  # not read
    _attend[(B, Hkv, plan.num_tiles * splits)](
        query, key_cache, value_cache, out, part_m, part_l, part_o, block_tables, query_start, context_lens,
        scale * _LOG2E, plan.num_tiles, plan.keys_per_split,
        query.stride(0), query.stride(1), *key_cache.stride()[:3], *value_cache.stride()[:3],
        block_tables.stride(0), out.stride(0), out.stride(1), *(part_m.stride() if splits > 1 else (0, 0, 0)),
        G=Hq // Hkv, HD=hd, HD_P2=HD_P2, S=key_cache.shape[2], BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        SPLIT=splits > 1, EXACT=exact, num_warps=plan.num_warps)
    if splits > 1:
        _merge[(T, Hq)](out, part_m, part_l, part_o, splits, out.stride(0), out.stride(1), *part_m.stride(),
                        HD=hd, HD_P2=HD_P2)
