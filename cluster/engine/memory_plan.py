"""What each worker of a model instance holds in device memory, planned before anything loads.

Per attention worker: the dense weights (exact: the model built on the meta device, counted; the
linear layers an FP8 checkpoint keeps as stored a byte a weight plus their block scales), the
KV blocks and DeltaNet state slots (cache_plan), their second rows when failed steps are replayed
(the states are double-buffered: a failed step leaves the current rows as they were), and the
exchange buffers of one step. Per expert worker: its share of every MoE layer's experts (the
busiest worker under the placement) and its exchange buffers; experts an FP8 checkpoint keeps as
stored (GPUs: kernels.moe.fp8_banks_supported) take a byte a weight plus their block scales (the
Triton kernels read them as stored: no dequantised copy). Activations of a step are not planned
(small next to these at serving batch sizes); `headroom` covers them, the allocator, and the one
layer's bank an FP8 worker dequantises if the grouped kernels do not build (1.5 GiB for the
flagship on 8 expert workers: a fallback, logged when taken).
A plan that does not fit the device is refused with the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from router import ExpertPlacement

from ..config import ClusterConfig, ConfigError, ModelConfig
from .cache_plan import CacheLayout

GIB = 2**30


@dataclass(frozen=True)
class WorkerMemory:
    role: str
    weights: int
    kv_cache: int = 0
    state_slots: int = 0
    undo_rows: int = 0
    exchange: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.state_slots + self.undo_rows + self.exchange


@dataclass(frozen=True)
class MemoryPlan:
    attention: WorkerMemory
    expert: WorkerMemory | None  # None: one process holds everything (attention carries the experts)
    headroom: float = 0.1  # of the device, for activations and the allocator

    def workers(self) -> list[WorkerMemory]:
        return [self.attention] + ([self.expert] if self.expert is not None else [])

    def describe(self) -> str:
        rows = ["worker     weights   KV cache  DeltaNet  undo rows  exchange     total  (GiB)"]
        for w in self.workers():
            rows.append(f"{w.role:<9}" + "".join(f"{b / GIB:>10.2f}" for b in (
                w.weights, w.kv_cache, w.state_slots, w.undo_rows, w.exchange, w.total)))
        return "\n".join(rows)

    def check(self, device: str, capacity: int, role: str | None = None) -> None:
        """Refuses a plan whose worker (of `role`, or any) does not fit `capacity` bytes less the
        headroom."""
        usable = capacity * (1 - self.headroom)
        for w in self.workers():
            if (role is None or w.role == role) and w.total > usable:
                raise ConfigError(
                    f"the {w.role} worker needs {w.total / GIB:.2f} GiB on {device} but it has "
                    f"{capacity / GIB:.2f} GiB ({usable / GIB:.2f} GiB after {self.headroom:.0%} headroom):\n"
                    f"{self.describe()}\nuse more expert workers, a smaller cache budget, or a "
                    f"smaller dtype (an FP8 checkpoint's experts stay FP8 on GPUs with a 16-bit dtype)")


def dense_bytes(cfg: ModelConfig, dtype_bytes: int, fp8_names: Iterable[str] = (),
                fp8_block: tuple[int, int] | None = None) -> int:
    """Bytes of everything but the routed experts, counted on the meta device: dtype_bytes a
    parameter, the weights in fp8_names (kept FP8 as stored) one plus their fp32 block scales."""
    from ..model.loading import empty_model

    model = empty_model(cfg, torch.float32, "meta", fp8_names, fp8_block)
    scales = sum(b.nbytes for name, b in model.named_buffers() if name.endswith("weight_scale_inv"))
    return scales + sum(p.numel() * (1 if p.element_size() == 1 else dtype_bytes) for p in model.parameters())


def expert_parameters(cfg: ModelConfig) -> int:
    """One routed expert's parameters (gate, up, down)."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def expert_bytes(cfg: ModelConfig, dtype_bytes: int, fp8_block: tuple[int, int] | None = None) -> int:
    """One routed expert's bytes as held: in the compute dtype, or (fp8_block) FP8 as stored, a
    byte a weight plus fp32 scales of gate_up [ceil(2I/b0), ceil(D/b1)] and down [ceil(D/b0), ceil(I/b1)]."""
    if fp8_block is None:
        return expert_parameters(cfg) * dtype_bytes
    (D, I), (b0, b1) = (cfg.hidden_size, cfg.moe_intermediate_size), fp8_block
    scales = math.ceil(2 * I / b0) * math.ceil(D / b1) + math.ceil(D / b0) * math.ceil(I / b1)
    return expert_parameters(cfg) + 4 * scales


