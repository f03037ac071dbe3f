"""The two worker roles of a model instance, as plain classes (Ray wraps them in cluster.engine.executor).

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

from experts import ExpertBank, ExpertShard
from router.placement import ExpertPlacement

from .all_to_all import AllToAllDispatcher
from ..model.checkpoint import CheckpointReader
from ..config import ModelConfig
from ..model.loading import load_dense_model, load_expert_shard
from ..engine.cache_plan import CacheLayout
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
        if loopback:
            host = "127.0.0.1"
        else:
            import ray

            host = ray.util.get_node_ip_address()
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
        return self.timer.snapshot(reset)


class AttentionWorker(_Worker):
    def __init__(self, model_dir: str, cfg: ModelConfig, placement: ExpertPlacement, rank: int,
                 num_attention: int, world_size: int, dtype: str, threads: int,
                 layout: CacheLayout, load_window_steps: int = 64) -> None:
        super().__init__(rank, world_size, threads)
        reader = CheckpointReader(model_dir)
        self.model = load_dense_model(cfg, reader, getattr(torch, dtype)).to(self.device)
        self.dense_bytes = reader.bytes_read
        self.placement, self.num_attention = placement, num_attention
        self.runner = ModelRunner(self.model, layout, spmd=True, load_window_steps=load_window_steps)

    def connect(self, init_method: str, backend: str, timeout_s: float) -> int:
        super().connect(init_method, backend, timeout_s)
        self.set_placement(self.placement)
        return self.rank

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Switches the routing tables (between steps, once the expert workers hold the weights)."""
        self.placement = placement
        dispatcher = AllToAllDispatcher(placement, self.num_attention, device=self.device)
        no_experts = ExpertShard(placement.num_experts, {})
        for moe in self.model.moe_layers():
            moe.dispatcher, moe.experts, moe.timer = dispatcher, no_experts, self.timer

    def resize(self, world_size: int, placement: ExpertPlacement) -> None:
        """A new expert group size: takes effect with the next connect()."""
        self.world_size, self.placement = world_size, placement

    def expert_load(self) -> list[list[int]]:
        """[layer][expert] routed pairs over the load window, for this worker's sequences."""
        return self.runner.load.totals().tolist()

    def reset_load(self) -> None:
        self.runner.load.reset()

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
                 layout: CacheLayout | None = None, load_window_steps: int = 0) -> None:
        super().__init__(rank, world_size, threads)
        self.cfg, self.num_attention = cfg, num_attention
        self.model_dir, self.dtype = model_dir, getattr(torch, dtype)
        self.shard = ExpertShard(cfg.num_experts, {})
        self.bytes_read = 0
        self.prepare_placement(placement)
        self.commit_placement()

    def prepare_placement(self, placement: ExpertPlacement) -> int:
        """Loads the experts this worker will hold under `placement` (keeping those it has) while
        the current shard keeps serving; returns the bytes read from the checkpoint."""
        index = self.rank - self.num_attention
        reader = CheckpointReader(self.model_dir)
        banks = {}
        for layer in self.cfg.moe_layer_ids:
            ids = list(placement.held[layer][index])
            old = self.shard.banks.get(layer)
            have = {e: i for i, e in enumerate(old.expert_ids)} if old is not None else {}
            missing = [e for e in ids if e not in have]
            fresh = {}
            if missing:
                bank = load_expert_shard(self.cfg, reader, {layer: missing}, self.dtype).banks[layer]
                fresh = {e: (bank.gate_up[i].to(self.device), bank.down[i].to(self.device))
                         for i, e in enumerate(missing)}
            gate_up = [old.gate_up[have[e]] if e in have else fresh[e][0] for e in ids]
            down = [old.down[have[e]] if e in have else fresh[e][1] for e in ids]
            banks[layer] = ExpertBank(tuple(ids), torch.stack(gate_up), torch.stack(down))
        self._pending = (placement, ExpertShard(self.cfg.num_experts, banks))
        self.bytes_read += reader.bytes_read
        return reader.bytes_read

    def commit_placement(self) -> None:
        """Switches to the prepared shard and routing tables (between steps)."""
        self.placement, self.shard = self._pending
        self._pending = None
        if dist.is_initialized():
            self.dispatcher = AllToAllDispatcher(self.placement, self.num_attention, device=self.device)

    def resize(self, rank: int, world_size: int, placement: ExpertPlacement) -> int:
        """A new expert group: this worker's rank may change; loads its experts for the next connect()."""
        self.rank, self.world_size = rank, world_size
        loaded = self.prepare_placement(placement)
        self.commit_placement()
        return loaded

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
                    out = self.shard.forward(layer, batch)
                with self.timer.phase("combine"):
                    self.dispatcher.combine(out, handle)
        self.timer.steps += 1

    def info(self) -> dict:
        return {"role": "expert", "rank": self.rank, "expert_bytes": self.shard.nbytes,
                "bytes_read": self.bytes_read, "device": str(self.device),
                "experts_per_layer": {layer: len(b.expert_ids) for layer, b in self.shard.banks.items()}}
