"""Grouped SwiGLU against the row-by-row reference, and the shard's bookkeeping."""

from __future__ import annotations

import torch

from experts import ExpertBank, ExpertShard, grouped_swiglu, swiglu_reference
from experts.grouped import _grouped_mm_swiglu, looped_swiglu


def test_grouped_equals_reference_with_empty_and_hot_experts():
    g = torch.Generator().manual_seed(0)
    N, D, I = 6, 16, 8
    gate_up, down = torch.randn(N, 2 * I, D, generator=g), torch.randn(N, D, I, generator=g)
    counts = [3, 0, 17, 1, 0, 5]  # empty experts and a hot one
    expert_R = torch.repeat_interleave(torch.arange(N), torch.tensor(counts))
    hidden = torch.randn(len(expert_R), D, generator=g)
    reference = swiglu_reference(hidden, expert_R, gate_up, down)
    for kernel in (grouped_swiglu, looped_swiglu, _grouped_mm_swiglu):
        assert (kernel(hidden, counts, gate_up, down) - reference).abs().max() < 1e-4
    # counts may run past the bank (a worker's share of a wider all-to-all): zeros are ignored
    assert torch.equal(grouped_swiglu(hidden, counts + [0, 0], gate_up, down),
                       grouped_swiglu(hidden, counts, gate_up, down))


def test_shard_maps_global_to_local_and_counts_bytes():
    bank = ExpertBank((3, 7, 8), torch.zeros(3, 4, 2), torch.zeros(3, 2, 2))
    shard = ExpertShard(num_experts=10, banks={0: bank})
    assert shard.local_index[0].tolist() == [-1, -1, -1, 0, -1, -1, -1, 1, 2, -1]
    assert shard.nbytes == (3 * 4 * 2 + 3 * 2 * 2) * 4
    assert shard.forward(0, torch.zeros(0, 2), [0, 0, 0]).shape == (0, 2)
