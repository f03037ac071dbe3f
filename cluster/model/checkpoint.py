"""Reading Qwen3.5-MoE safetensors checkpoints: single file or sharded, text-only or multimodal
names, per-expert or fused expert tensors; a worker reads only the experts it holds.

Names are canonicalised to the text model's own: `model.` / `model.language_model.` prefixes are
dropped (`model.layers.3.mlp.gate.weight` -> `layers.3.mlp.gate.weight`); `lm_head.weight` stays;
the vision tower's are `visual.*` (read when the config has a vision_config); `mtp.*` tensors are
kept aside for speculative decoding. Block-wise FP8 weights (cluster/model/quantization.py) are
dequantised as they are read: callers see fp32.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from kernels.moe import Fp8Scales

from ..config import ConfigError, ModelConfig
from .quantization import FP8, SCALE_SUFFIX, dequantize, read_quantization

INDEX_FILE = "model.safetensors.index.json"
_EXPERT_NAME = re.compile(r"^layers\.(\d+)\.mlp\.experts\.")
_PREFIXES = ("model.language_model.", "model.")


class CheckpointError(ValueError):
    """A checkpoint that does not match the config; the message names the tensor and the file."""


def canonical_name(name: str) -> str | None:
    """The text model's name for a checkpoint tensor, or None for tensors epserve does not use."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("mtp.") or name.startswith("visual.") or name == "lm_head.weight":
        return name
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None