def plan_memory(cfg: ModelConfig, layout: CacheLayout, dtype_bytes: int, *, max_batched_tokens: int,
                experts_per_worker: int | None = None, attention_workers: int = 1, expert_workers: int = 1,
                replay_failed_steps: bool = True, fp8_block: tuple[int, int] | None = None,
                fp8_dense: Iterable[str] = ()) -> MemoryPlan:
    """experts_per_worker: experts the busiest expert worker holds per MoE layer; None: one
    process holds all of them (no expert workers, no exchange). fp8_block: the experts stay FP8
    as stored, in blocks of this shape, and so do the dense weights named in fp8_dense."""
    moe_layers = len(cfg.moe_layer_ids)
    dense = dense_bytes(cfg, dtype_bytes, fp8_dense if fp8_block is not None else (), fp8_block)
    kv = layout.num_blocks * layout.block_bytes
    states = layout.num_slots * layout.slot_bytes
    undo = layout.num_slots * layout.slot_bytes if replay_failed_steps and experts_per_worker is not None else 0
    held = cfg.num_experts if experts_per_worker is None else experts_per_worker
    experts = held * moe_layers * expert_bytes(cfg, dtype_bytes, fp8_block)
    if experts_per_worker is None:
        return MemoryPlan(WorkerMemory("attention", dense + experts, kv, states), None)
    # one step's exchange per MoE layer (buffers reused across layers): rows and (bank, weight)
    # pairs out to every expert worker, fp64 partial sums back
    T, D, K = max_batched_tokens, cfg.hidden_size, cfg.num_experts_per_tok
    out_bytes = T * (D * dtype_bytes + K * 8)
    attention_exchange = expert_workers * (out_bytes + T * D * 8)
    expert_exchange = attention_workers * (out_bytes + T * D * 8)
    return MemoryPlan(WorkerMemory("attention", dense, kv, states, undo, attention_exchange),
                      WorkerMemory("expert", experts, exchange=expert_exchange))


def plan_instance(cfg: ModelConfig, layout: CacheLayout, dtype_bytes: int, cluster: ClusterConfig,
                  max_batched_tokens: int, fp8_block: tuple[int, int] | None = None,
                  fp8_dense: Iterable[str] = ()) -> MemoryPlan:
    """The plan of one model instance laid out as `cluster` says (its placement, or contiguous);
    fp8_block: its experts stay FP8 as stored, and the dense weights named in fp8_dense."""
    experts_per_worker = None
    if cluster.wants_ray:
        placement = cluster.placement or ExpertPlacement.contiguous(
            cfg.num_experts, cluster.expert_workers, list(cfg.moe_layer_ids))
        experts_per_worker = max(len(ids) for held in placement.held.values() for ids in held)
    return plan_memory(cfg, layout, dtype_bytes, max_batched_tokens=max_batched_tokens,
                       experts_per_worker=experts_per_worker, attention_workers=cluster.attention_workers,
                       expert_workers=cluster.expert_workers, replay_failed_steps=cluster.replay_failed_steps,
                       fp8_block=fp8_block, fp8_dense=fp8_dense)


def device_capacity(device: str) -> int:
    """Bytes of memory on `device` (this process's GPU; on CPU the machine's RAM)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def load_timeout_s(weight_bytes: int, floor_s: float, read_bytes_per_s: float = 200e6) -> float:
    """A worker's start-up wait: its weights read at a slow disk's pace (200 MB/s), never below
    the configured control timeout."""
    return max(floor_s, math.ceil(weight_bytes / read_bytes_per_s))


# Qwen3.5-397B-A17B's text config (../shared/QWEN35.md), for planning without its checkpoint
FLAGSHIP = {
    "model_type": "qwen3_5_moe_text", "vocab_size": 248320, "hidden_size": 4096, "num_hidden_layers": 60,
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 256, "partial_rotary_factor": 0.25,
    "rope_theta": 1e7, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
    "linear_num_key_heads": 16, "linear_num_value_heads": 64, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "num_experts": 512, "num_experts_per_tok": 10,
    "moe_intermediate_size": 1024, "shared_expert_intermediate_size": 1024,
}
