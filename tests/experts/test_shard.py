"""The shard's bookkeeping: global -> bank index, bytes held, empty batches."""

from __future__ import annotations

import torch

from experts import ExpertBank, ExpertShard
from router import ExpertBatch


def test_shard_maps_global_to_local_and_counts_bytes():
    bank = ExpertBank((3, 7, 8), torch.zeros(3, 4, 2), torch.zeros(3, 2, 2))
    shard = ExpertShard(num_experts=10, banks={0: bank})
    assert shard.local_index[0].tolist() == [-1, -1, -1, 0, -1, -1, -1, 1, 2, -1]
    assert shard.nbytes == (3 * 4 * 2 + 3 * 2 * 2) * 4
    empty = ExpertBatch(torch.zeros(0, 2), torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1))
    assert shard.forward(0, empty).shape == (0, 2)