class CheckpointReader:
    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self._where: dict[str, tuple[str, str]] = {}  # canonical -> (name in file, file)
        self._handles: dict[str, object] = {}
        self.bytes_read = 0
        self.quantization = read_quantization(self.model_dir)  # None, or block-wise FP8
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(p.name for p in self.model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {self.model_dir}")
            weight_map = {name: f for f in files for name in self._open(f).keys()}
        for name, file in weight_map.items():
            canonical = canonical_name(name)
            if canonical is not None:
                self._where[canonical] = (name, file)

    def _open(self, file: str):
        if file not in self._handles:
            path = self.model_dir / file
            if not path.is_file():
                raise CheckpointError(f"checkpoint file {path} is listed in {INDEX_FILE} but missing")
            self._handles[file] = safe_open(str(path), framework="pt")
        return self._handles[file]

    def has(self, name: str) -> bool:
        return name in self._where

    @property
    def mtp_names(self) -> list[str]:
        return sorted(n for n in self._where if n.startswith("mtp."))

    def names(self) -> list[str]:
        return sorted(n for n in self._where if not n.endswith(SCALE_SUFFIX))

    def _locate(self, name: str) -> tuple[str, str]:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}")
        return self._where[name]

    def shape(self, name: str) -> list[int]:
        stored, file = self._locate(name)
        return list(self._open(file).get_slice(stored).get_shape())

    def read(self, name: str, expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        return self._dequantized(name, self.read_stored(name, expected_shape), None)

    def read_stored(self, name: str, expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor as stored (FP8 not dequantised)."""
        stored, file = self._locate(name)
        if expected_shape is not None:
            self._check_shape(name, expected_shape)
        tensor = self._open(file).get_tensor(stored)
        self.bytes_read += tensor.nbytes
        return tensor

    def is_fp8(self, name: str) -> bool:
        """Whether the tensor is stored block-wise FP8 (float8 with its weight_scale_inv beside it)."""
        if self.quantization is None or not self.has(name) or not self.has(name + SCALE_SUFFIX):
            return False
        stored, file = self._where[name]
        return self._open(file).get_slice(stored).get_dtype() == "F8_E4M3"

    def _dequantized(self, name: str, tensor: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
        """An FP8 weight times its block scales (of the same rows of the first dimension), fp32."""
        if tensor.dtype != FP8:
            return tensor
        scale_name = name + SCALE_SUFFIX
        if self.quantization is None or not self.has(scale_name):
            stored, file = self._where[name]
            raise CheckpointError(
                f"tensor {stored!r} in {self.model_dir / file} is float8 but "
                + ("config.json has no block-wise fp8 quantization_config" if self.quantization is None
                   else f"{stored + SCALE_SUFFIX!r} (its weight_scale_inv) is missing"))
        scale = self.read(scale_name) if rows is None else self.read_rows(scale_name, rows)
        return dequantize(tensor, scale, self.quantization.block)

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows of the first dimension only: other rows' bytes are never read (one slice per run
        of consecutive rows)."""
        return self._dequantized(name, self._read_stored_rows(name, rows), rows)

    def _read_stored_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        stored, file = self._locate(name)
        view = self._open(file).get_slice(stored)
        parts, start = [], 0
        while start < len(rows):
            end = start
            while end + 1 < len(rows) and rows[end + 1] == rows[end] + 1:
                end += 1
            parts.append(view[rows[start] : rows[end] + 1])
            start = end + 1
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.bytes_read += tensor.nbytes
        return tensor

    def _check_shape(self, name: str, expected: tuple[int, ...]) -> None:
        actual = self.shape(name)
        if tuple(actual) != tuple(expected):
            stored, file = self._where[name]
            raise CheckpointError(
                f"tensor {stored!r} in {self.model_dir / file} has shape {actual}, "
                f"expected {list(expected)}"
            )

    def is_expert_tensor(self, name: str) -> bool:
        return _EXPERT_NAME.match(name) is not None

    def dense_names(self) -> list[str]:
        return [n for n in self.names() if not n.startswith("mtp.") and not self.is_expert_tensor(n)]

    def read_experts(
        self, layer: int | str, expert_ids: list[int], num_experts: int, hidden: int, intermediate: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [N, 2I, D] and down [N, D, I] of the given experts, whichever layout is stored.
        layer: a decoder layer's index, or its name prefix (ModelConfig.layer_prefix: the MTP layer)."""
        prefix = _experts_prefix(layer)
        self._check_expert_shapes(prefix, expert_ids, num_experts, hidden, intermediate)
        return self._stacked_experts(prefix, expert_ids, "", self.read, self.read_rows)

    def read_experts_fp8(
        self, layer: int | str, expert_ids: list[int], num_experts: int, hidden: int, intermediate: int
    ) -> tuple[torch.Tensor, torch.Tensor, Fp8Scales] | None:
        """The given experts as stored when they are block-wise FP8: gate_up [N, 2I, D] and down
        [N, D, I] float8_e4m3fn and their block scales (fp32); None when they are not FP8, or when a
        per-expert checkpoint's gate and up blocks would not stack into gate_up's (I not a multiple
        of the blocks' rows): read_experts dequantises those."""
        if self.quantization is None:
            return None
        prefix = _experts_prefix(layer)
        block = self.quantization.block
        if self.has(prefix + "gate_up_proj"):
            names = [prefix + "gate_up_proj", prefix + "down_proj"]
        else:
            names = [f"{prefix}{expert_ids[0]}.{m}_proj.weight" for m in ("gate", "up", "down")]
            if intermediate % block[0]:
                return None
        if not all(self.has(n + SCALE_SUFFIX) for n in names):
            return None  # stored unquantized (modules_to_not_convert)
        self._check_expert_shapes(prefix, expert_ids, num_experts, hidden, intermediate)
        gate_up, down = self._stacked_experts(prefix, expert_ids, "", self.read_stored, self._read_stored_rows)
        if gate_up.dtype != FP8 or down.dtype != FP8:
            return None
        scales = self._stacked_experts(prefix, expert_ids, SCALE_SUFFIX, self.read_stored, self._read_stored_rows)
        return gate_up, down, Fp8Scales(*(s.float().contiguous() for s in scales), block)

    def _check_expert_shapes(self, prefix: str, expert_ids: list[int], N: int, D: int, I: int) -> None:
        if self.has(prefix + "gate_up_proj"):
            self._check_shape(prefix + "gate_up_proj", (N, 2 * I, D))
            self._check_shape(prefix + "down_proj", (N, D, I))
            return
        for e in expert_ids:
            for matrix, shape in (("gate", (I, D)), ("up", (I, D)), ("down", (D, I))):
                self._check_shape(f"{prefix}{e}.{matrix}_proj.weight", shape)

    def _stacked_experts(self, prefix: str, expert_ids: list[int], suffix: str, read, read_rows):
        """gate_up and down of the given experts (or, suffix SCALE_SUFFIX, their block scales) in
        either layout, each tensor read by read(name) / read_rows(name, rows)."""
        if self.has(prefix + "gate_up_proj"):
            return tuple(read_rows(prefix + f"{m}_proj{suffix}", expert_ids) for m in ("gate_up", "down"))
        gate_up, down = [], []
        for e in expert_ids:
            gate, up, down_e = (read(f"{prefix}{e}.{m}_proj.weight{suffix}") for m in ("gate", "up", "down"))
            gate_up.append(torch.cat([gate, up], dim=0))
            down.append(down_e)
        return torch.stack(gate_up), torch.stack(down)


def _experts_prefix(layer: int | str) -> str:
    return (layer if isinstance(layer, str) else f"layers.{layer}.") + "mlp.experts."


def with_mtp(cfg: ModelConfig, model_dir: str | Path) -> ModelConfig:
    """cfg with its multi-token-prediction layer switched on (speculative decoding); refuses a
    checkpoint that does not carry one."""
    if cfg.mtp_layers < 1 or not CheckpointReader(model_dir).has("mtp.fc.weight"):
        raise ConfigError(f"speculative method 'mtp' needs the checkpoint's MTP module, and {model_dir} has none "
                          f"(config.json mtp_num_hidden_layers = {cfg.mtp_layers}, mtp.* tensors missing or not); "
                          f"`epserve make-tiny DIR --train` writes a model with one")
    return dataclasses.replace(cfg, use_mtp=True)
