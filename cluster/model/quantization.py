"""Quantized checkpoints: Qwen's block-wise FP8 format, and refusing every other method.

Qwen publishes FP8 checkpoints as `config.json` `quantization_config = {"quant_method": "fp8",
"fmt": "e4m3", "weight_block_size": [b0, b1], "modules_to_not_convert": [...]}`: each quantized
`<module>.weight` [out, in] is float8_e4m3fn beside `<module>.weight_scale_inv` [ceil(out/b0),
ceil(in/b1)] (fp32 or bf16), and weight = fp8 value * scale_inv of its block. Modules in
`modules_to_not_convert` (and any tensor stored in another dtype) are read as they are.
On GPUs with e4m3 and a 16-bit compute dtype (kernels.moe.fp8_banks_supported) the routed experts
and the dense linear layers kernels.linear runs (DENSE_KEPT_FP8) stay FP8 as stored; elsewhere, and
for every other tensor, the weights are dequantised to the compute dtype as they are read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kernels.moe import dequantize_blocks

from ..config import ConfigError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448, the largest finite e4m3fn value
SCALE_SUFFIX = "_scale_inv"
# the dense weights that may stay FP8 as stored: the linear layers kernels.linear runs alone or fused
# with siblings (not the router and the shared expert's gate, fused with each other; not the LM head,
# the embeddings or the vision tower)
DENSE_KEPT_FP8 = tuple(f".{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z",
                                                "in_proj_b", "in_proj_a", "out_proj", "gate_proj", "up_proj",
                                                "down_proj", "fc"))
# what Qwen's FP8 releases store unquantized (as Qwen3.5/3.6-FP8 list them: DeltaNet's small b / a
# projections among them)
QWEN_NOT_CONVERTED = ("embed_tokens", "lm_head", "mlp.gate", "shared_expert_gate", "norm", "conv1d", "in_proj_a",
                      "in_proj_b")


class QuantizationError(ConfigError):
    """A quantization_config epserve cannot load; the message names the method or field."""


@dataclass(frozen=True)
class Fp8BlockQuantization:
    block: tuple[int, int]  # (rows, columns) of the weight each scale covers
    not_converted: tuple[str, ...] = ()  # module name fragments stored unquantized

    def describe(self) -> str:
        return f"fp8 e4m3, {self.block[0]}x{self.block[1]} blocks"


def quantization_from(raw_config: dict[str, Any]) -> Fp8BlockQuantization | None:
    """The checkpoint's quantization (top level or text_config), None when unquantized; refuses
    any method but block-wise e4m3 FP8."""
    raw = raw_config.get("quantization_config") or (raw_config.get("text_config") or {}).get("quantization_config")
    if not raw:
        return None
    method = raw.get("quant_method")
    if method != "fp8":
        raise QuantizationError(
            f"quantization_config.quant_method {method!r} is not supported; epserve loads unquantized "
            f"checkpoints and Qwen's block-wise FP8 (quant_method 'fp8', fmt 'e4m3')")
    if raw.get("fmt", "e4m3") != "e4m3":
        raise QuantizationError(f"quantization_config.fmt {raw['fmt']!r} is not supported; FP8 must be 'e4m3'")
    block = raw.get("weight_block_size")
    if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise QuantizationError(
            f"quantization_config.weight_block_size must be two positive ints (block-wise FP8), got {block!r}")
    return Fp8BlockQuantization(tuple(block), tuple(raw.get("modules_to_not_convert") or ()))


def read_quantization(model_dir: str | Path) -> Fp8BlockQuantization | None:
    path = Path(model_dir) / "config.json"
    return quantization_from(json.loads(path.read_text())) if path.is_file() else None


def may_stay_fp8(name: str) -> bool:
    """Whether a dense weight (canonical name) may stay FP8 as stored: DENSE_KEPT_FP8."""
    return name.endswith(DENSE_KEPT_FP8) and not name.startswith("visual.")


def keep_fp8_as_stored(layer: torch.nn.Linear, block: tuple[int, int]) -> None:
    """Makes a (meta) linear layer's weight float8 and gives it an fp32 weight_scale_inv buffer of
    its block scales: kernels.fuse.weight_of then reads it as an FP8 weight."""
    out, inp = layer.weight.shape
    device = layer.weight.device
    layer.weight = torch.nn.Parameter(torch.empty(out, inp, dtype=FP8, device=device), requires_grad=False)
    scales = (math.ceil(out / block[0]), math.ceil(inp / block[1]))
    layer.register_buffer("weight_scale_inv", torch.empty(scales, dtype=torch.float32, device=device))
    layer.fp8_block = block


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight [..., out, in] (fp8) * scale_inv [..., ceil(out/b0), ceil(in/b1)] -> fp32 [..., out, in]."""
    out, inp = weight.shape[-2:]
    expected = (*weight.shape[:-2], math.ceil(out / block[0]), math.ceil(inp / block[1]))
    if tuple(scale_inv.shape) != expected:
        raise QuantizationError(f"scale shape {list(scale_inv.shape)} does not match weight {list(weight.shape)} "
                                f"with {block[0]}x{block[1]} blocks (expected {list(expected)})")
    return dequantize_blocks(weight, scale_inv, block)


def quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 of weight [..., out, in]: (fp8 weight, fp32 scale_inv), as Qwen's tools
    write them (each block's absolute maximum maps to 448). For tests and tiny checkpoints."""
    out, inp = weight.shape[-2:]
    rows, cols = math.ceil(out / block[0]), math.ceil(inp / block[1])
    padded = torch.zeros(*weight.shape[:-2], rows * block[0], cols * block[1], dtype=torch.float32)
    padded[..., :out, :inp] = weight.float()
    blocks = padded.unflatten(-1, (cols, block[1])).unflatten(-3, (rows, block[0]))  # [..., R, b0, C, b1]
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12)  # [..., R, C]
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2, -1).flatten(-3, -2)[..., :out, :inp].contiguous(), scale_inv


def is_quantized_weight(canonical_name: str, shape: list[int]) -> bool:
    """Which weights Qwen's FP8 checkpoints quantize: the linear layers' 2-D weights (attention,
    DeltaNet, experts, shared expert); not embeddings, LM head, norms, the router, gates, conv,
    DeltaNet's b / a projections."""
    fused_experts = canonical_name.endswith(("experts.gate_up_proj", "experts.down_proj"))  # [E, out, in]
    if len(shape) < 2 or not (canonical_name.endswith(".weight") or fused_experts) or "norm" in canonical_name:
        return False
    return not any(part in canonical_name for part in QWEN_NOT_CONVERTED)


def write_fp8_checkpoint(src: str | Path, dst: str | Path, block: tuple[int, int] = (128, 128),
                         dequantised: str | Path | None = None) -> None:
    """Copies checkpoint `src` to `dst` in Qwen's block-wise FP8 format (config, tokenizer and
    every file; the linear weights as fp8 + scale_inv). `dequantised`: also a copy whose weights
    are exactly the fp8 values times their scales (fp32), the reference an FP8 load must match."""
    import shutil

    from safetensors.torch import load_file, save_file

    from .checkpoint import INDEX_FILE, canonical_name

    src, dst = Path(src), Path(dst)
    targets = [Path(dst)] + ([Path(dequantised)] if dequantised is not None else [])
    for target in targets:
        target.mkdir(parents=True, exist_ok=True)
        for path in src.iterdir():
            if path.is_file() and path.suffix != ".safetensors" and path.name != INDEX_FILE:
                shutil.copy(path, target / path.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block),
                                     "modules_to_not_convert": list(QWEN_NOT_CONVERTED)}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    weight_map = {}
    for path in sorted(src.glob("*.safetensors")):
        tensors, fp8, exact = load_file(path), {}, {}
        for name, tensor in tensors.items():
            canonical = canonical_name(name)
            if canonical is not None and is_quantized_weight(canonical, list(tensor.shape)):
                q, scale_inv = quantize(tensor, block)
                fp8[name], fp8[name + SCALE_SUFFIX] = q, scale_inv
                exact[name] = dequantize(q, scale_inv, block).to(tensor.dtype)
            else:
                fp8[name] = exact[name] = tensor
        save_file(fp8, dst / path.name)
        weight_map |= {name: path.name for name in fp8}
        if dequantised is not None:
            save_file(exact, Path(dequantised) / path.name)
    if (src / INDEX_FILE).is_file():
        index = json.loads((src / INDEX_FILE).read_text())
        (dst / INDEX_FILE).write_text(json.dumps({**index, "weight_map": weight_map}, indent=2))
        if dequantised is not None:
            shutil.copy(src / INDEX_FILE, Path(dequantised) / INDEX_FILE)
