"""The two worker roles of a model instance, as plain classes (Ray wraps them in cluster.executor).

AttentionWorker: the dense model (embeddings, DeltaNet / attention, norms, router gate, shared
expert, LM head) and the caches of its sequences; no routed experts.
ExpertWorker: an ExpertShard with only its own experts, read from the checkpoint by itself.
Both join one process group and run every step together: per MoE layer the attention workers'
MoELayer and the expert workers' loop make the same dispatch/combine calls (SPMD).
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from experts import ExpertShard
from router.placement import ExpertPlacement

from .all_to_all import AllToAllDispatcher
from .checkpoint import CheckpointReader
from .config import ModelConfig
from .loading import load_dense_model, load_expert_shard
from .cache_plan import CacheLayout
from .messages import decode_step, encode_results
from .runner import ModelRunner
from .timing import PhaseTimer


def worker_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class _Worker:
    """Process-group membership shared by both roles."""

    def __init__(self, rank: int, world_size: int, threads: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.device = worker_device()
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.timer = PhaseTimer()

    def rendezvous_address(self, loopback: bool) -> str:
        """A free TCP port on this worker's node, for init_process_group."""
        host = "127.0.0.1" if loopback else socket.gethostbyname(socket.gethostname())
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        return f"tcp://{host}:{port}"

    def connect(self, init_method: str, backend: str, timeout_s: float) -> int:
        dist.init_process_group(
            backend, init_method=init_method, rank=self.rank, world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        return self.rank

    def disconnect(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def timings(self, reset: bool = False) -> dict[str, float]:
        snap = self.timer.snapshot()
        if reset:
            self.timer.reset()
        return snap


class AttentionWorker(_Worker):
    def __init__(self, model_dir: str, cfg: ModelConfig, placement: ExpertPlacement, rank: int,
                 num_attention: int, world_size: int, dtype: str, threads: int,
                 layout: CacheLayout) -> None:
        super().__init__(rank, world_size, threads)
        reader = CheckpointReader(model_dir)
        self.model = load_dense_model(cfg, reader, getattr(torch, dtype)).to(self.device)
        self.dense_bytes = reader.bytes_read
        self.placement, self.num_attention = placement, num_attention
        self.runner = ModelRunner(self.model, layout, spmd=True)

    def connect(self, init_method: str, backend: str, timeout_s: float) -> int:
        super().connect(init_method, backend, timeout_s)
        dispatcher = AllToAllDispatcher(self.placement, self.num_attention, device=self.device)
        no_experts = ExpertShard(self.placement.num_experts, {})
        for moe in self.model.moe_layers():
            moe.dispatcher, moe.experts, moe.timer = dispatcher, no_experts, self.timer
        return self.rank

    def execute(self, step_bytes: bytes) -> bytes:
        """One step for this worker's sequences (possibly none: it still joins every collective)."""
        with self.timer.phase("step"):
            results = self.runner.execute(decode_step(step_bytes))
        self.timer.steps += 1
        return encode_results(results)

    def release(self, seq_ids: list[int]) -> None:
        """Forgets finished sequences outside a step (no collectives)."""
        for seq_id in seq_ids:
            self.runner.sequences.pop(seq_id, None)

    def info(self) -> dict:
        return {"role": "attention", "rank": self.rank, "dense_bytes": self.dense_bytes,
                "sequences": len(self.runner.sequences), "device": str(self.device)}


class ExpertWorker(_Worker):
    def __init__(self, model_dir: str, cfg: ModelConfig, placement: ExpertPlacement, rank: int,
                 num_attention: int, world_size: int, dtype: str, threads: int,
                 layout: CacheLayout | None = None) -> None:
        super().__init__(rank, world_size, threads)
        self.cfg, self.placement, self.num_attention = cfg, placement, num_attention
        index = rank - num_attention
        own = {layer: list(placement.held[layer][index]) for layer in cfg.moe_layer_ids}
        reader = CheckpointReader(model_dir)
        shard = load_expert_shard(cfg, reader, own, getattr(torch, dtype))
        self.shard = ExpertShard(cfg.num_experts, {
            layer: type(bank)(bank.expert_ids, bank.gate_up.to(self.device), bank.down.to(self.device))
            for layer, bank in shard.banks.items()
        })
        self.bytes_read = reader.bytes_read

    def connect(self, init_method: str, backend: str, timeout_s: float) -> int:
        super().connect(init_method, backend, timeout_s)
        self.dispatcher = AllToAllDispatcher(self.placement, self.num_attention, device=self.device)
        dtype = next(iter(self.shard.banks.values())).gate_up.dtype
        self.empty_hidden = torch.empty(0, self.cfg.hidden_size, dtype=dtype, device=self.device)
        self.empty_idx = torch.empty(0, self.cfg.num_experts_per_tok, dtype=torch.long, device=self.device)
        self.empty_weights = torch.empty(0, self.cfg.num_experts_per_tok, dtype=dtype, device=self.device)
        return self.rank

    def execute(self) -> None:
        """One step: serve every MoE layer once, in layer order."""
        with self.timer.phase("step"):
            for layer in self.cfg.moe_layer_ids:
                with self.timer.phase("dispatch"):
                    batch, handle = self.dispatcher.dispatch(
                        layer, self.empty_hidden, self.empty_idx, self.empty_weights
                    )
                with self.timer.phase("experts"):
                    out = self.shard.forward(layer, batch.hidden, batch.counts)
                with self.timer.phase("combine"):
                    self.dispatcher.combine(out, handle)
        self.timer.steps += 1

    def info(self) -> dict:
        return {"role": "expert", "rank": self.rank, "expert_bytes": self.shard.nbytes,
                "bytes_read": self.bytes_read, "device": str(self.device),
                "experts_per_layer": {layer: len(b.expert_ids) for layer, b in self.shard.banks.items()}}
