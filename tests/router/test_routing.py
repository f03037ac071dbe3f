"""Gate semantics and the local dispatch/combine pair against a direct computation."""

from __future__ import annotations

import torch

from experts import ExpertBank, ExpertShard
from router import LocalDispatcher, TopKGate
from tests.reference import expert_mix


def test_gate_renormalises_topk_of_full_softmax():
    gate = TopKGate(hidden_size=8, num_experts=32, top_k=4)
    torch.nn.init.normal_(gate.weight)
    x = torch.randn(5, 8)
    idx, w = gate(x)
    probs = torch.softmax(x @ gate.weight.T, -1)
    expected_idx = probs.topk(4).indices
    assert torch.equal(idx, expected_idx)
    assert torch.allclose(w, probs.gather(1, idx) / probs.gather(1, idx).sum(-1, keepdim=True))
    assert torch.allclose(w.sum(-1), torch.ones(5))


def test_local_dispatch_combine_equals_direct_sum():
    g = torch.Generator().manual_seed(0)
    E, D, I, T, K = 8, 16, 8, 11, 3
    gate_up, down = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)
    shard = ExpertShard(E, {0: ExpertBank(tuple(range(E)), gate_up, down)})
    dispatcher = LocalDispatcher(shard.local_index)
    x = torch.randn(T, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    idx[:4] = torch.tensor([5, 6, 7])  # many tokens to the same experts
    w = torch.rand(T, K, generator=g)
    batch, handle = dispatcher.dispatch(0, x, idx, w)
    out = dispatcher.combine(shard.forward(0, batch), handle)
    assert (out - expert_mix(x, idx, w, gate_up, down)).abs().max() < 1e-4


def test_local_dispatch_maps_a_partial_bank():
    """A bank holding some experts in another order: global ids become bank positions."""
    g = torch.Generator().manual_seed(1)
    E, D, I = 8, 16, 8
    gate_up, down = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)
    held = (6, 1, 3)
    shard = ExpertShard(E, {0: ExpertBank(held, gate_up[list(held)], down[list(held)])})
    x, idx, w = torch.randn(4, D, generator=g), torch.tensor([[6, 1], [3, 6], [1, 3], [3, 1]]), torch.rand(4, 2)
    batch, handle = LocalDispatcher(shard.local_index).dispatch(0, x, idx, w)
    assert batch.expert_idx.tolist() == [[0, 1], [2, 0], [1, 2], [2, 1]]
    out = LocalDispatcher(shard.local_index).combine(shard.forward(0, batch), handle)
    assert (out - expert_mix(x, idx, w, gate_up, down)).abs().max() < 1e-4
