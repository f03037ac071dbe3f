"""Building a model and an expert shard from a checkpoint directory."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from attention import PartialRotary
from experts import ExpertBank, ExpertShard
from kernels.moe import fp8_banks_supported

from vision import VisionTower

from .checkpoint import CheckpointReader
from ..config import ModelConfig
from .model import Qwen35MoeModel
from .quantization import QWEN_NOT_CONVERTED, keep_fp8_as_stored, may_stay_fp8


def empty_model(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu",
                fp8_names: Iterable[str] = (), fp8_block: tuple[int, int] | None = None) -> Qwen35MoeModel:
    """The dense model built on the meta device, then allocated once on `device` in `dtype`,
    parameters unset (no initialised fp32 copy on the host); buffers and ties are restored.
    fp8_names: weights kept FP8 as stored (float8 parameters, their layers' fp32 weight_scale_inv
    buffers in fp8_block blocks)."""
    with torch.device("meta"):
        model = Qwen35MoeModel(cfg)
    model = model.to(dtype)
    for name in fp8_names:
        keep_fp8_as_stored(model.get_submodule(name.removesuffix(".weight")), fp8_block)
    model = model.to_empty(device=device)
    model.tie_weights()
    for module in model.modules():
        if isinstance(module, (PartialRotary, VisionTower)):
            module.reset_buffers()
    return model


def fp8_dense_names(cfg: ModelConfig, reader: CheckpointReader | None) -> list[str]:
    """The dense weights that stay FP8 as stored where the routed experts do (GPUs): the linear
    layers kernels.linear runs that the checkpoint stores block-wise FP8 (reader None: those
    Qwen's FP8 releases store so, for planning without a checkpoint)."""
    with torch.device("meta"):
        names = [name for name, _ in Qwen35MoeModel(cfg).named_parameters()]
    stored_fp8 = reader.is_fp8 if reader is not None else (
        lambda name: not any(part in name for part in QWEN_NOT_CONVERTED))
    return [name for name in names if may_stay_fp8(name) and stored_fp8(name)]


def load_dense_model(cfg: ModelConfig, reader: CheckpointReader, dtype: torch.dtype,
                     device: str | torch.device = "cpu") -> Qwen35MoeModel:
    """empty_model filled from the checkpoint tensor by tensor; an FP8 checkpoint's linear layers
    stay FP8 where the device computes with them so (fp8_banks_supported), else are dequantised."""
    keep_fp8 = reader.quantization is not None and fp8_banks_supported(device, dtype)
    names = fp8_dense_names(cfg, reader) if keep_fp8 else []
    model = empty_model(cfg, dtype, device, names, reader.quantization.block if keep_fp8 else None)
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
