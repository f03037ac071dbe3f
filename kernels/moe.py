"""The routed experts of a MoE layer: the router's top-k, and grouped SwiGLU with the weighted sum.

Shapes: T tokens, E experts in the router, K top-k, R rows handed to a bank of N experts, D hidden,
I expert intermediate. A bank stores gate_up [N, 2I, D] (gate rows first, then up) and down
[N, D, I], the fused checkpoint layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backend import batched, glue, native
from .gpu import moe as gpu_moe
from .gpu.triton_guard import KernelUnavailable
from .linear import linear


@dataclass(frozen=True)
class Fp8Scales:
    """The block scales of an FP8 (e4m3) expert bank kept as stored: gate_up [N, ceil(2I/b0),
    ceil(D/b1)] and down [N, ceil(D/b0), ceil(I/b1)] (Qwen's weight_scale_inv), fp32, contiguous;
    a weight is its fp8 value times its [b0, b1] block's scale."""

    gate_up: torch.Tensor
    down: torch.Tensor
    block: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def to(self, device: torch.device | str) -> Fp8Scales:
        return Fp8Scales(self.gate_up.to(device), self.down.to(device), self.block)


def dequantize_blocks(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight [..., out, in] (fp8) * scale [..., ceil(out/b0), ceil(in/b1)] -> fp32 [..., out, in]."""
    out, inp = weight.shape[-2:]
    expanded = scale.float().repeat_interleave(block[0], -2)[..., :out, :].repeat_interleave(block[1], -1)[..., :inp]
    return weight.float() * expanded


def fp8_banks_supported(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether expert banks on this device may stay FP8 as stored: a GPU that has e4m3 (sm_89+:
    Ada, Hopper and later) with Triton (the few-rows kernels read them, larger batches dequantise
    them on the fly) and a 16-bit compute dtype; else FP8 checkpoints are dequantised as they load.
    Asked where no GPU is (an engine planning Ray workers' memory), it answers for such a GPU."""
    device = torch.device(device)
    if device.type != "cuda" or gpu_moe.triton is None or dtype not in (torch.bfloat16, torch.float16):
        return False
    return not torch.cuda.is_available() or torch.cuda.get_device_capability(device) >= (8, 9)


def dequantize_bank(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype,
                    wanted_N: torch.Tensor | None = None) -> torch.Tensor:
    """An FP8 bank [N, R, C] in dtype: one Triton pass on GPUs (wanted_N: only those experts' rows
    written), else dequantize_blocks' rounding (every expert)."""
    if gpu_moe.DEQUANTIZE.usable_for(weight.device, dtype):
        try:
            return gpu_moe.dequantize(weight, scale, block, dtype, wanted_N)
        except KernelUnavailable:
            pass
    return dequantize_blocks(weight, scale, block).to(dtype)


@glue
def topk_softmax_reference(logits_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    weights, idx = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return idx, weights.to(logits_TE.dtype)


def topk_softmax(logits_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts (fp32), the k largest, renormalised to sum 1: idx [T, K] int64
    (descending), weights [T, K] in the logits' dtype."""
    if native(logits_TE):
        return torch.ops.epserve.topk_softmax(logits_TE, k)
    return topk_softmax_reference(logits_TE, k)


def moe_experts_reference(x_RD, idx_RK, weights_RK, gate_up, down, partial: bool = False) -> torch.Tensor:
    """One pair of matmuls per active expert, then the router-weighted sum over each row's pairs."""
    R, K = idx_RK.shape
    pair_out = x_RD.new_zeros(R * K, x_RD.shape[1])
    flat = idx_RK.reshape(-1).long()
    for e in flat[flat >= 0].unique().tolist():
        pairs = (flat == e).nonzero()[:, 0]
        gate, up = (x_RD[pairs // K] @ gate_up[e].T).chunk(2, dim=-1)
        pair_out[pairs] = (F.silu(gate) * up) @ down[e].T
    weighted = pair_out.view(R, K, -1) * weights_RK.to(x_RD.dtype)[..., None]
    total = weighted.double().sum(1)
    return total if partial else total.float().to(x_RD.dtype)


def moe_experts_grouped(x_RD, idx_RK, weights_RK, gate_up, down, partial: bool = False,
                        pairs: tuple | None = None) -> torch.Tensor:
    """Any device, no host sync: the (row, expert) pairs sorted by expert (pairs: the caller's sort),
    then two grouped GEMMs (torch._grouped_mm: one launch each for every expert of the bank),
    SwiGLU between; each row's K pair outputs summed in fp64 (exact for a row's few terms, as the
    reference's; no atomics, unlike an index_add). On GPUs SwiGLU and the sum are kernels.gpu.moe's
    Triton passes. Needs the inner dims D and I to span multiples of 16 bytes (grouped_mm's stride
    rule)."""
    order, position, offsets = pairs or _pairs_by_expert(idx_RK, gate_up.shape[0])
    hidden = torch._grouped_mm(x_RD[order // idx_RK.shape[1]], gate_up.transpose(-2, -1), offs=offsets)  # [R*K, 2I]
    sorted_out = torch._grouped_mm(swiglu(hidden), down.transpose(-2, -1), offs=offsets)
    return weighted_sum(sorted_out, position, idx_RK, weights_RK, partial)


def moe_experts_triton(x_RD, idx_RK, weights_RK, gate_up, down, partial: bool = False,
                       scales: Fp8Scales | None = None, pairs: tuple | None = None) -> torch.Tensor:
    """GPUs, no host sync: the pairs sorted by expert, then kernels.gpu.moe's grouped kernels (the
    banks read as stored, FP8 ones dequantised in each weight tile; x's rows gathered and SwiGLU
    fused in the first GEMM) and the weighted sum."""
    order, position, ends = pairs or _pairs_by_expert(idx_RK, gate_up.shape[0])
    sorted_out = gpu_moe.experts_grouped(x_RD, order, ends, idx_RK.shape[1], gate_up, down, scales)
    return weighted_sum(sorted_out, position, idx_RK, weights_RK, partial)


PADDED_MIN_PAIRS = 40_960  # 4k tokens at top-10: from there on the padded matmuls were measured faster
PADDED_MAX_WASTE = 1.5  # the padded rows (experts x the busiest one's pairs) at most this many times the pairs


def padded_usable(x_RD: torch.Tensor, idx_RK: torch.Tensor) -> bool:
    """moe_experts_padded's steps: GPUs, 16-bit dtypes, at least PADDED_MIN_PAIRS pairs (large
    prefill steps: eager, so its host sync is allowed; never while a CUDA graph is being captured)."""
    return (x_RD.is_cuda and x_RD.dtype in (torch.bfloat16, torch.float16) and idx_RK.numel() >= PADDED_MIN_PAIRS
            and not torch.cuda.is_current_stream_capturing())


def pad_by_expert(x_RD, idx_RK, pairs: tuple, N: int, max_waste: float | None = None):
    """x's row of each pair in the bank written to its expert's rows of x_padded [N, B, D], B the
    busiest expert's pair count (read on the host: one sync), with each such pair's expert and row
    there, in expert order: (x_padded, expert, within); None where N x B would pass max_waste
    (default PADDED_MAX_WASTE) x the bank's pairs (skewed routing) or the bank has none."""
    order, _, ends = pairs
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    busiest, inside = torch.stack([(ends - starts).max(), ends[-1]]).tolist()  # the sync
    if inside == 0 or N * busiest > (PADDED_MAX_WASTE if max_waste is None else max_waste) * inside:
        return None
    in_bank = order[:inside]  # the bank's pairs come first in expert order, then those outside it
    expert = idx_RK.reshape(-1)[in_bank].long()
    within = torch.arange(inside, device=x_RD.device) - starts[expert]  # each pair's row in its expert's
    x_padded = x_RD.new_zeros(N, busiest, x_RD.shape[1])
    x_padded[expert, within] = x_RD[in_bank // idx_RK.shape[1]]
    return x_padded, expert, within


def moe_experts_padded(x_RD, idx_RK, weights_RK, gate_up, down, partial: bool = False,
                       pairs: tuple | None = None) -> torch.Tensor | None:
    """Large steps: every expert's pairs padded to the busiest expert's count [N, B] (pad_by_expert),
    the two GEMMs as batched matmuls over them (dense tiles: on an H200 at 4k / 16k tokens over 512
    experts top-10 they did 269 / 494 TFLOP/s of useful work where torch._grouped_mm did 245 / 395),
    SwiGLU between, then the weighted sum. None, before any GEMM, where pad_by_expert declines."""
    N, two_I, D = gate_up.shape
    pairs = pairs or _pairs_by_expert(idx_RK, N)
    padded = pad_by_expert(x_RD, idx_RK, pairs, N)
    if padded is None:
        return None
    x_padded, expert, within = padded
    busiest = x_padded.shape[1]
    hidden = torch.bmm(x_padded, gate_up.transpose(-2, -1))  # [N, B, 2I]
    act = swiglu(hidden.view(N * busiest, two_I)).view(N, busiest, two_I // 2)
    out = torch.bmm(act, down.transpose(-2, -1))  # [N, B, D]
    sorted_out = out.new_empty(idx_RK.numel(), D)  # pairs outside the bank: unwritten, masked by the sum
    sorted_out[:expert.numel()] = out[expert, within]
    return weighted_sum(sorted_out, pairs[1], idx_RK, weights_RK, partial)


def swiglu(hidden: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of [P, 2I] pair rows (gate | up): one Triton pass on GPUs, else torch's."""
    if gpu_moe.usable(hidden):
        try:
            return gpu_moe.swiglu(hidden)
        except KernelUnavailable:
            pass
    return _swiglu(hidden)


def weighted_sum(sorted_out, position, idx_RK, weights_RK, partial: bool) -> torch.Tensor:
    """Each row's router-weighted sum of its pairs' outputs (_weighted_sum): read in place in expert
    order by one Triton pass on GPUs, else torch's."""
    if gpu_moe.usable(sorted_out, weights_RK):
        try:
            return gpu_moe.weighted_sum(sorted_out, position, idx_RK, weights_RK, partial)
        except KernelUnavailable:
            pass
    return _weighted_sum(sorted_out, position, idx_RK, weights_RK, partial)


@glue
def _pairs_by_expert(idx_RK: torch.Tensor, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The order [R*K] that sorts the pairs by expert (pairs outside the bank last, past every
    group), its inverse (each pair's position in that order) and the groups' ends [N] int32
    (searchsorted, not bincount, which syncs to size its output)."""
    flat = idx_RK.reshape(-1).long()
    key = torch.where(flat >= 0, flat, N)
    order = torch.argsort(key, stable=True)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    ends = torch.arange(1, N + 1, device=key.device)
    return order, position, torch.searchsorted(key[order], ends).to(torch.int32)


@glue
def _swiglu(hidden: torch.Tensor) -> torch.Tensor:
    gate, up = hidden.chunk(2, dim=-1)
    return (F.silu(gate) * up).contiguous()


@glue
def _weighted_sum(sorted_out, position, idx_RK, weights_RK, partial: bool) -> torch.Tensor:
    """Pair outputs [R*K, D] in expert order (position: each (row, k) pair's place in it) -> each
    row's router-weighted sum over its K pairs, in fp64 (partial) or rounded once to the pairs' dtype."""
    R, K = idx_RK.shape
    pair_out = sorted_out[position].view(R, K, -1)  # [R, K, D]
    weighted = pair_out * weights_RK.to(sorted_out.dtype)[..., None]
    weighted = torch.where((idx_RK >= 0).view(R, K, 1), weighted, 0)  # pairs past the groups: not computed
    total = weighted.sum(1, dtype=torch.float64)
    return total if partial else total.float().to(sorted_out.dtype)


def _grouped_mm_fits(x_RD, down) -> bool:
    """torch._grouped_mm is there (torch >= 2.8), takes the dtype (CUDA: bf16 only) and the strides."""
    step = 16 // x_RD.element_size()
    return (hasattr(torch, "_grouped_mm") and (x_RD.is_cpu or x_RD.dtype == torch.bfloat16)
            and x_RD.shape[0] > 0 and x_RD.shape[1] % step == 0 and down.shape[-1] % step == 0)


def moe_experts(x_RD, idx_RK, weights_RK, gate_up, down, partial: bool = False,
                scales: Fp8Scales | None = None) -> torch.Tensor:
    """out[r] = sum over k of weights[r, k] * SwiGLU of expert idx[r, k] on x[r], the sum taken in
    fp64 (exact for a row's few terms, so any split of its experts over workers adds up to the same
    bits) and rounded once; partial=True returns the fp64 sums (an expert worker's part). idx are
    positions in the bank, -1 where the expert is not in this bank (contributes nothing). scales:
    the bank is FP8 as stored (GPUs), read as its weights dequantised to x's dtype."""
    if scales is not None:
        # decode-sized batches: the few-rows kernels read the FP8 weights as stored (the bits of the
        # bank dequantised at load); larger ones the grouped kernels, each weight tile dequantised as
        # it is loaded (a byte a weight read, where dequantising the bank first moves five); if
        # those do not build, the experts hit dequantised for the grouped GEMMs
        if batched(x_RD) and gpu_moe.few_rows_usable(x_RD, idx_RK):
            try:
                return gpu_moe.experts_few_rows(x_RD, idx_RK, weights_RK, gate_up, down, partial, scales)
            except KernelUnavailable:
                pass
        if batched(x_RD) and gpu_moe.grouped_usable(x_RD):  # larger ones: FP8 read in the GEMMs' tiles
            try:
                return moe_experts_triton(x_RD, idx_RK, weights_RK, gate_up, down, partial, scales)
            except KernelUnavailable:
                pass
        return moe_experts_dequantised(x_RD, idx_RK, weights_RK, gate_up, down, partial, scales)
    if native(x_RD):
        return torch.ops.epserve.moe_experts(x_RD, idx_RK, weights_RK, gate_up, down, partial)
    if batched(x_RD) and gpu_moe.few_rows_usable(x_RD, idx_RK):  # GPUs, decode-sized batches
        try:
            return gpu_moe.experts_few_rows(x_RD, idx_RK, weights_RK, gate_up, down, partial)
        except KernelUnavailable:  # logged once; from now on the grouped GEMMs
            pass
    pairs = None  # the sort by expert, once: a declined padded step hands it to the grouped GEMMs
    if batched(x_RD) and padded_usable(x_RD, idx_RK):  # GPUs, large prefill steps
        pairs = _pairs_by_expert(idx_RK, gate_up.shape[0])
        out = moe_experts_padded(x_RD, idx_RK, weights_RK, gate_up, down, partial, pairs)
        if out is not None:
            return out
    if batched(x_RD) and _grouped_mm_fits(x_RD, down):  # GPUs: grouped GEMM
        return moe_experts_grouped(x_RD, idx_RK, weights_RK, gate_up, down, partial, pairs)
    if batched(x_RD) and gpu_moe.grouped_usable(x_RD):  # GPUs, fp16 (grouped_mm takes bf16 only there)
        try:
            return moe_experts_triton(x_RD, idx_RK, weights_RK, gate_up, down, partial, pairs=pairs)
        except KernelUnavailable:
            pass
    return moe_experts_reference(x_RD, idx_RK, weights_RK, gate_up, down, partial)


def moe_experts_dequantised(x_RD, idx_RK, weights_RK, gate_up, down, partial: bool, scales: Fp8Scales):
    """An FP8 bank's experts hit by these rows dequantised to x's dtype (the others' rows never read;
    marked on the device: no sync, CUDA graphs capture it), then moe_experts over them: the bits of
    the bank dequantised at load."""
    hit = torch.zeros(gate_up.shape[0] + 1, dtype=torch.int32, device=x_RD.device)
    hit[idx_RK.reshape(-1).long() + 1] = 1  # slot 0: pairs outside the bank (-1)
    gate_up = dequantize_bank(gate_up, scales.gate_up, scales.block, x_RD.dtype, hit[1:])
    down = dequantize_bank(down, scales.down, scales.block, x_RD.dtype, hit[1:])
    return moe_experts(x_RD, idx_RK, weights_RK, gate_up, down, partial)


@glue
def add_shared_expert_reference(x_TD, gate_up, down, gate_logit_T1, routed_TD) -> torch.Tensor:
    gate, up = linear(x_TD, gate_up).chunk(2, dim=-1)
    return routed_TD + torch.sigmoid(gate_logit_T1) * linear(F.silu(gate) * up, down)


def add_shared_expert(x_TD, gate_up, down, gate_logit_T1, routed_TD) -> torch.Tensor:
    """routed + sigmoid(gate_logit) * down(silu(gate) * up), gate | up = x gate_up^T: the shared
    expert (gate_up [2I, D], down [D, I]) joined to the routed experts' sum, in one C++ call."""
    if native(x_TD):
        return torch.ops.epserve.shared_expert(x_TD, gate_up, down, gate_logit_T1, routed_TD)
    if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor):
        return add_shared_expert_reference(x_TD, gate_up, down, gate_logit_T1, routed_TD)
    # FP8 weights kept as stored (kernels.linear's Triton kernels): its steps eager, not compiled glue
    return add_shared_expert_reference.__wrapped__(x_TD, gate_up, down, gate_logit_T1, routed_TD)
