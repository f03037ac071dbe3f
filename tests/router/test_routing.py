"""Gate semantics and the local dispatch/combine pair against a direct computation."""

from __future__ import annotations

import torch

from experts import ExpertShard, ExpertBank, swiglu_reference
from router import LocalDispatcher, TopKGate


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
    dispatcher = LocalDispatcher(shard.local_index, {0: E})
    x = torch.randn(T, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    idx[:4] = torch.tensor([5, 6, 7])  # many tokens to the same experts
    w = torch.rand(T, K, generator=g)
    batch, handle = dispatcher.dispatch(0, x, idx, w)
    assert sum(batch.counts) == T * K
    out = dispatcher.combine(shard.forward(0, batch.hidden, batch.counts), handle)
    expected = torch.zeros(T, D)
    for k in range(K):
        expected += w[:, k, None] * swiglu_reference(x, idx[:, k], gate_up, down)
    assert (out - expected).abs().max() < 1e-4
