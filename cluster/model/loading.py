"""Building a model and an expert shard from a checkpoint directory."""

from __future__ import annotations

import torch

from experts import ExpertBank, ExpertShard

from .checkpoint import CheckpointReader
from ..config import ModelConfig
from .model import Qwen35MoeModel


def load_dense_model(cfg: ModelConfig, reader: CheckpointReader, dtype: torch.dtype) -> Qwen35MoeModel:
    model = Qwen35MoeModel(cfg).to(dtype)
    model.load_dense(reader)
    return model.eval()


def load_expert_shard(
    cfg: ModelConfig,
    reader: CheckpointReader,
    expert_ids: dict[int, list[int]],
    dtype: torch.dtype,
) -> ExpertShard:
    """Reads only the listed experts of each layer (layer -> sorted global expert ids)."""
    banks = {}
    for layer, ids in expert_ids.items():
        gate_up, down = reader.read_experts(
            layer, ids, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        )
        banks[layer] = ExpertBank(tuple(ids), gate_up.to(dtype), down.to(dtype))
    return ExpertShard(cfg.num_experts, banks)
