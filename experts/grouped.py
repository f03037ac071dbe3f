"""Grouped SwiGLU over tokens routed to a bank of experts, and a plain reference beside it.

Expert e computes y = (silu(x @ gate_e^T) * (x @ up_e^T)) @ down_e^T with the fused checkpoint layout:
gate_up [N, 2I, D] (gate rows first, then up) and down [N, D, I].
Shapes: R routed rows (token, expert pairs), D hidden, I expert intermediate, N experts in the bank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_swiglu(
    hidden_RD: torch.Tensor, counts_N: list[int], gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Rows are sorted by expert: the first counts_N[0] rows go to expert 0, and so on (entries past
    the bank's size must be 0). Uses torch's grouped matmul where it applies, else one pair of
    matmuls per active expert."""
    counts_N = counts_N[: gate_up.shape[0]]
    active = sum(1 for n in counts_N if n)
    if active >= GROUPED_MM_MIN_ACTIVE and _grouped_mm is not None and _aligned(hidden_RD, gate_up, down):
        return _grouped_mm_swiglu(hidden_RD, counts_N, gate_up, down)
    return looped_swiglu(hidden_RD, counts_N, gate_up, down)


def looped_swiglu(
    hidden_RD: torch.Tensor, counts_N: list[int], gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """One pair of matmuls per *active* expert (counts > 0): the Python loop runs over at most R
    experts, never over the whole bank."""
    out = hidden_RD.new_empty(hidden_RD.shape)
    start = 0
    for e, n in enumerate(counts_N):
        if n == 0:
            continue
        rows = slice(start, start + n)
        gate, up = (hidden_RD[rows] @ gate_up[e].T).chunk(2, dim=-1)
        out[rows] = (F.silu(gate) * up) @ down[e].T
        start += n
    return out


_grouped_mm = getattr(F, "grouped_mm", None)
# grouped_mm walks the whole bank (~1 ms for 512 experts on one CPU thread); the loop costs ~20 us
# per active expert: decode batches touch few experts and take the loop.
GROUPED_MM_MIN_ACTIVE = 64


def _aligned(*tensors: torch.Tensor) -> bool:
    """grouped_mm wants 16-byte aligned strides: every inner dim a multiple of 16 bytes."""
    return all(t.shape[-1] * t.element_size() % 16 == 0 and t.shape[-2] * t.element_size() % 16 == 0
               for t in tensors[1:]) and tensors[0].shape[-1] * tensors[0].element_size() % 16 == 0


def _grouped_mm_swiglu(hidden_RD, counts_N, gate_up, down) -> torch.Tensor:
    offsets = torch.tensor(counts_N, device=hidden_RD.device).cumsum(0).to(torch.int32)
    gate, up = _grouped_mm(hidden_RD, gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    return _grouped_mm((F.silu(gate) * up).contiguous(), down.transpose(1, 2), offs=offsets)


def swiglu_reference(
    hidden_RD: torch.Tensor, expert_R: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Row by row, in any order: gathers each row's expert weights. Slow and obviously right."""
    gate_up_rows = gate_up[expert_R]  # [R, 2I, D]
    gate, up = torch.einsum("rd,rid->ri", hidden_RD, gate_up_rows).chunk(2, dim=-1)
    return torch.einsum("ri,rdi->rd", F.silu(gate) * up, down[expert_R])
