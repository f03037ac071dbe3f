"""The MoE exchange over worker links (4 processes: 2 attention + 2 expert workers) against a
pure-torch reference of dispatch + experts + combine; and on one device (threads of one process),
against one shard holding every expert (tests/cuda/test_engine.py runs it on a GPU)."""

from __future__ import annotations

import socket
import sys
import threading

import pytest
import torch
import torch.multiprocessing as mp

from cluster.worker import links
from cluster.worker.exchange import ExpertServer, LinkDispatcher
from cluster.worker.timing import PhaseTimer
from experts import ExpertBank, ExpertShard
from router import ExpertBatch
from router.placement import ExpertPlacement
from tests.reference import expert_mix

E, D, I, K, A = 8, 16, 8, 3, 2
TOKEN = "test-token"
PLACEMENTS = {
    "contiguous": ExpertPlacement.contiguous(E, 2, [0]),
    "replicated": ExpertPlacement(E, {0: ((0, 1, 2, 3), (0, 4, 5, 6, 7))}),  # expert 0 on both workers
}


def _weights():
    g = torch.Generator().manual_seed(0)
    return torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)


def _scenarios():
    """Per scenario and attention worker: (hidden [T, D], topk_idx [T, K], topk_weights [T, K])."""
    g = torch.Generator().manual_seed(1)

    def tokens(T, experts=None):
        x = torch.randn(T, D, generator=g)
        pool = torch.tensor(experts or list(range(E)))
        idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:K]] for _ in range(T)] or
                          [torch.zeros(0, K, dtype=torch.long)]).reshape(T, K)
        return x, idx, torch.rand(T, K, generator=g)

    return {
        "uneven": [tokens(5), tokens(9)],
        "one-worker-idle": [tokens(0), tokens(6)],
        "all-to-one-expert-worker": [tokens(4, [4, 5, 6, 7]), tokens(7, [5, 6, 7])],
    }


def _expert_main(index: int, addresses, results) -> None:
    torch.set_num_threads(1)
    listener = links.Listener("127.0.0.1")
    addresses.put((index, listener.address))
    accepted = listener.accept(TOKEN, {("attention", a) for a in range(A)}, 60)
    server = ExpertServer([accepted[("attention", a)] for a in range(A)], D, K, torch.float32, timer=PhaseTimer())
    gate_up, down = _weights()
    received = {}
    for name, placement in PLACEMENTS.items():
        ids = placement.held[0][index]
        shard = ExpertShard(E, {0: ExpertBank(ids, gate_up[list(ids)], down[list(ids)])})
        for scenario, per_worker in _scenarios().items():
            before = server.bytes_in
            server.serve(0, [x.shape[0] for x, _, _ in per_worker], shard)
            received[(name, scenario)] = server.bytes_in - before
    results.put((f"expert{index}", received))


def _attention_main(rank: int, expert_addresses, results) -> None:
    torch.set_num_threads(1)
    expert_links = [links.connect(address, TOKEN, "attention", rank, 60) for address in expert_addresses]
    out = {}
    for name, placement in PLACEMENTS.items():
        dispatcher = LinkDispatcher(placement, expert_links)
        for scenario, per_worker in _scenarios().items():
            x, idx, w = per_worker[rank]
            if x.shape[0] == 0:  # an idle attention worker skips the forward; the experts know it
                continue
            batch, handle = dispatcher.dispatch(0, x, idx, w)
            out[(name, scenario)] = dispatcher.combine(batch.hidden, handle).tolist()  # no tensors through the queue
    results.put((f"attention{rank}", out))


