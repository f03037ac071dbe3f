"""Building a model and an expert shard from a checkpoint directory."""

from __future__ import annotations

import torch

from attention import PartialRotary
from experts import ExpertBank, ExpertShard
from kernels.moe import fp8_banks_supported

from vision import VisionTower

from .checkpoint import CheckpointReader
from ..config import ModelConfig
from .model import Qwen35MoeModel


def empty_model(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu") -> Qwen35MoeModel:
    """The dense model built on the meta device, then allocated once on `device` in `dtype`,
    parameters unset (no initialised fp32 copy on the host); buffers and ties are restored."""
    with torch.device("meta"):
        model = Qwen35MoeModel(cfg)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    for module in model.modules():
        if isinstance(module, (PartialRotary, VisionTower)):
            module.reset_buffers()
    return model


def load_dense_model(cfg: ModelConfig, reader: CheckpointReader, dtype: torch.dtype,
                     device: str | torch.device = "cpu") -> Qwen35MoeModel:
    """empty_model filled from the checkpoint tensor by tensor."""
    model = empty_model(cfg, dtype, device)
    model.load_dense(reader)
    return model.eval()


def load_expert_shard(
    cfg: ModelConfig,
    reader: CheckpointReader,
    expert_ids: dict[int, list[int]],
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> ExpertShard:
    """Reads only the listed experts of each layer (layer -> sorted global expert ids) onto `device`;
    an FP8 checkpoint's experts stay FP8 where the device computes with them so (GPUs), else they
    are dequantised to `dtype`."""
    keep_fp8 = reader.quantization is not None and fp8_banks_supported(device, dtype)
    banks = {}
    for layer, ids in expert_ids.items():
        shape = (ids, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        stored = reader.read_experts_fp8(cfg.layer_prefix(layer), *shape) if keep_fp8 else None
        if stored is not None:
            gate_up, down, scales = stored
            banks[layer] = ExpertBank(tuple(ids), gate_up.to(device), down.to(device), scales.to(device))
        else:
            gate_up, down = reader.read_experts(cfg.layer_prefix(layer), *shape)
            banks[layer] = ExpertBank(tuple(ids), gate_up.to(device, dtype), down.to(device, dtype))
    return ExpertShard(cfg.num_experts, banks)
