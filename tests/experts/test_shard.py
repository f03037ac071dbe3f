"""The shard's bookkeeping: global -> bank index, bytes held, empty batches, banks cut and joined."""

from __future__ import annotations

import torch

from experts import ExpertBank, ExpertShard
from kernels.moe import Fp8Scales
from router import ExpertBatch


def test_shard_maps_global_to_local_and_counts_bytes():
    bank = ExpertBank((3, 7, 8), torch.zeros(3, 4, 2), torch.zeros(3, 2, 2))
    shard = ExpertShard(num_experts=10, banks={0: bank})
    assert shard.local_index[0].tolist() == [-1, -1, -1, 0, -1, -1, -1, 1, 2, -1]
    assert shard.nbytes == (3 * 4 * 2 + 3 * 2 * 2) * 4
    empty = ExpertBatch(torch.zeros(0, 2), torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1))
    assert shard.forward(0, empty).shape == (0, 2)


def test_fp8_banks_keep_their_scales_when_cut_and_joined():
    """A rebalanced worker's bank is cut from the old one and joined with freshly read experts: FP8
    ones carry their block scales along, expert by expert."""
    def fp8(ids):
        n = len(ids)
        weights = [torch.full((n, 4, 2), 1.0).to(torch.float8_e4m3fn), torch.ones(n, 2, 2).to(torch.float8_e4m3fn)]
        tag = torch.tensor(ids, dtype=torch.float32)[:, None, None]  # each expert's scales name it
        return ExpertBank(tuple(ids), *weights, Fp8Scales(tag.expand(n, 2, 1).clone(), tag.expand(n, 1, 1).clone(),
                                                          (2, 2)))

    bank = ExpertBank.joined([fp8([3, 7]).experts([1]), fp8([1, 9])]).experts([2, 0, 1])
    assert bank.expert_ids == (9, 7, 1)
    assert bank.scales.gate_up[:, 0, 0].tolist() == [9, 7, 1] and bank.scales.down[:, 0, 0].tolist() == [9, 7, 1]
    assert bank.nbytes == 3 * (4 * 2 + 2 * 2) + 3 * (2 + 1) * 4  # a byte a weight, fp32 scales