def test_exchange_matches_reference():
    ctx = mp.get_context("spawn")
    addresses, results = ctx.Queue(), ctx.Queue()
    experts = [ctx.Process(target=_expert_main, args=(e, addresses, results)) for e in range(2)]
    for p in experts:
        p.start()
    expert_addresses = [address for _, address in sorted(addresses.get(timeout=60) for _ in range(2))]
    attention = [ctx.Process(target=_attention_main, args=(a, expert_addresses, results)) for a in range(A)]
    for p in attention:
        p.start()
    outputs = dict(results.get(timeout=120) for _ in range(4))
    for p in experts + attention:
        p.join(timeout=30)
        assert p.exitcode == 0
    scenarios = _scenarios()
    for name in PLACEMENTS:
        for scenario, per_worker in scenarios.items():
            for rank in range(A):
                x, idx, w = per_worker[rank]
                if x.shape[0]:
                    y = torch.tensor(outputs[f"attention{rank}"][(name, scenario)])
                    assert (y - expert_mix(x, idx, w, *_weights())).abs().max().item() < 1e-4
            # each row went once to each expert worker: rows * (hidden + K idx + K weights) bytes
            rows = sum(x.shape[0] for x, _, _ in per_worker)
            for e in range(2):
                assert outputs[f"expert{e}"][(name, scenario)] == rows * (D * 4 + K * 8)


def exchange_on_one_device(device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention worker's dispatch and combine with its rows on `device`, served by two expert
    workers (threads here, over links) whose banks are on `device` too, an expert replicated on
    both: (the combined rows [T, D], the rows of one shard holding every expert)."""
    gate_up, down = (w.to(device, dtype) for w in _weights())
    placement = PLACEMENTS["replicated"]
    x, idx, w = _scenarios()["uneven"][1]
    x, idx, w = x.to(device, dtype), idx.to(device), w.to(device)
    whole = ExpertShard(E, {0: ExpertBank(tuple(range(E)), gate_up, down)})
    expected = whole.forward(0, ExpertBatch(x, idx, w))
    whole.forward(0, ExpertBatch(x, idx, w), partial=True)  # a GPU's kernels built here, not in two threads at once
    listeners = [links.Listener("127.0.0.1") for _ in range(2)]

    def serve(index: int) -> None:
        ids = placement.held[0][index]
        shard = ExpertShard(E, {0: ExpertBank(ids, gate_up[list(ids)], down[list(ids)])})
        link = listeners[index].accept(TOKEN, {("attention", 0)}, 60)[("attention", 0)]
        ExpertServer([link], D, K, dtype, device=device, timer=PhaseTimer()).serve(0, [x.shape[0]], shard)
        link.close()

    threads = [threading.Thread(target=serve, args=(index,), daemon=True) for index in range(2)]
    for thread in threads:
        thread.start()
    expert_links = [links.connect(listener.address, TOKEN, "attention", 0, 60) for listener in listeners]
    dispatcher = LinkDispatcher(placement, expert_links, device=device)
    batch, handle = dispatcher.dispatch(0, x, idx, w)
    combined = dispatcher.combine(batch.hidden, handle)
    for thread in threads:
        thread.join(60)
    for part in expert_links + listeners:
        part.close()
    return combined, expected


def test_exchange_on_one_device_gives_one_shards_bits():
    combined, whole = exchange_on_one_device("cpu", torch.float32)
    assert combined.dtype == torch.float32 and torch.equal(combined, whole)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract Unix sockets are Linux's")
def test_links_on_one_node_use_a_unix_socket_and_fall_back_to_tcp():
    """A listener answers on its Unix socket (same node) and on TCP; a peer whose Unix socket name
    does not answer here (another node) is reached over TCP; a hello with another token is refused."""
    listener = links.Listener("127.0.0.1")
    host, port, local_name = listener.address
    assert local_name
    reached = []
    for address in (listener.address, (host, port, "epserve-link-on-another-node"), (host, port, "")):
        out = links.connect(address, TOKEN, "engine", 0, 10)
        back = listener.accept(TOKEN, {("engine", 0)}, 10)[("engine", 0)]
        out.send(torch.arange(6, dtype=torch.float32), b"!")
        assert torch.equal(back.recv()[:24].view(torch.float32), torch.arange(6, dtype=torch.float32))
        reached.append(out.sock.family)
        out.close(), back.close()
    assert reached == [socket.AF_UNIX, socket.AF_INET, socket.AF_INET]
    stray = links.connect(listener.address, "another-token", "engine", 0, 10)
    with pytest.raises(links.LinkError, match="timed out"):
        listener.accept(TOKEN, {("engine", 0)}, 0.5)
    stray.close(), listener.close()
