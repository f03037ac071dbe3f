"""The all-to-all dispatcher on a real gloo group (4 processes: 2 attention + 2 expert ranks)
against a pure-torch reference of dispatch + experts + combine."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.worker.all_to_all import AllToAllDispatcher
from experts import ExpertBank, ExpertShard
from router.placement import ExpertPlacement
from tests.conftest import free_port
from tests.reference import expert_mix

E, D, I, K, A, W = 8, 16, 8, 3, 2, 4
REPLICATED = ExpertPlacement(E, {0: ((0, 1, 2, 3), (0, 4, 5, 6, 7))})  # expert 0 on both workers


def _weights():
    g = torch.Generator().manual_seed(0)
    return torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)


def _scenarios():
    """Per scenario and attention rank: (hidden [T, D], topk_idx [T, K], topk_weights [T, K])."""
    g = torch.Generator().manual_seed(1)

    def tokens(T, experts=None):
        if T == 0:
            return torch.empty(0, D), torch.empty(0, K, dtype=torch.long), torch.empty(0, K)
        x = torch.randn(T, D, generator=g)
        pool = experts or list(range(E))
        idx = torch.stack([torch.tensor(pool)[torch.randperm(len(pool), generator=g)[:K]] for _ in range(T)])
        return x, idx.reshape(T, K), torch.rand(T, K, generator=g)

    return {
        "uneven": [tokens(5), tokens(9)],
        "one-rank-empty": [tokens(0), tokens(6)],
        "all-to-one-worker": [tokens(4, [4, 5, 6, 7]), tokens(7, [5, 6, 7])],
        "all-empty": [tokens(0), tokens(0)],
    }


def _reference(x, idx, w):
    return expert_mix(x, idx, w, *_weights())


def _rank_main(rank: int, init_method: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=W,
                            timeout=timedelta(seconds=60))
    gate_up, down = _weights()
    out = {}
    for placement_name, placement in (
        ("contiguous", ExpertPlacement.contiguous(E, 2, [0])), ("replicated", REPLICATED)
    ):
        dispatcher = AllToAllDispatcher(placement, num_attention_ranks=A)
        if rank < A:
            shard = ExpertShard(E, {})
        else:
            ids = placement.held[0][rank - A]
            shard = ExpertShard(E, {0: ExpertBank(ids, gate_up[list(ids)], down[list(ids)])})
        for name, per_rank in _scenarios().items():
            if rank < A:
                x, idx, w = per_rank[rank]
            else:
                x, idx, w = torch.empty(0, D), torch.empty(0, K, dtype=torch.long), torch.empty(0, K)
            batch, handle = dispatcher.dispatch(0, x, idx, w)
            y = dispatcher.combine(shard.forward(0, batch), handle)
            out[(placement_name, name)] = (y, batch.hidden.shape[0])
    results.put((rank, out))
    dist.destroy_process_group()


def test_all_to_all_matches_reference():
    port = free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [ctx.Process(target=_rank_main, args=(r, f"tcp://127.0.0.1:{port}", results)) for r in range(W)]
    for p in procs:
        p.start()
    outputs = dict(results.get(timeout=120) for _ in range(W))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    scenarios = _scenarios()
    for placement_name in ("contiguous", "replicated"):
        for name, per_rank in scenarios.items():
            for rank in range(A):
                y, received = outputs[rank][(placement_name, name)]
                assert received == 0  # attention ranks hold no experts
                assert y.shape == (per_rank[rank][0].shape[0], D)
                if y.numel():
                    assert (y - _reference(*per_rank[rank])).abs().max().item() < 1e-4
            routed = sum(outputs[r][(placement_name, name)][1] for r in range(A, W))
            assert routed == sum(per_rank[r][0].shape[0] for r in range(A)) * K  # every pair served once
    # all-to-one: the worker holding experts 0-3 receives nothing
    assert outputs[A][("contiguous", "all-to-one-worker")][1] == 0
